"""BGE-M3's own rerank (dense + sparse + ColBERT): ``Client.compute_score`` and ``rerank``, ``m3q search --mode
m3`` and TEI's ``POST /rerank``, on real worker processes, a real gateway, real Redis and Milvus Lite.

The numbers are FlagEmbedding's: ``BGEM3FlagModel.compute_score`` run live in this process on the same
checkpoint (the tiny one and the real-layout fixture) is the reference, to 1e-5 for each of its five lists.
"""
from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from producer.client import Client
from producer.contract import wire
from producer.contract.errors import PayloadError
from producer.rerank import RERANK_WEIGHTS
from producer.search import M3Hit, Searcher
from tests.conftest import ROOT, GatewayProcess, WorkerProcess, make_settings, settings_env

TOL = 1e-5
CHECKPOINTS = {"tiny": ROOT / "tests" / "data" / "tiny-bge-m3", "real-layout": ROOT / "tests" / "data" / "real-layout"}
WORDS = ("vector database search queue worker dense sparse colbert passage query model token Redis Milvus "
         "Tokyo Japan capital river mountain sauce tomato garlic embedding retrieval rerank batch device").split()
WEIGHTS = [0.5, 0.3, 0.2]
DOCS = {"milvus-1": "Milvus is an open-source vector database built for similarity search.",
        "redis-1": "A Redis list can act as a simple queue: one side pushes, the other side pops.",
        "tokyo-1": "Tokyo is the capital of Japan and its largest city.",
        "cook-1": "A good tomato sauce needs ripe tomatoes, olive oil, garlic and a long, slow simmer.",
        "rerank-1": "BGE-M3 ranks passages with dense, sparse and ColBERT scores from one forward pass."}


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def mixed_pairs(seed: int = 28) -> list[tuple[str, str]]:
    """30 pairs of mixed lengths: queries from 1 word to over 512 tokens, passages from 1 word to over 8,192
    tokens; some queries repeat (a job encodes each once)."""
    rng = random.Random(seed)
    queries = [text(rng, n) for n in (1, 3, 8, 20, 60, 200, 700)]
    lengths = (1, 2, 5, 12, 40, 150, 400, 1200, 9000)
    return [(rng.choice(queries), text(rng, rng.choice(lengths))) for _ in range(30)]


def assert_equal_lists(got: dict, reference: dict) -> dict[str, float]:
    assert set(got) == set(reference) == set(wire.SCORE_LISTS)
    worst = {}
    for name in wire.SCORE_LISTS:
        assert len(got[name]) == len(reference[name])
        worst[name] = max(abs(a - b) for a, b in zip(got[name], reference[name]))
        assert worst[name] <= TOL, f"{name} differs by {worst[name]:.3g}: {worst}"
    return worst


# ---- fixtures -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flag_embedding():
    return pytest.importorskip("FlagEmbedding")  # not under transformers 5.x


@pytest.fixture(scope="module")
def settings(milvus_server):
    return make_settings(milvus_uri=milvus_server, rerank_candidates=4)


@pytest.fixture(scope="module")
def stack(settings, tmp_path_factory, redis_client):
    """A worker on each checkpoint (the tiny one also behind a gateway), started together."""
    logs = tmp_path_factory.mktemp("rerank")
    real = make_settings(model=str(CHECKPOINTS["real-layout"]))
    workers = {"tiny": WorkerProcess(settings, logs / "tiny.log"),
               "real-layout": WorkerProcess(real, logs / "real.log")}
    gateway = GatewayProcess(settings, logs / "gateway.log")
    try:
        for w in workers.values():
            w.wait_ready()
        yield {"clients": {name: Client(w.settings) for name, w in workers.items()}, "gateway": gateway.wait_ready()}
    finally:
        gateway.stop()
        for w in workers.values():
            w.stop()


@pytest.fixture(scope="module")
def client(stack) -> Client:
    return stack["clients"]["tiny"]


@pytest.fixture(scope="module")
def gateway(stack) -> GatewayProcess:
    return stack["gateway"]


def reference(flag_embedding, checkpoint: str, pairs, **options) -> dict:
    model = flag_embedding.BGEM3FlagModel(str(CHECKPOINTS[checkpoint]), use_fp16=False, devices="cpu",
                                          query_max_length=512, passage_max_length=8192)
    return model.compute_score(pairs, **options)


# ---- the numbers: FlagEmbedding's ---------------------------------------------------------------------------

@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_compute_score_equals_flagembedding_for_all_five_lists(stack, flag_embedding, checkpoint):
    """30 pairs up to 512 and 8,192 tokens, custom weights. FlagEmbedding's batch of 5 keeps its ColBERT
    tensor (pairs x query tokens x pairs x passage tokens) in memory; its padding rule is per batch."""
    client, pairs = stack["clients"][checkpoint], mixed_pairs()
    got = client.compute_score(pairs, weights=WEIGHTS, batch_size=5)
    want = reference(flag_embedding, checkpoint, pairs, batch_size=5, weights_for_different_modes=WEIGHTS)
    assert_equal_lists(got, want)
    assert got.cut and got.truncated >= 2  # a query over 512 tokens, passages over 8,192: cut as FlagEmbedding cuts
    assert all(isinstance(got[name], list) and len(got[name]) == 30 for name in wire.SCORE_LISTS)


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_defaults_one_pair_and_the_asyncio_twin_equal_flagembedding(stack, flag_embedding, checkpoint):
    """Default weights ([1, 1, 1]) and batch (256, one batch: short passages score ColBERT at least 0 per
    query token, as FlagEmbedding pads them), a pair alone (floats, not lists), and acompute_score."""
    client = stack["clients"][checkpoint]
    rng = random.Random(5)
    pairs = [(text(rng, rng.choice((2, 9, 30))), text(rng, rng.choice((1, 3, 10, 80, 300)))) for _ in range(30)]
    want = reference(flag_embedding, checkpoint, pairs)
    assert_equal_lists(client.compute_score(pairs), want)
    assert_equal_lists(asyncio.run(client.acompute_score(pairs)), want)
    one = client.compute_score(pairs[0], max_query_length=8, max_passage_length=16)
    single = reference(flag_embedding, checkpoint, pairs[0], max_query_length=8, max_passage_length=16)
    assert_equal_lists({k: [v] for k, v in one.items()}, {k: [v] for k, v in single.items()})


def test_a_query_is_encoded_once_per_call_and_only_scores_come_back(client):
    query = "which database stores vectors"
    passages = list(DOCS.values()) * 4  # repeated passages, too: each encoded once
    raw = client.call(wire.TASK_SCORE, {"queries": [query], "texts": list(DOCS.values()),
                                        "pairs": [[0, i % len(DOCS)] for i in range(len(passages))]})
    tokens = [item.n_tokens for item in client.encode_queries([query] + list(DOCS.values()), max_length=8192)]
    assert raw["tokens"] == sum(tokens)  # the query once, each passage once: not once per pair
    assert set(raw) == {"scores", "truncated", "cut", "tokens", "worker", "device", "model", "dtype"}
    assert all(isinstance(v, float) for name in wire.SCORE_LISTS for v in raw["scores"][name])
    scores = client.compute_score([(query, p) for p in passages])
    assert scores["colbert+sparse+dense"] == pytest.approx(raw["scores"]["colbert+sparse+dense"], abs=1e-6)


def test_a_celery_native_score_job_gets_the_same_answer(client):
    payload = {"queries": ["which database stores vectors"], "texts": list(DOCS.values()),
               "pairs": [[0, i] for i in range(len(DOCS))]}
    result = client.app.send_task(wire.TASK_SCORE, args=[payload], queue=wire.query_queue(client.settings))
    native, streamed = result.get(timeout=60)["scores"], client.call(wire.TASK_SCORE, payload)["scores"]
    assert set(native) == set(wire.SCORE_LISTS)
    for name in wire.SCORE_LISTS:
        assert native[name] == pytest.approx(streamed[name], abs=1e-6)


# ---- rerank: the Python call, TEI's route and TEI's clients -------------------------------------------------

def test_rerank_and_the_rerank_route_give_compute_scores_order_and_scores(client, gateway, flag_embedding):
    query, passages = "Which city is the capital of Japan?", list(DOCS.values())
    combined = client.compute_score([(query, p) for p in passages], RERANK_WEIGHTS)["colbert+sparse+dense"]
    want = reference(flag_embedding, "tiny", [(query, p) for p in passages],
                     weights_for_different_modes=list(RERANK_WEIGHTS))["colbert+sparse+dense"]
    assert max(abs(a - b) for a, b in zip(combined, want)) <= TOL
    order = sorted(range(len(passages)), key=lambda i: -combined[i])
    ranked = client.rerank(query, passages)
    assert [r.index for r in ranked] == order
    assert [r.score for r in ranked] == pytest.approx([combined[i] for i in order], abs=1e-6)
    top = client.rerank(query, passages, k=2)
    assert [r.index for r in top] == order[:2]
    assert [r.score for r in top] == pytest.approx([r.score for r in ranked[:2]], abs=1e-6)
    assert [r.index for r in asyncio.run(client.arerank(query, passages, k=3))] == order[:3]
    answer = httpx.post(gateway.url + "/rerank", json={"query": query, "texts": passages, "return_text": True,
                                                      "raw_scores": False}, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [h["index"] for h in body] == order
    assert [h["score"] for h in body] == pytest.approx([combined[i] for i in order], abs=1e-6)
    assert [h["text"] for h in body] == [passages[i] for i in order]
    assert "text" not in httpx.post(gateway.url + "/rerank", json={"query": query, "texts": passages}).json()[0]
    info = httpx.get(gateway.url + "/info").json()
    assert info["m3q"]["rerank"]["route"] == "/rerank" and info["model_type"] == {"embedding": {"pooling": "cls"}}


def test_teis_rerank_clients_work_unchanged(client, gateway):
    """Haystack's HuggingFaceTEIRanker and LlamaIndex's TEI rerank postprocessor, pointed at `m3q serve`."""
    query, passages = "Which city is the capital of Japan?", list(DOCS.values())
    order = [r.index for r in client.rerank(query, passages)]
    rankers = pytest.importorskip("haystack_integrations.components.rankers.huggingface_api")
    from haystack import Document

    docs = [Document(content=p) for p in passages]
    ranked = rankers.HuggingFaceTEIRanker(url=gateway.url, top_k=3, token=None).run(query=query, documents=docs)
    assert [d.content for d in ranked["documents"]] == [passages[i] for i in order[:3]]
    left = rankers.HuggingFaceTEIRanker(url=gateway.url, token=None).run(
        query=query, documents=docs, truncation_direction=rankers.ranker.TruncationDirection.LEFT)
    assert len(left["documents"]) == len(passages)
    tei = pytest.importorskip("llama_index.postprocessor.tei_rerank")
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

    nodes = [NodeWithScore(node=TextNode(text=p), score=0.0) for p in passages]
    reranker = tei.TextEmbeddingInference(base_url=gateway.url, top_n=3, model_name="m3q")
    out = reranker.postprocess_nodes(nodes, QueryBundle(query))
    assert [n.node.get_content() for n in out] == [passages[i] for i in order[:3]]


# ---- bad input ----------------------------------------------------------------------------------------------

def test_a_bad_pair_is_refused_naming_it(client, gateway):
    with pytest.raises(PayloadError, match=r"pair 2: its passage: text is empty or whitespace only"):
        client.compute_score([("q", "a"), ("q", "b"), ("q", "  ")])
    with pytest.raises(PayloadError, match=r"pair 1: must be \(query, passage\)"):
        client.compute_score([("q", "a"), ("only one",)])
    with pytest.raises(PayloadError, match=r"pair 0: its query: text must be a string"):
        client.compute_score([(None, "a")])
    with pytest.raises(PayloadError, match=r"pair 1: its passage: text is empty"):  # the worker checks too
        client.call(wire.TASK_SCORE, {"queries": ["q"], "texts": ["a", ""], "pairs": [[0, 0], [0, 1]]})
    with pytest.raises(PayloadError, match=r"pair 0: must be \[query index, text index\]"):
        client.call(wire.TASK_SCORE, {"queries": ["q"], "texts": ["a"], "pairs": [[0, 3]]})
    answer = httpx.post(gateway.url + "/rerank", json={"query": "q", "texts": ["fine", ""]})
    assert answer.status_code == 422 and "texts[1]: text is empty" in answer.json()["error"], answer.text
    long = httpx.post(gateway.url + "/rerank", json={"query": "q", "texts": ["fine", text(random.Random(1), 9000)]})
    assert long.status_code == 413 and "texts[1]" in long.json()["error"], long.text
    cut = httpx.post(gateway.url + "/rerank", json={"query": "q", "texts": ["fine", text(random.Random(1), 9000)],
                                                    "truncate": True})
    assert cut.status_code == 200 and len(cut.json()) == 2


# ---- search --mode m3 ---------------------------------------------------------------------------------------

def test_search_mode_m3_finds_each_documents_own_text_first(client, gateway, settings):
    collection = "t_m3_" + uuid.uuid4().hex[:10]
    report = client.index(collection, list(DOCS.values()), list(DOCS))
    assert report.stored == len(DOCS)
    searcher = Searcher(settings, client=client)
    for doc_id, doc in DOCS.items():
        proc = subprocess.run([sys.executable, "-m", "producer.cli", "search", doc, "--collection", collection,
                               "--mode", "m3", "--k", "3"], capture_output=True, text=True, cwd=ROOT,
                              env=settings_env(settings), timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        first = proc.stdout.splitlines()[0]
        assert f"  {doc_id}  " in first and "colbert" in first, proc.stdout
        hits = searcher.search(doc, collection, mode="m3", k=3)
        assert isinstance(hits[0], M3Hit) and hits[0].id == doc_id and len(hits) == 3
    # the hit's scores are compute_score's for (query, stored text) over the N recalled (N=4: settings)
    query = DOCS["tokyo-1"]
    hits = searcher.search(query, collection, mode="m3", k=4)
    scores = client.compute_score([(query, h.text) for h in hits], RERANK_WEIGHTS)
    for hit, total, dense in zip(hits, scores["colbert+sparse+dense"], scores["dense"]):
        assert hit.score == pytest.approx(total, abs=1e-6) and hit.dense == pytest.approx(dense, abs=1e-6)
    body = httpx.post(gateway.url + "/v1/search", json={"query": query, "collection": collection, "mode": "m3",
                                                        "k": 2}, timeout=60).json()
    assert [h["id"] for h in body["hits"]] == [h.id for h in hits[:2]]
    assert {"dense", "sparse", "colbert"} <= set(body["hits"][0])
    searcher.close()


def test_the_docs_name_the_route_and_the_setting():
    page = (ROOT / "docs" / "rerank.md").read_text()
    for needle in ("compute_score", "rerank", "/rerank", "M3Q_RERANK_CANDIDATES", "--mode m3", "0.4"):
        assert needle in page, needle
    assert Path(ROOT / "bench" / "rerank.py").exists()
