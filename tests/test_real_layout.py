"""A checkpoint laid out exactly like BAAI/bge-m3 (tests/data/real-layout*, written by tests/make_real_layout.py):
`m3q encode --local` gives FlagEmbedding's numbers on it, for both forms of tokenizer.json, under any
transformers.

The worker tokenizes with the checkpoint's tokenizer.json through the ``tokenizers`` library, so its token
ids must equal ``tokenizers.Tokenizer.from_file`` run directly, and its numbers FlagEmbedding's, frozen in
tests/data/real-layout-golden.npz (written under transformers 4.57). These tests import neither
transformers nor FlagEmbedding, so they run in a transformers 5.x venv too (.ci/run); the comparison with a
live FlagEmbedding skips where it does not import.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from worker.encoder import Encoder
from worker.model import CHECKPOINT_FILES, ModelLoadError

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
FORMS = {"current": DATA / "real-layout", "older": DATA / "real-layout-older"}
GOLDEN = DATA / "real-layout-golden.npz"
KINDS = {"documents": 8192, "queries": 512}
TOL = 1e-5
# Every file of BAAI/bge-m3 the fixture carries: all but the README, the images and the ONNX export.
BGE_M3_FILES = {
    "config.json", "pytorch_model.bin", "sentencepiece.bpe.model", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "colbert_linear.pt", "sparse_linear.pt", "1_Pooling/config.json", "modules.json",
    "config_sentence_transformers.json", "sentence_bert_config.json",
}
# BAAI/bge-m3's file list on the hub (what `snapshot_download` chooses from).
BGE_M3_HUB_FILES = sorted(BGE_M3_FILES | {
    ".gitattributes", "README.md", "long.jpg", "imgs/bm25.jpg", "imgs/long.jpg", "imgs/miracl.jpg",
    "imgs/mkqa.jpg", "imgs/nqa.jpg", "imgs/others.webp", "onnx/Constant_7_attr__value", "onnx/config.json",
    "onnx/model.onnx", "onnx/model.onnx_data", "onnx/sentencepiece.bpe.model", "onnx/special_tokens_map.json",
    "onnx/tokenizer.json", "onnx/tokenizer_config.json",
})

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cli_encode import jsonl, m3q  # noqa: E402 - the same `m3q` runner


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def texts(golden) -> list[str]:
    """The fixture's texts: tricky whitespace and characters, and a document over 8192 tokens last."""
    return golden["current_queries_texts"].tolist()


@pytest.fixture(scope="module")
def encoders() -> dict[str, Encoder]:
    return {form: Encoder.load(str(folder), device="cpu", dtype="float32") for form, folder in FORMS.items()}


@pytest.fixture(scope="module")
def m3q_runs(texts) -> dict[tuple[str, str], subprocess.CompletedProcess]:
    """`m3q encode --local --colbert` on each form and kind, once for the module."""
    rows = jsonl([{"text": t, "id": i} for i, t in enumerate(texts)])
    return {(form, kind): m3q(["encode", "--local", "--model", str(folder), "--kind", kind, "--colbert"], rows)
            for form, folder in FORMS.items() for kind in KINDS}


def lines(proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def golden_items(g: dict[str, np.ndarray], form: str, kind: str) -> list[tuple]:
    """(dense, {id: weight}, colbert or None) per text; the >8192-token document has no ColBERT rows."""
    p = f"{form}_{kind}_"
    so, co = g[p + "sparse_offsets"], g[p + "colbert_offsets"]
    items = [(g[p + "dense"][i], dict(zip(g[p + "sparse_ids"][so[i]:so[i + 1]].tolist(),
                                         g[p + "sparse_weights"][so[i]:so[i + 1]].tolist())),
              g[p + "colbert"][co[i]:co[i + 1]]) for i in range(len(g[p + "texts"]))]
    if kind == "documents":
        items.append((g[f"{form}_long_dense"], dict(zip(g[f"{form}_long_sparse_ids"].tolist(),
                                                        g[f"{form}_long_sparse_weights"].tolist())), None))
    return items


def assert_line_equals(line: dict, dense: np.ndarray, sparse: dict[int, float], colbert, where: str) -> None:
    """One `m3q encode` output line against a reference: same sparse ids, every number within TOL."""
    got = {int(k): v for k, v in line["sparse"].items()}
    assert sorted(got) == sorted(sparse), f"{where}: sparse ids differ: {sorted(set(got) ^ set(sparse))[:10]}"
    assert max((abs(got[k] - w) for k, w in sparse.items()), default=0.0) <= TOL, where
    assert np.abs(np.array(line["dense"], np.float32) - dense).max() <= TOL, where
    if colbert is not None:
        rows = np.array(line["colbert"], np.float32)
        assert rows.shape == np.asarray(colbert).shape, f"{where}: ColBERT rows {rows.shape} != {np.shape(colbert)}"
        assert np.abs(rows - colbert).max() <= TOL, where


# ---- the fixture is what it claims to be ------------------------------------------------------------------

@pytest.mark.parametrize("form", FORMS)
def test_fixture_is_laid_out_like_bge_m3(form: str) -> None:
    folder = FORMS[form]
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert files == BGE_M3_FILES  # no safetensors: the transformer is in pytorch_model.bin only
    assert zipfile.is_zipfile(folder / "pytorch_model.bin")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert {"pooler.dense.weight", "embeddings.word_embeddings.weight"} <= set(state)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["XLMRobertaModel"]
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "XLMRobertaTokenizer"
    tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    steps = [n["type"] for n in tokenizer["normalizer"]["normalizers"]]
    assert steps == (["Precompiled", "Strip", "Replace"] if form == "current" else ["Precompiled", "Replace"])
    assert tokenizer["pre_tokenizer"]["type"] == "Metaspace"
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 3_000_000


def test_fixture_covers_what_it_should(texts, golden) -> None:
    # Issue 12's texts; and the two forms of tokenizer.json tokenize some of them differently.
    for needle in ("\u0085", "\u2581", "  <mask>", "\r\n", "\uff21", "\ufb01"):
        assert any(needle in t for t in texts), needle
    assert any(t.endswith(" ") for t in texts) and any(t.endswith("\n") for t in texts)
    assert any(t.startswith("   ") for t in texts)
    raw = {form: Tokenizer.from_file(str(folder / "tokenizer.json")) for form, folder in FORMS.items()}
    assert len(raw["current"].encode(texts[-1]).ids) > 8192
    differ = [t for t in texts if raw["current"].encode(t).ids != raw["older"].encode(t).ids]
    assert len(differ) >= 3, differ
    assert any(v.startswith("transformers=4.") for v in golden["versions"].tolist())


# ---- token ids: tokenizer.json itself, under any transformers ----------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", FORMS)
def test_token_ids_equal_tokenizers_library(encoders, texts, form: str, kind: str) -> None:
    raw = Tokenizer.from_file(str(FORMS[form] / "tokenizer.json"))
    limit = KINDS[kind]
    truncating = Tokenizer.from_file(str(FORMS[form] / "tokenizer.json"))
    truncating.enable_truncation(max_length=limit)  # the post-processor's <s> ... </s> inside the limit
    prepared = encoders[form].prepare(texts, kind)
    for text, p in zip(texts, prepared):
        assert p.ids == truncating.encode(text).ids, repr(text[:60])
        assert p.truncated == (len(raw.encode(text).ids) > limit), repr(text[:60])
    assert [p.truncated for p in prepared] == [False] * (len(texts) - 1) + [True]


def test_special_tokens_come_from_the_checkpoint(encoders) -> None:
    specials = encoders["current"].tokenizer.specials
    raw = Tokenizer.from_file(str(FORMS["current"] / "tokenizer.json"))
    assert (specials.cls, specials.eos, specials.pad, specials.unk) == (0, 2, 1, 3)
    assert specials.mask == raw.token_to_id("<mask>") == raw.get_vocab_size() - 1


# ---- the numbers: m3q encode --local against FlagEmbedding ---------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", FORMS)
def test_m3q_encode_equals_golden_flagembedding(m3q_runs, golden, texts, form: str, kind: str) -> None:
    proc = m3q_runs[form, kind]
    out = lines(proc)
    assert [o["id"] for o in out] == list(range(len(texts)))
    for i, (line, reference) in enumerate(zip(out, golden_items(golden, form, kind))):
        assert_line_equals(line, *reference, where=f"{form} {kind} text {i} {texts[i][:30]!r}")
    assert f"1 text(s) truncated to {KINDS[kind]} tokens" in proc.stderr


@pytest.mark.parametrize("form", FORMS)
def test_m3q_encode_equals_live_flagembedding(m3q_runs, golden, texts, form: str) -> None:
    flag_embedding = pytest.importorskip("FlagEmbedding")  # not under transformers 5.x
    model = flag_embedding.BGEM3FlagModel(str(FORMS[form]), use_fp16=False, devices="cpu",
                                          passage_max_length=8192, query_max_length=512)
    for kind, limit in KINDS.items():
        run = model.encode_corpus if kind == "documents" else model.encode_queries
        # The short texts in one padded batch, the long one alone (padded to 8192 with the others, the
        # reference's attention would need tens of GB).
        refs = [run(part, max_length=limit, return_dense=True, return_sparse=True, return_colbert_vecs=True)
                for part in (texts[:-1], texts[-1:])]
        ref = {k: [*refs[0][k], *refs[1][k]] for k in ("dense_vecs", "lexical_weights", "colbert_vecs")}
        for i, line in enumerate(lines(m3q_runs[form, kind])):
            sparse = {int(k): float(v) for k, v in ref["lexical_weights"][i].items()}
            assert_line_equals(line, ref["dense_vecs"][i], sparse, ref["colbert_vecs"][i], f"{form} {kind} {i}")
        # The frozen golden is this FlagEmbedding's output (it still describes the fixture).
        for i, (dense, _, _) in enumerate(golden_items(golden, form, kind)):
            assert np.abs(dense - ref["dense_vecs"][i]).max() <= TOL


# ---- what a checkpoint lacks, or cannot be read ----------------------------------------------------------------

@pytest.fixture
def copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FORMS["current"], tmp_path / "ckpt"))


def assert_one_line_error(folder: Path, *needles: str) -> str:
    proc = m3q(["encode", "--local", "--model", str(folder)], jsonl([{"text": "hello"}]))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    return proc.stderr


def test_sentencepiece_only_is_a_clear_error(copy: Path) -> None:
    (copy / "tokenizer.json").unlink()  # sentencepiece.bpe.model stays: never tokenized from it
    assert_one_line_error(copy, "no tokenizer.json", "sentencepiece.bpe.model")


def test_post_processor_without_cls_is_a_clear_error(copy: Path) -> None:
    raw = json.loads((copy / "tokenizer.json").read_text(encoding="utf-8"))
    raw["post_processor"] = None  # the reference would then add no <s> ... </s>
    (copy / "tokenizer.json").write_text(json.dumps(raw), encoding="utf-8")
    assert_one_line_error(copy, "post-processor", "'<s>'")


def test_torch_weights_not_a_zip_say_so(copy: Path) -> None:
    state = torch.load(copy / "pytorch_model.bin", weights_only=True)
    torch.save(state, copy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert_one_line_error(copy, "pytorch_model.bin", "not a torch zip archive")


def test_truncated_weights_say_so(copy: Path) -> None:
    data = (copy / "pytorch_model.bin").read_bytes()
    (copy / "pytorch_model.bin").write_bytes(data[: len(data) // 2])  # a download cut short
    message = assert_one_line_error(copy, "pytorch_model.bin")
    assert "cannot read the weights" in message or "not a torch zip archive" in message
    assert "do not match config.json" not in message


def test_unreadable_safetensors_say_so(copy: Path) -> None:
    (copy / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    message = assert_one_line_error(copy, "model.safetensors", "cannot read the weights")
    assert "do not match config.json" not in message


def test_special_tokens_named_in_the_files_win(copy: Path) -> None:
    # special_tokens_map.json over tokenizer_config.json, as transformers reads them; names are looked up
    # in tokenizer.json. Renamed here to tokens the post-processor does not add: refused, not ignored.
    raw = json.loads((copy / "special_tokens_map.json").read_text())
    raw["cls_token"] = raw["bos_token"] = "</s>"
    (copy / "special_tokens_map.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="post-processor"):
        Encoder.load(str(copy))
    raw["cls_token"] = raw["bos_token"] = "<nowhere>"
    (copy / "special_tokens_map.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="'<nowhere>' .cls. is not in tokenizer.json"):
        Encoder.load(str(copy))


def test_special_tokens_without_config_files(copy: Path) -> None:
    # Neither file: the added special tokens of XLM-R's names in tokenizer.json (transformers' defaults).
    (copy / "tokenizer_config.json").unlink()
    (copy / "special_tokens_map.json").unlink()
    specials = Encoder.load(str(copy)).tokenizer.specials
    assert (specials.cls, specials.eos, specials.pad, specials.unk, specials.mask) == (0, 2, 1, 3, 1876)
    raw = json.loads((copy / "tokenizer.json").read_text(encoding="utf-8"))
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] != "<s>"]
    (copy / "tokenizer.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(ModelLoadError, match="cls_token"):
        Encoder.load(str(copy))


# ---- the hub ------------------------------------------------------------------------------------------------

def test_hub_fetches_only_what_the_worker_reads() -> None:
    # The same filter snapshot_download applies: no onnx/*.json, no 1_Pooling/, no images.
    from huggingface_hub.utils import filter_repo_objects

    chosen = set(filter_repo_objects(BGE_M3_HUB_FILES, allow_patterns=CHECKPOINT_FILES))
    assert chosen == {"config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "colbert_linear.pt", "sparse_linear.pt"}


def hub_cache(home: Path, commit: str, files: dict[str, Path]) -> None:
    """``home`` as HF_HOME with BAAI/bge-m3 in its cache at ``commit`` (``main``), as a download leaves it."""
    repo = home / "hub" / "models--BAAI--bge-m3"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, source in files.items():
        target = repo / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def test_prefetched_hub_cache_serves_an_offline_worker(tmp_path: Path, m3q_runs, texts) -> None:
    # getting-started.md, "Models": the files `hf download` fetches, then HF_HUB_OFFLINE=1. The weights are looked up
    # at the snapshot's commit; pytorch_model.bin only (no safetensors), as BAAI/bge-m3 has it.
    folder = FORMS["older"]
    hub_cache(tmp_path / "hf", "0" * 40, {n: folder / n for n in [*CHECKPOINT_FILES, "pytorch_model.bin"]})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "M3Q_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "producer.cli", "encode", "--local", "--model", "BAAI/bge-m3",
                           "--kind", "queries", "--colbert"], input=jsonl([{"text": t} for t in texts[:-1]]),
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=180)
    local = lines(m3q_runs["older", "queries"])
    for i, line in enumerate(lines(proc)):
        assert_line_equals(line, np.array(local[i]["dense"], np.float32),
                           {int(k): v for k, v in local[i]["sparse"].items()}, local[i]["colbert"], f"text {i}")


class FakeHub(http.server.BaseHTTPRequestHandler):
    """The few Hugging Face hub endpoints that snapshot_download and hf_hub_download use, on 127.0.0.1.

    ``commits`` maps a commit to its files; ``main`` moves to ``next_main`` right after the first time it
    is resolved, as a push between two downloads would.
    """

    commits: dict[str, dict[str, bytes]] = {}
    main = next_main = ""
    requested: list[str] = []

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        path = urllib.parse.unquote(self.path.split("?")[0])
        if path.startswith("/api/models/BAAI/bge-m3/revision/"):
            commit = self._resolve(path.rsplit("/", 1)[1])
            info = {"id": "BAAI/bge-m3", "modelId": "BAAI/bge-m3", "sha": commit, "private": False,
                    "siblings": [{"rfilename": name} for name in sorted(self.commits[commit])]}
            return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
        if path.startswith("/api/models/BAAI/bge-m3/tree/"):  # newer huggingface_hub lists files here
            files = self.commits[self._resolve(path.split("/tree/", 1)[1].split("/")[0])]
            tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in sorted(files.items())]
            return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
        prefix = "/BAAI/bge-m3/resolve/"
        if not path.startswith(prefix):
            return self._send(404, b"", {"X-Error-Code": "RepoNotFound"}, body)
        revision, name = path[len(prefix):].split("/", 1)
        commit = self._resolve(revision)
        self.requested.append(f"{self.command} {name}")
        data = self.commits[commit].get(name)
        if data is None:
            return self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, body)
        etag = '"' + hashlib.sha256(data).hexdigest() + '"'
        self._send(200, data, {"X-Repo-Commit": commit, "ETag": etag, "Content-Type": "application/octet-stream"},
                   body)

    def _resolve(self, revision: str) -> str:
        if revision != "main":
            return revision
        commit, FakeHub.main = FakeHub.main, FakeHub.next_main  # main moves once it has been read
        return commit

    def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture
def fake_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_first_download_fetches_one_commit_and_only_what_the_worker_reads(tmp_path: Path, fake_hub: str,
                                                                          m3q_runs, texts) -> None:
    folder = FORMS["current"]
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    files.update({"onnx/config.json": files["config.json"], "onnx/tokenizer.json": files["tokenizer.json"],
                  "onnx/model.onnx": b"\0" * 1000, "README.md": b"# bge-m3\n"})
    # The next commit's weights differ: a worker that fetched them for the first commit's snapshot would mix.
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["embeddings.word_embeddings.weight"] = state["embeddings.word_embeddings.weight"].flip(0)
    newer = tmp_path / "newer.bin"
    torch.save(state, newer)
    first, second = "1" * 40, "2" * 40
    FakeHub.commits = {first: files, second: {**files, "pytorch_model.bin": newer.read_bytes()}}
    FakeHub.main, FakeHub.next_main, FakeHub.requested = first, second, []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "M3Q_"))}
    env.update(HF_ENDPOINT=fake_hub, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "producer.cli", "encode", "--local", "--model", "BAAI/bge-m3",
                           "--kind", "queries", "--colbert"], input=jsonl([{"text": t} for t in texts[:5]]),
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=180)
    local = lines(m3q_runs["current", "queries"])
    for i, line in enumerate(lines(proc)):  # the first commit's numbers
        assert_line_equals(line, np.array(local[i]["dense"], np.float32),
                           {int(k): v for k, v in local[i]["sparse"].items()}, local[i]["colbert"], f"text {i}")
    fetched = {r.split(" ", 1)[1] for r in FakeHub.requested if r.startswith("GET")}
    assert fetched == {*CHECKPOINT_FILES, "pytorch_model.bin"}, FakeHub.requested
