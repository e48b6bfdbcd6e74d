"""The client libraries people point at TEI or an OpenAI-compatible server, against a real `m3q serve`.

Each library runs unchanged, with the settings its page in docs/clients/ gives, against a real gateway and
worker: its vectors must be ``Client.encode_queries``' (the same worker, so equal to 1e-6, in practice bit for
bit), for 3 texts and for 100. One gateway requires a key; a second one on the same queues has none, for the
clients that cannot send a key (pymilvus' ``TEIEmbeddingFunction``).
"""
from __future__ import annotations

import dataclasses
import os
import uuid

import httpx
import numpy as np
import openai
import pytest

from producer.client import Client
from producer.contract.settings import Settings
from producer.contract.wire import Embedding
from tests.conftest import TINY, GatewayProcess, WorkerProcess, make_settings

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")  # no telemetry calls from the tests
KEY = "client-key-" + uuid.uuid4().hex
QUERY_MAX_LENGTH = 64
MODEL = TINY.name  # what the gateway calls a local checkpoint: its folder's name
THREE = ["What is a vector database?", "Die Hauptstadt von Japan ist Tokio.", "hybrid search with sparse vectors"]
HUNDRED = [f"document {i}: {' '.join(['queue', 'vector', 'milvus', 'redis', 'worker'][: 1 + i % 5])} #{i * 7}"
           for i in range(100)]
SAME = 1e-6


@pytest.fixture(scope="module")
def settings(milvus_server) -> Settings:
    return make_settings(milvus_uri=milvus_server, api_keys=KEY, query_max_length=QUERY_MAX_LENGTH)


@pytest.fixture(scope="module")
def stack(settings, tmp_path_factory):
    """A worker, a gateway with a key and one without, on the same queues."""
    logs = tmp_path_factory.mktemp("clients")
    worker = WorkerProcess(settings, logs / "worker.log")
    keyed = GatewayProcess(settings, logs / "keyed.log")
    open_ = GatewayProcess(dataclasses.replace(settings, api_keys=""), logs / "open.log")
    try:
        worker.wait_ready()
        yield {"keyed": keyed.wait_ready().url, "open": open_.wait_ready().url}
    finally:
        keyed.stop()
        open_.stop()
        worker.stop()


@pytest.fixture(scope="module")
def url(stack) -> str:
    return stack["keyed"]


@pytest.fixture(scope="module")
def client(settings, stack) -> Client:
    return Client(settings)


def expected(client: Client, texts: list[str], **options) -> np.ndarray:
    return np.stack([item.dense for item in client.encode_queries(texts, sparse=False, **options)])


def assert_same(got, want: np.ndarray) -> None:
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape
    # Float32 rounding of the same forward pass in another batch: within SAME of the vector's scale (a raw
    # CLS state is not unit length).
    assert float(np.abs(got - want).max()) <= SAME * max(1.0, float(np.abs(want).max()))


TEXTS = pytest.mark.parametrize("texts", [THREE, HUNDRED], ids=["3", "100"])


# ---- OpenAI's API: the openai client, LangChain, LlamaIndex, pymilvus ------------------------------------------

@TEXTS
def test_openai(url, client, texts):
    oai = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    answer = oai.embeddings.create(model="bge-m3", input=texts)  # the client's default: base64
    assert_same([d.embedding for d in answer.data], expected(client, texts))


@TEXTS
def test_langchain_openai_embeddings(url, client, texts):
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(model="bge-m3", base_url=url + "/v1", api_key=KEY,
                                  check_embedding_ctx_length=False)
    assert_same(embeddings.embed_documents(texts), expected(client, texts))
    assert_same([embeddings.embed_query(texts[0])], expected(client, texts[:1]))


def test_langchain_with_its_token_arrays_is_told_the_fix(url):
    # OpenAIEmbeddings' default tokenizes with tiktoken and sends token ids; asked with ids, the gateway
    # names the setting that sends texts.
    answer = httpx.post(url + "/v1/embeddings", json={"input": [[9906, 1917]], "model": "bge-m3"},
                        headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert answer.status_code == 422 and "check_embedding_ctx_length=False" in answer.json()["message"]


@TEXTS
@pytest.mark.parametrize("kind", ["OpenAIEmbedding", "OpenAILikeEmbedding"])
def test_llamaindex(url, client, texts, kind):
    if kind == "OpenAIEmbedding":
        from llama_index.embeddings.openai import OpenAIEmbedding as Embedder
    else:
        from llama_index.embeddings.openai_like import OpenAILikeEmbedding as Embedder
    embedder = Embedder(model_name="bge-m3", api_base=url + "/v1", api_key=KEY, max_retries=0)
    assert_same(embedder.get_text_embedding_batch(texts), expected(client, texts))
    assert_same([embedder.get_query_embedding(texts[0])], expected(client, texts[:1]))


@TEXTS
def test_pymilvus_openai_embedding_function(url, client, texts):
    from pymilvus.model.dense import OpenAIEmbeddingFunction

    ef = OpenAIEmbeddingFunction(model_name="bge-m3", api_key=KEY, base_url=url + "/v1", dimensions=32)
    assert_same(ef.encode_documents(texts), expected(client, texts))
    assert_same(ef.encode_queries(texts[:1]), expected(client, texts[:1]))
    assert ef.dim == 32


@TEXTS
def test_pymilvus_tei_embedding_function_on_a_keyless_gateway(stack, client, texts):
    from pymilvus.model.dense import TEIEmbeddingFunction

    ef = TEIEmbeddingFunction(api_url=stack["open"])  # it posts to /v1/embeddings and cannot send a key
    assert_same(ef.encode_documents(texts), expected(client, texts))
    assert ef.dim == 32


def test_pymilvus_tei_embedding_function_gets_a_readable_error(stack):
    from pymilvus.model.dense import TEIEmbeddingFunction

    with pytest.raises(RuntimeError, match=r"input\[1\]: text is empty"):  # not KeyError('message')
        TEIEmbeddingFunction(api_url=stack["open"]).encode_documents(["fine", ""])


def test_openai_model_list_and_lookup(url):
    oai = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    (model,) = oai.models.list().data
    assert model.id == MODEL and model.object == "model" and model.owned_by == "m3-queue"
    assert oai.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError, match="not served here"):
        oai.models.retrieve("text-embedding-3-small")


def test_milvus_lite_openai_text_embedding_function(url, client, milvus_server):
    # Milvus Lite's TEXTEMBEDDING function with its OpenAI provider, pointed at the gateway: Milvus embeds
    # inserted texts and search texts itself.
    from pymilvus import DataType, Function, FunctionType, MilvusClient

    milvus = MilvusClient(milvus_server)
    name = f"fn_{uuid.uuid4().hex[:8]}"
    schema = milvus.create_schema()
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("text", DataType.VARCHAR, max_length=1000)
    schema.add_field("dense", DataType.FLOAT_VECTOR, dim=32)
    schema.add_function(Function(
        name="m3q", function_type=FunctionType.TEXTEMBEDDING, input_field_names=["text"],
        output_field_names=["dense"], params={"provider": "openai", "model_name": "bge-m3",
                                              "base_url": url + "/v1", "api_key": KEY, "dimensions": 32}))
    index = milvus.prepare_index_params()
    index.add_index("dense", index_type="FLAT", metric_type="IP")
    milvus.create_collection(name, schema=schema, index_params=index)
    try:
        milvus.insert(name, [{"id": i, "text": t} for i, t in enumerate(THREE)])
        stored = milvus.query(name, filter="id >= 0", output_fields=["id", "dense"])
        assert_same([r["dense"] for r in sorted(stored, key=lambda r: r["id"])], expected(client, THREE))
        (hits,) = milvus.search(name, [THREE[1]], anns_field="dense", limit=1, output_fields=["text"])
        assert hits[0]["entity"]["text"] == THREE[1]
    finally:
        milvus.drop_collection(name)


# ---- TEI's API: huggingface_hub, Haystack, Milvus' TEI function ---------------------------------------------------

@TEXTS
def test_huggingface_hub_inference_client(url, client, texts):
    from huggingface_hub import InferenceClient

    hf = InferenceClient(model=url, token=KEY)  # posts to POST /, as to TEI
    assert_same([hf.feature_extraction(t)[0] for t in texts], expected(client, texts))  # its defaults
    assert_same(hf.feature_extraction(texts, normalize=False), expected(client, texts, normalize=False))


def test_huggingface_hub_errors_are_readable(url):
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError, match=r"inputs\[0\]: text is empty"):
        InferenceClient(model=url, token=KEY).feature_extraction(" ")


@TEXTS
def test_haystack_text_and_document_embedders(url, client, texts):
    from haystack import Document
    from haystack.utils import Secret
    from haystack_integrations.components.embedders.huggingface_api import (
        HuggingFaceAPIDocumentEmbedder,
        HuggingFaceAPITextEmbedder,
    )

    api = {"api_type": "text_embeddings_inference", "api_params": {"url": url}, "token": Secret.from_token(KEY)}
    raw = expected(client, texts, normalize=False)  # Haystack's default is "normalize": false
    assert_same([HuggingFaceAPITextEmbedder(**api).run(t)["embedding"] for t in texts[:3]], raw[:3])
    documents = HuggingFaceAPIDocumentEmbedder(**api).run([Document(content=t) for t in texts])["documents"]
    assert_same([d.embedding for d in documents], raw)
    unit = HuggingFaceAPIDocumentEmbedder(**api, normalize=True).run([Document(content=t) for t in texts])
    assert_same([d.embedding for d in unit["documents"]], expected(client, texts))


def test_haystack_sparse_text_embedder(url, client):
    from haystack.utils import Secret
    from haystack_integrations.components.embedders.huggingface_api import HuggingFaceAPISparseTextEmbedder

    embedder = HuggingFaceAPISparseTextEmbedder(api_base_url=url, token=Secret.from_token(KEY))
    for text, item in zip(THREE, client.encode_queries(THREE, dense=False)):
        sparse = embedder.run(text)["sparse_embedding"]
        assert dict(zip(sparse.indices, sparse.values)) == pytest.approx(item.sparse_dict(), abs=SAME)


@pytest.mark.parametrize("direction", ["Left", "left", "Right"])
def test_milvus_tei_function_request_with_truncation_direction(url, client, direction):
    # What Milvus 2.6's TEI text-embedding function posts to {endpoint}/embed, with "truncate": "true" and
    # "truncation_direction" set in its params.
    long_texts = [" ".join(f"token{i}" for i in range(200)), THREE[0]]
    body = {"inputs": long_texts, "truncate": True, "truncation_direction": direction}
    answer = httpx.post(url + "/embed", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert answer.status_code == 200, answer.text
    side = direction.lower()
    assert_same(answer.json(), expected(client, long_texts, truncation_side=side))
    if side == "left":
        assert float(np.abs(np.asarray(answer.json()[0]) - expected(client, long_texts[:1])[0]).max()) > 1e-3


def test_both_lanes_carry_truncation_side_and_normalize(client):
    # The query stream and the Celery document lane read the same options, on the workers' tokenizer.
    text = " ".join(f"word{i}" for i in range(300))
    for options in ({"truncation_side": "left"}, {"truncation_side": "right"}, {"normalize": False}):
        (query,) = client.encode_queries([text], max_length=40, sparse=False, **options)
        (document,) = client.encode_documents([text], max_length=40, sparse=False, **options)
        assert query.truncated and document.truncated and query.n_tokens == document.n_tokens == 40
        assert_same([document.dense], query.dense[None].astype(np.float64))
    (raw,) = client.encode_documents([text], max_length=40, normalize=False)
    assert float(np.linalg.norm(raw.dense)) > 1.5
    with pytest.raises(Exception, match="truncation_side"):
        client.encode_documents([text], truncation_side="middle")


def test_v1_encode_takes_the_same_options(url, client):
    text = " ".join(f"word{i}" for i in range(300))
    body = {"texts": [text], "max_length": 40, "truncation_side": "left", "normalize": False, "sparse": False}
    answer = post(url, "/v1/encode", body)
    assert answer.status_code == 200, answer.text
    (item,) = answer.json()["items"]
    (want,) = client.encode_queries([text], max_length=40, truncation_side="left", normalize=False, sparse=False)
    assert item["truncated"]
    assert_same([item["dense"]], want.dense[None].astype(np.float64))
    refused = post(url, "/v1/encode", {"texts": ["a"], "truncation_side": "middle"})
    assert refused.status_code == 422 and "truncation_side: must be one of" in refused.json()["message"]


# ---- TEI's other routes ------------------------------------------------------------------------------------

def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def test_root_and_invocations_are_embed_and_get_root_is_health(url):
    vectors = [post(url, path, {"inputs": THREE}).json() for path in ("/embed", "/", "/invocations")]
    assert vectors[0] == vectors[1] == vectors[2]
    assert httpx.get(url + "/").status_code == 200 and httpx.get(url + "/ping").status_code == 200


def test_embed_all_gives_the_colbert_vectors(url, client):
    answer = post(url, "/embed_all", {"inputs": THREE})
    assert answer.status_code == 200, answer.text
    for got, item in zip(answer.json(), client.encode_queries(THREE, dense=False, sparse=False, colbert=True)):
        assert isinstance(item, Embedding)
        assert_same(got, item.colbert.astype(np.float64))


def test_tokenize_and_decode_use_the_checkpoints_tokenizer(url):
    from worker.tokenizer import CheckpointTokenizer

    tokenizer = CheckpointTokenizer.load(TINY)
    texts = ["Hello world", "Grüße aus Köln"]
    answer = post(url, "/tokenize", {"inputs": texts})
    assert answer.status_code == 200, answer.text
    tokens = answer.json()
    for text, got in zip(texts, tokens):
        assert [t["id"] for t in got] == [tokenizer.specials.cls, *tokenizer.encode([text])[0], tokenizer.specials.eos]
        assert got[0] == {"id": tokenizer.specials.cls, "text": "<s>", "special": True, "start": None, "stop": None}
        raw = text.encode()
        assert all(raw[t["start"]:t["stop"]].decode() == t["text"] for t in got if not t["special"])  # byte offsets
    plain = post(url, "/tokenize", {"inputs": texts[0], "add_special_tokens": False}).json()
    assert [t["id"] for t in plain[0]] == tokenizer.encode(texts[:1])[0]
    ids = [[t["id"] for t in got] for got in tokens]
    assert post(url, "/decode", {"ids": ids}).json() == texts
    assert post(url, "/decode", {"ids": ids[0], "skip_special_tokens": False}).json() == ["<s> Hello world</s>"]
    refused = post(url, "/decode", {"ids": [ids[0], [1, 10 ** 9]]})
    assert refused.status_code == 422 and "ids[1]: token id 1000000000 is outside the vocabulary" in \
        refused.json()["error"]
    empty = post(url, "/tokenize", {"inputs": ["fine", ""]})
    assert empty.status_code == 422 and "inputs[1]: text is empty" in empty.json()["message"]


def test_every_error_body_has_both_families_fields(url):
    # OpenAI's routes: the openai client's nested object; TEI's: TEI's flat string. Both: a flat "message".
    openai_error = post(url, "/v1/embeddings", {"input": ""}).json()
    assert openai_error["error"]["message"] == openai_error["message"] and "text is empty" in openai_error["message"]
    for path in ("/embed", "/", "/embed_sparse", "/embed_all", "/tokenize"):
        tei_error = post(url, path, {"inputs": ""}).json()
        assert tei_error["error"] == tei_error["message"] and tei_error["error_type"] == "Validation", path
    assert post(url, "/decode", {"ids": "x"}).json()["error"].startswith("ids: must be a list")
    missing = httpx.get(url + "/v1/models/nothing", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert missing["error"]["code"] == "model_not_found" and "not served here" in missing["message"]
