"""The in-process encoder against BGE-M3's definition (docs/getting-started.md, "Models").

Reference numbers come from FlagEmbedding's BGEM3FlagModel: frozen in tests/data/golden.npz (written by
tests/make_golden.py, so these tests run without FlagEmbedding, e.g. under transformers 5.x) and, where
FlagEmbedding imports, computed live, directly and through pymilvus' BGEM3EmbeddingFunction.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from producer.contract.wire import Embedding, ItemError
from worker import model as model_module
from worker.device import DeviceError
from worker.encoder import Encoder, EncodeResult, Limits
from worker.model import ModelLoadError
from worker.model import padding_for as model_padding_for
from worker.slicing import Slicer

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "data" / "golden.npz"
TOL = 1e-5        # against FlagEmbedding (another implementation: padded batches, other kernels)
SAME = 1e-6       # against ourselves (same kernels; only the batch composition differs)
KINDS = ("documents", "queries")

SENTENCES = [
    "Vectors are computed by workers pinned to one device each.",
    "Die Warteschlange trennt Anfragen von Dokumenten, damit Suchanfragen nie warten.",
    "Каждый работник загружает модель один раз перед первой задачей.",
    "查询和文档在不同的队列中传输。",
    "長い文書はトークン数で分割されます。",
    "يتم تخزين النتائج في قاعدة بيانات المتجهات.",
    "कार्यकर्ता एक समय में एक बैच संसाधित करता है।",
    "Done ✅ — next batch 🚀🔥",
]
# Not the golden texts: a mixed-length multilingual batch with two texts over 512 tokens.
LIVE_TEXTS = [
    *SENTENCES,
    "ok",
    " ".join(SENTENCES * 3),
    " ".join(f"{s} [{i}]" for i, s in enumerate(SENTENCES * 5)),
    " ".join(f"Item {i}: {SENTENCES[i % 8]}" for i in range(60)),
]


# ---- fixtures and helpers ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def f32(tiny_model: Path) -> Encoder:
    return Encoder.load(str(tiny_model), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def limited(tiny_model: Path) -> Encoder:
    """Small limits, so truncation and the character limit need only short texts."""
    return Encoder.load(str(tiny_model), device="cpu", dtype="float32",
                        limits=Limits(query_max_length=32, document_max_length=64, max_text_chars=1000))


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def flag(tiny_model: Path):
    flag_embedding = pytest.importorskip("FlagEmbedding")
    return flag_embedding.BGEM3FlagModel(str(tiny_model), use_fp16=False, devices="cpu",
                                         passage_max_length=8192, query_max_length=512)


def golden_items(g: dict[str, np.ndarray], kind: str) -> list[tuple[np.ndarray, dict[int, float], np.ndarray]]:
    """(dense, sparse {id: weight}, colbert) per golden text."""
    so, co = g[f"{kind}_sparse_offsets"], g[f"{kind}_colbert_offsets"]
    ids, weights = g[f"{kind}_sparse_ids"], g[f"{kind}_sparse_weights"]
    return [(g[f"{kind}_dense"][i],
             dict(zip(ids[so[i]:so[i + 1]].tolist(), weights[so[i]:so[i + 1]].tolist())),
             g[f"{kind}_colbert"][co[i]:co[i + 1]])
            for i in range(len(g[f"{kind}_texts"]))]


def flag_items(out: dict) -> list[tuple[np.ndarray, dict[int, float], np.ndarray | None]]:
    """The same triples from a BGEM3FlagModel output (lexical weights are keyed by str(token id))."""
    colbert = out.get("colbert_vecs") or [None] * len(out["dense_vecs"])
    return [(np.asarray(d), {int(k): float(v) for k, v in lex.items()}, c)
            for d, lex, c in zip(out["dense_vecs"], out["lexical_weights"], colbert)]


def diffs(ours: Embedding, dense: np.ndarray, sparse: dict[int, float], colbert: np.ndarray | None) -> dict[str, float]:
    """Max abs differences of each output; asserts that the sparse id sets and ColBERT shapes agree."""
    assert isinstance(ours, Embedding), ours
    assert ours.dense.dtype == np.float32 and ours.dense.shape == dense.shape
    got = ours.sparse_dict()
    assert sorted(got) == sorted(sparse), f"sparse ids differ: {sorted(set(got) ^ set(sparse))[:10]}"
    out = {"dense": float(np.abs(ours.dense - dense).max()),
           "sparse": max((abs(got[k] - w) for k, w in sparse.items()), default=0.0)}
    if colbert is not None:
        assert ours.colbert is not None and ours.colbert.shape == colbert.shape
        out["colbert"] = float(np.abs(ours.colbert - colbert).max())
    return out


def assert_close(items, references, tol: float) -> dict[str, float]:
    """Every item within ``tol`` of its reference; returns the worst differences (shown on failure)."""
    assert len(items) == len(references)
    worst: dict[str, float] = {}
    for i, (item, ref) in enumerate(zip(items, references)):
        for name, value in diffs(item, *ref).items():
            assert value <= tol, f"item {i}: {name} differs by {value:.3g} > {tol}"
            worst[name] = max(worst.get(name, 0.0), value)
    return worst


def as_reference(item: Embedding) -> tuple[np.ndarray, dict[int, float], np.ndarray | None]:
    return item.dense, item.sparse_dict(), item.colbert


def words(n: int) -> str:
    """A text of exactly n ordinary tokens: '▁a' is one piece of the tiny vocabulary."""
    return " ".join(["a"] * n)


# ---- equal to FlagEmbedding ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_equals_golden(f32: Encoder, golden, kind: str) -> None:
    texts = golden[f"{kind}_texts"].tolist()
    result = f32.encode(texts, kind, colbert=True)
    assert_close(result.items, golden_items(golden, kind), TOL)
    assert result.truncated == (1 if kind == "queries" else 0)  # the one golden query over 512 tokens
    for item, (_, _, colbert) in zip(result.items, golden_items(golden, kind)):
        assert item.n_tokens == len(colbert) + 1  # one ColBERT row per token after CLS


def test_golden_covers_what_it_should(golden) -> None:
    # The golden file must keep exercising long documents and a truncated query.
    docs = np.diff(golden["documents_colbert_offsets"]) + 1
    queries = np.diff(golden["queries_colbert_offsets"]) + 1
    assert docs.max() > 2500 and (docs > 512).sum() >= 2 and docs.min() <= 4
    assert queries.max() == 512
    assert any(v.startswith("FlagEmbedding=") for v in golden["versions"].tolist())


def test_equals_live_flagembedding(f32: Encoder, flag) -> None:
    docs = flag.encode_corpus(LIVE_TEXTS, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    assert_close(f32.encode(LIVE_TEXTS, "documents", colbert=True).items, flag_items(docs), TOL)
    queries = flag.encode_queries(LIVE_TEXTS, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    ours = f32.encode(LIVE_TEXTS, "queries", colbert=True)
    assert ours.truncated >= 2  # two texts are over 512 tokens, so truncation is compared too
    assert_close(ours.items, flag_items(queries), TOL)


def test_equals_pymilvus_bgem3_embedding_function(f32: Encoder, tiny_model: Path) -> None:
    for name in ("FlagEmbedding", "peft", "datasets"):  # pymilvus would offer to pip-install a missing one
        pytest.importorskip(name)
    hybrid = pytest.importorskip("pymilvus.model.hybrid")
    ef = hybrid.BGEM3EmbeddingFunction(str(tiny_model), device="cpu", use_fp16=False, return_colbert_vecs=True,
                                       passage_max_length=8192)
    out = ef.encode_documents(LIVE_TEXTS)
    sparse = out["sparse"]
    references = [(out["dense"][i], dict(zip(sparse[[i]].indices.tolist(), sparse[[i]].data.tolist())),
                   out["colbert_vecs"][i]) for i in range(len(LIVE_TEXTS))]
    assert_close(f32.encode(LIVE_TEXTS, "documents", colbert=True).items, references, TOL)
    # pymilvus' encode_queries runs BGEM3FlagModel.encode, i.e. at passage_max_length: compare queries
    # that fit in 512 tokens, where that and our query limit agree.
    out = ef.encode_queries(SENTENCES)
    references = [(out["dense"][i], dict(zip(out["sparse"][[i]].indices.tolist(), out["sparse"][[i]].data.tolist())),
                   out["colbert_vecs"][i]) for i in range(len(SENTENCES))]
    assert_close(f32.encode(SENTENCES, "queries", colbert=True).items, references, TOL)
    assert ef.dim == {"dense": f32.info()["dims"]["dense"], "colbert_vecs": f32.info()["dims"]["colbert_vecs"],
                      "sparse": f32.info()["dims"]["sparse"]}


# ---- precision ---------------------------------------------------------------------------------------

def low_precision_cosines(f32: Encoder, low: Encoder, texts: list[str]) -> np.ndarray:
    a = np.stack([i.dense for i in f32.encode(texts).items])
    b = np.stack([i.dense for i in low.encode(texts).items])
    assert b.dtype == np.float32  # float32 out, whatever the compute dtype
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_bfloat16_close_to_float32(f32: Encoder, golden, tiny_model: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="worker.device"):
        bf16 = Encoder.load(str(tiny_model), device="cpu", dtype="bfloat16")
    assert bf16.info()["dtype"] == "bfloat16" and bf16.dtype == torch.bfloat16
    # On a CPU without bfloat16 instructions it is emulated, several times slower: the worker says so.
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert ("emulated" in caplog.text) == (not native), caplog.text
    texts = golden["documents_texts"].tolist() + LIVE_TEXTS
    cosines = low_precision_cosines(f32, bf16, texts)
    assert cosines.min() >= 0.99, dict(zip(texts, cosines.round(4)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 needs a CUDA device")
def test_float16_on_cuda_close_to_float32(f32: Encoder, golden, tiny_model: Path) -> None:
    fp16 = Encoder.load(str(tiny_model), device="cuda", dtype="float16")
    texts = golden["documents_texts"].tolist() + LIVE_TEXTS
    assert low_precision_cosines(f32, fp16, texts).min() >= 0.99


# ---- truncation ----------------------------------------------------------------------------------------

def test_raw_cls_equals_flagembeddings_unnormalized_dense(f32: Encoder, tiny_model: Path) -> None:
    # TEI's "normalize": false, through the same step as normalized jobs.
    flag_embedding = pytest.importorskip("FlagEmbedding")
    raw_flag = flag_embedding.BGEM3FlagModel(str(tiny_model), use_fp16=False, devices="cpu", query_max_length=512,
                                             normalize_embeddings=False)
    expected = raw_flag.encode_queries(LIVE_TEXTS, return_dense=True, return_sparse=False)["dense_vecs"]
    ours = f32.encode(LIVE_TEXTS, "queries", sparse=False, normalize=False).items
    assert max(float(np.abs(o.dense - e).max()) for o, e in zip(ours, expected)) <= TOL
    assert min(float(np.linalg.norm(o.dense)) for o in ours) > 1.5  # not unit vectors: really raw
    normalized = f32.encode(LIVE_TEXTS, "queries", sparse=False).items
    for raw, unit in zip(ours, normalized):
        np.testing.assert_allclose(raw.dense / np.linalg.norm(raw.dense), unit.dense, atol=SAME)


def test_left_truncation_equals_flagembedding_cutting_the_left(f32: Encoder, tiny_model: Path) -> None:
    flag_embedding = pytest.importorskip("FlagEmbedding")
    left = flag_embedding.BGEM3FlagModel(str(tiny_model), use_fp16=False, devices="cpu", query_max_length=512)
    left.tokenizer.truncation_side = "left"  # transformers' own switch: keep the last tokens
    expected = left.encode_queries(LIVE_TEXTS, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    ours = f32.encode(LIVE_TEXTS, "queries", colbert=True, truncation_side="left")
    assert ours.truncated >= 2
    assert_close(ours.items, flag_items(expected), TOL)
    right = f32.encode(LIVE_TEXTS, "queries", truncation_side="right").items
    cut = [i for i, item in enumerate(ours.items) if item.truncated]
    assert all(np.abs(ours.items[i].dense - right[i].dense).max() > 1e-3 for i in cut)  # really the other end


def test_left_truncation_keeps_the_last_tokens(limited: Encoder) -> None:
    text = " ".join(f"w{i}" for i in range(100))
    (kept,) = limited.prepare([text], "queries", truncation_side="left")
    ids = limited.tokenizer.encode([text])[0]
    assert kept.truncated and kept.ids == [limited.tokenizer.specials.cls, *ids[-30:], limited.tokenizer.specials.eos]
    (short,) = limited.prepare(["w1 w2"], "queries", truncation_side="left")
    assert not short.truncated and short.ids[1:-1] == limited.tokenizer.encode(["w1 w2"])[0]
    with pytest.raises(ValueError, match="truncation_side"):
        limited.prepare(["x"], "queries", truncation_side="middle")


def test_document_truncation_is_reported(limited: Encoder) -> None:
    texts = [words(62), words(63), words(200), "short"]  # limit 64 = CLS + 62 + EOS
    result = limited.encode(texts, "documents")
    assert [i.n_tokens for i in result.items] == [64, 64, 64, 3]
    assert [i.truncated for i in result.items] == [False, True, True, False]
    assert result.truncated == 2
    # Truncation keeps the first tokens and a closing EOS: the same as the text cut by hand.
    np.testing.assert_allclose(result.items[1].dense, result.items[0].dense, atol=SAME)


def test_query_truncation_at_512(f32: Encoder) -> None:
    texts = [words(510), words(511), words(900)]
    queries = f32.encode(texts, "queries")
    assert [i.n_tokens for i in queries.items] == [512, 512, 512]
    assert [i.truncated for i in queries.items] == [False, True, True]
    assert queries.truncated == 2
    documents = f32.encode(texts, "documents")  # the same texts fit a document
    assert [i.n_tokens for i in documents.items] == [512, 513, 902] and documents.truncated == 0


def test_max_length_override(f32: Encoder, limited: Encoder) -> None:
    short = f32.encode([words(300)], "documents", max_length=100)
    assert short.items[0].n_tokens == 100 and short.items[0].truncated and short.truncated == 1
    longer = limited.encode([words(300)], "queries", max_length=1024)  # above the configured 32
    assert longer.items[0].n_tokens == 302 and not longer.items[0].truncated and longer.truncated == 0
    with pytest.raises(ValueError, match="max_length"):
        f32.encode(["x"], "documents", max_length=1)


# ---- bad input -------------------------------------------------------------------------------------------

BAD = [
    pytest.param("", "empty", id="empty"),
    pytest.param(" \n\t\u3000 ", "whitespace", id="whitespace"),
    pytest.param(None, "NoneType", id="none"),
    pytest.param(b"bytes text", "bytes", id="bytes"),
    pytest.param(42, "int", id="int"),
    pytest.param(4.2, "float", id="float"),
    pytest.param({"text": "nested"}, "dict", id="dict"),
    pytest.param("before\x00after", "NUL", id="nul"),
    pytest.param("lone \ud800 surrogate", "surrogate", id="surrogate"),
    pytest.param("x" * 1001, "1,000", id="too-long"),  # limited's max_text_chars
]
GOOD = ["Die Warteschlange trennt Anfragen.", "查询和文档在不同的队列中传输。", words(40)]


@pytest.fixture(scope="module")
def good_alone(limited: Encoder) -> list[Embedding]:
    return [limited.encode([t], "documents", colbert=True).items[0] for t in GOOD]


@pytest.mark.parametrize(("bad", "names"), BAD)
def test_bad_item_rejected_alone(limited: Encoder, good_alone, bad: object, names: str) -> None:
    result = limited.encode([GOOD[0], bad, GOOD[1]], "documents", colbert=True)
    error = result.items[1]
    assert isinstance(error, ItemError) and names in error.reason, error
    assert_close([result.items[0], result.items[2]], [as_reference(good_alone[0]), as_reference(good_alone[1])], SAME)


def test_mixed_batch_of_good_and_bad(limited: Encoder, good_alone) -> None:
    bad = [p.values for p in BAD]
    batch: list[object] = []
    for i, (value, _) in enumerate(bad):  # good and bad interleaved
        batch += [GOOD[i % len(GOOD)], value]
    result = limited.encode(batch, "documents", colbert=True)
    assert len(result.items) == len(batch)
    for i, (value, names) in enumerate(bad):
        good, error = result.items[2 * i], result.items[2 * i + 1]
        assert isinstance(error, ItemError) and names in error.reason, (value, error)
        assert_close([good], [as_reference(good_alone[i % len(GOOD)])], SAME)
    assert result.tokens == sum(item.n_tokens for item in result.items if isinstance(item, Embedding))
    only_bad = limited.encode([v for v, _ in bad])
    assert all(isinstance(i, ItemError) for i in only_bad.items) and only_bad.tokens == 0


# ---- batching --------------------------------------------------------------------------------------------

def test_token_budget_splits_into_steps(f32: Encoder, tiny_model: Path, golden, monkeypatch) -> None:
    texts = LIVE_TEXTS + golden["documents_texts"].tolist()[:10]
    small = Encoder.load(str(tiny_model), dtype="float32", limits=Limits(max_batch_tokens=64))
    steps: list[int] = []
    run = small.run
    monkeypatch.setattr(small, "run", lambda step, *a, **k: steps.append(len(step)) or run(step, *a, **k))
    split = small.encode(texts, "documents", colbert=True)
    assert len(steps) > 3 and sum(steps) == len(texts)
    large = Encoder.load(str(tiny_model), dtype="float32", limits=Limits(max_batch_tokens=10**6))
    assert len(large.plan(large.prepare(texts, "documents"))) == 1  # one step: the reference
    whole = large.encode(texts, "documents", colbert=True)
    assert_close(split.items, [as_reference(i) for i in whole.items], SAME)
    # Input order: each item is its own text's (the tokenizer's count) and equals that text encoded alone.
    lengths = [len(ids) + 2 for ids in f32.tokenizer.encode(texts)]  # with CLS and EOS
    assert [i.n_tokens for i in split.items] == lengths
    for i in (0, len(texts) // 2, len(texts) - 1):
        assert_close([split.items[i]], [as_reference(f32.encode([texts[i]], colbert=True).items[0])], SAME)


def test_sliced_step_equals_the_whole_step(f32: Encoder, golden) -> None:
    # Document steps run in short slices with pauses between them (worker/slicing.py): the same numbers.
    texts = golden["documents_texts"].tolist() + [words(700), words(700), words(90)]
    prepared = f32.prepare(texts, "documents")
    pauses = []
    slicer = Slicer(lambda: pauses.append(1), target_s=1e-9, device=torch.device("cpu"))
    sliced = f32.run(prepared, colbert=True, slicer=slicer)
    assert len(pauses) > 3 * f32.model.config.num_hidden_layers  # within layers, not only between them
    assert_close(sliced, [as_reference(i) for i in f32.run(prepared, colbert=True)], SAME)
    assert_close(sliced, golden_items(golden, "documents") + [as_reference(i) for i in sliced[-3:]], TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_padded_attention_equals_per_run_attention(f32: Encoder, golden, kind: str, monkeypatch) -> None:
    # On CUDA a step's attention runs as one masked call over a padded batch (worker/model.py padding_for);
    # forced on here, it must give the golden numbers too.
    texts = golden[f"{kind}_texts"].tolist()
    per_run = f32.encode(texts, kind, colbert=True).items
    used = []
    monkeypatch.setattr(model_module, "PADDED_ATTENTION_ON", {"cpu"})
    monkeypatch.setattr(model_module, "PADDING_AT_MOST", float("inf"))
    monkeypatch.setattr(model_module, "padding_for", lambda *a: used.append(model_padding_for(*a)) or used[-1])
    padded = f32.encode(texts, kind, colbert=True).items
    assert any(p is not None for p in used), "no step ran with padded attention"
    assert_close(padded, [as_reference(i) for i in per_run], SAME)
    assert_close(padded, golden_items(golden, kind), TOL)


def test_cuda_forward_leaves_out_cudnn_attention() -> None:
    # cuDNN attention builds a graph per new shape (worker/model.py, CUDA_ATTENTION): a CUDA forward pass
    # runs with it switched off and the other kernels on; on other devices nothing changes.
    cuda = torch.backends.cuda
    before = (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled())
    with model_module.attention_kernels(torch.device("cuda")):
        assert not cuda.cudnn_sdp_enabled()
        assert cuda.flash_sdp_enabled() and cuda.mem_efficient_sdp_enabled() and cuda.math_sdp_enabled()
    with model_module.attention_kernels(torch.device("cpu")):
        assert (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled()) == before
    assert (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled()) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_steps_run_no_cudnn_attention_kernel(tiny_model: Path) -> None:
    fp16 = Encoder.load(str(tiny_model), device="cuda", dtype="float16")
    steps = [([words(n) for n in (3, 7, 12, 30)], "queries"), ([words(300)], "documents")]
    [fp16.encode(texts, kind) for texts, kind in steps]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        [fp16.encode(texts, kind) for texts, kind in steps]
    kernels = [e.key.lower() for e in prof.key_averages()]
    assert any(k in name for name in kernels for k in ("flash", "fmha", "attention", "softmax")), kernels
    assert not [name for name in kernels if "cudnn" in name]


def test_warm_up_runs_queries_and_a_long_document(f32: Encoder, monkeypatch) -> None:
    steps = []
    run = Encoder.run
    monkeypatch.setattr(Encoder, "run", lambda self, step, *a, **k: steps.append([len(p.ids) for p in step])
                        or run(self, step, *a, **k))
    assert f32.warm_up() > 0
    assert len(steps[0]) > 1 and len(set(steps[0])) > 1  # a step of queries of different lengths
    assert max(steps[-1]) >= model_module.CONTIGUOUS_FROM  # a document long enough for contiguous heads


def test_text_longer_than_budget_encodes_alone(tiny_model: Path) -> None:
    small = Encoder.load(str(tiny_model), dtype="float32", limits=Limits(max_batch_tokens=64))
    texts = ["short one", words(300), "another short one"]
    steps = small.plan([p for p in small.prepare(texts)])
    assert [len(s) for s in steps if any(len(p.ids) > 64 for p in s)] == [1]
    result = small.encode(texts)
    assert all(isinstance(i, Embedding) for i in result.items)
    assert result.items[1].n_tokens == 302 and not result.items[1].truncated


def test_output_selection(f32: Encoder) -> None:
    none = f32.encode(["hello"], dense=False, sparse=False, colbert=False).items[0]
    assert none.dense is None and none.sparse_ids is None and none.colbert is None
    full = f32.encode(["hello"], colbert=True).items[0]
    assert full.colbert.shape == (full.n_tokens - 1, f32.info()["dims"]["colbert_vecs"])
    np.testing.assert_allclose(np.linalg.norm(full.colbert, axis=1), 1.0, atol=1e-5)
    assert full.sparse_ids.dtype == np.int64 and full.sparse_weights.dtype == np.float32


# ---- loading ---------------------------------------------------------------------------------------------

@pytest.fixture
def checkpoint_copy(tiny_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "ckpt"))


def test_missing_head_is_an_error(checkpoint_copy: Path) -> None:
    (checkpoint_copy / "colbert_linear.pt").unlink()
    with pytest.raises(ModelLoadError, match="colbert_linear.pt"):
        Encoder.load(str(checkpoint_copy))


def test_mis_shaped_head_is_an_error(checkpoint_copy: Path, f32: Encoder) -> None:
    hidden = f32.info()["dims"]["dense"]
    torch.save(torch.nn.Linear(hidden + 1, 1).state_dict(), checkpoint_copy / "sparse_linear.pt")
    with pytest.raises(ModelLoadError, match=r"sparse_linear\.pt.*shape"):
        Encoder.load(str(checkpoint_copy))


@pytest.mark.parametrize(("device", "dtype", "match"), [
    ("cpu", "float8", "unknown dtype"),
    ("tpu", "float32", "unknown device"),
    ("cpu:x", "float32", "cpu"),
    ("cpu", "float16", "float16 is not supported on cpu"),
])
def test_bad_device_or_dtype(tiny_model: Path, device: str, dtype: str, match: str) -> None:
    with pytest.raises(DeviceError, match=match):
        Encoder.load(str(tiny_model), device=device, dtype=dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(tiny_model: Path) -> None:
    with pytest.raises(DeviceError, match="no CUDA"):
        Encoder.load(str(tiny_model), device="cuda:0")


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="M3Q_MODEL"):
        Encoder.load(str(tmp_path / "nowhere"))


def test_hub_id_offline_fails_fast(tmp_path: Path) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE and HF_HOME at import, so the check runs in a fresh process.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "M3Q_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    code = ("import sys\nfrom worker.encoder import Encoder\nfrom worker.model import ModelLoadError\n"
            "try:\n    Encoder.load('BAAI/bge-m3')\nexcept ModelLoadError as e:\n    print(e)\n    sys.exit(3)\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "M3Q_MODEL" in proc.stdout and "m3q replica" in proc.stdout and "BAAI/bge-m3" in proc.stdout


def test_replica_says_what_it_is(tiny_model: Path, checkpoint_copy: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="worker.encoder"):
        encoder = Encoder.load(str(tiny_model))
    assert encoder.info()["replica"] is True
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("REPLICA" in m and "random weights" in m for m in warnings), warnings
    # The marker file is what makes it a replica: without it, no warning and replica False.
    (checkpoint_copy / "m3q_replica.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="worker.encoder"):
        plain = Encoder.load(str(checkpoint_copy))
    assert plain.info()["replica"] is False
    assert not [r for r in caplog.records if "REPLICA" in r.getMessage()]


# ---- empty sparse ----------------------------------------------------------------------------------------

def test_unknown_characters_never_in_sparse(f32: Encoder, golden) -> None:
    tokenizer = f32.tokenizer
    text = "𓀀𓀁𓀂"  # hieroglyphs: not in the tiny vocabulary
    pieces = tokenizer.tokens(text)
    assert pieces == ["<s>", "▁", "<unk>", "</s>"]  # the tokenizer always prepends '▁'; the rest is <unk>
    items = f32.encode(golden["documents_texts"].tolist()).items
    specials = set(tokenizer.specials.unused)
    assert specials == {tokenizer.token_to_id(t) for t in ("<s>", "</s>", "<pad>", "<unk>")}
    assert not specials & {int(t) for i in items for t in i.sparse_ids}
    assert f32.encode([text]).items[0].sparse_dict().keys() == {tokenizer.token_to_id("▁")}


def test_empty_sparse_vector(f32: Encoder, golden) -> None:
    # With this tokenizer no text is <unk> alone ('▁' always comes first), so the text is one word whose
    # sparse weight is <= 0 followed by unknown characters; FlagEmbedding's golden output is empty too.
    text = "know𓀀𓀁"
    pieces = f32.tokenizer.tokens(text)
    assert pieces == ["<s>", "▁know", "<unk>", "</s>"]
    i = golden["documents_texts"].tolist().index(text)
    assert golden["documents_sparse_offsets"][i] == golden["documents_sparse_offsets"][i + 1]
    result: EncodeResult = f32.encode(["hello", text, "world"])
    item = result.items[1]
    assert isinstance(item, Embedding)
    assert item.sparse_ids.shape == (0,) and item.sparse_weights.shape == (0,) and item.sparse_dict() == {}
    assert item.sparse_ids.dtype == np.int64 and item.sparse_weights.dtype == np.float32
    assert np.isfinite(item.dense).all() and abs(float(np.linalg.norm(item.dense)) - 1) < 1e-5
    assert result.items[0].sparse_ids.size and result.items[2].sparse_ids.size  # neighbours unaffected
