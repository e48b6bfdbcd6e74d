"""`m3q encode --local` (JSONL in, JSONL out, the same numbers as Encoder.encode) and `m3q replica`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from producer.contract.wire import Embedding
from worker.encoder import Encoder

ROOT = Path(__file__).resolve().parent.parent
LONG = " ".join(["a"] * 700)  # 702 tokens with CLS and EOS: over the 512 query limit, under 8192


def m3q(args: list[str], stdin: str = "", timeout: float = 180) -> subprocess.CompletedProcess:
    """Run `m3q ARGS` as `python -m producer.cli`, with no M3Q_* settings leaking in from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("M3Q_")}
    env["TOKENIZERS_PARALLELISM"] = "false"
    return subprocess.run([sys.executable, "-m", "producer.cli", *args], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=timeout)


def jsonl(rows: list[object]) -> str:
    """One line per row; a str row is written as is (to send a line that is not JSON)."""
    return "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)


def outputs(proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def assert_matches(out: dict, item: Embedding, colbert: bool) -> None:
    """A JSON output line carries the in-process item's numbers (float32 survives JSON exactly)."""
    assert isinstance(item, Embedding)
    np.testing.assert_allclose(np.array(out["dense"], np.float32), item.dense, rtol=0, atol=1e-6)
    expected = item.sparse_dict()
    assert sorted(int(k) for k in out["sparse"]) == sorted(expected)
    for key, weight in out["sparse"].items():
        assert abs(weight - expected[int(key)]) <= 1e-6
    if colbert:
        np.testing.assert_allclose(np.array(out["colbert"], np.float32), item.colbert, rtol=0, atol=1e-6)
    else:
        assert "colbert" not in out


@pytest.fixture(scope="module")
def encoder(tiny_model: Path) -> Encoder:
    return Encoder.load(str(tiny_model), device="cpu", dtype="float32")


DOC_LINES: list[object] = [
    {"text": "The library opens at nine.", "id": "doc-1"},
    {"text": "Библиотека открывается в девять."},  # no id: echoed as null
    "{not json",
    {"id": 7, "title": "no text field"},
    {"text": "", "id": "empty"},
    {"text": "图书馆九点开门。🚀", "id": 42},
    [1, 2, 3],  # JSON, but not an object
    {"text": LONG, "id": "long"},
]


@pytest.fixture(scope="module")
def documents_run(tiny_model: Path) -> subprocess.CompletedProcess:
    return m3q(["encode", "--local", "--model", str(tiny_model)], jsonl(DOC_LINES))


def test_one_line_per_input_line_in_order(documents_run) -> None:
    out = outputs(documents_run)
    assert len(out) == len(DOC_LINES)
    assert [o["id"] for o in out] == ["doc-1", None, None, 7, "empty", 42, None, "long"]
    assert [("error" in o) for o in out] == [False, False, True, True, True, False, True, False]


def test_rejected_lines_say_why(documents_run) -> None:
    out = outputs(documents_run)
    assert "line 3" in out[2]["error"] and "not JSON" in out[2]["error"]
    assert "line 4" in out[3]["error"] and "'text'" in out[3]["error"]
    assert "empty" in out[4]["error"]
    assert "line 7" in out[6]["error"] and "'text'" in out[6]["error"]
    assert all(set(o) == {"id", "error"} for o in out if "error" in o)


def test_documents_equal_in_process_encoder(documents_run, encoder: Encoder) -> None:
    out = outputs(documents_run)
    good = [i for i, row in enumerate(DOC_LINES) if isinstance(row, dict) and row.get("text")]
    items = encoder.encode([DOC_LINES[i]["text"] for i in good], "documents").items
    for i, item in zip(good, items):
        assert_matches(out[i], item, colbert=False)
    assert "truncated" not in documents_run.stderr  # 702 tokens fit a document


def test_queries_truncate_and_colbert(tiny_model: Path, encoder: Encoder) -> None:
    texts = ["When does the library open?", LONG, "Когда открывается библиотека?"]
    proc = m3q(["encode", "--local", "--model", str(tiny_model), "--kind", "queries", "--colbert"],
               jsonl([{"text": t, "id": n} for n, t in enumerate(texts)]))
    out = outputs(proc)
    assert [o["id"] for o in out] == [0, 1, 2]
    result = encoder.encode(texts, "queries", colbert=True)
    assert result.truncated == 1 and result.items[1].n_tokens == 512
    for line, item in zip(out, result.items):
        assert_matches(line, item, colbert=True)
    assert len(out[1]["colbert"]) == 511  # 512 tokens kept, one ColBERT row per token after CLS
    assert "1 text(s) truncated to 512 tokens" in proc.stderr


@pytest.mark.slow
def test_replica_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "replica"
    proc = m3q(["replica", str(folder), "--size", "tiny"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RANDOM" in proc.stdout
    for name in ("config.json", "model.safetensors", "colbert_linear.pt", "sparse_linear.pt", "tokenizer.json",
                 "README.md", "m3q_replica.json"):
        assert (folder / name).is_file(), name
    assert "random weights" in (folder / "README.md").read_text().lower()
    assert json.loads((folder / "m3q_replica.json").read_text())["random_weights"] is True
    # The real checkpoint's transformers version: newer ones make transformers 4.57.3+ warn about a Mistral
    # regex at every tokenizer load.
    assert json.loads((folder / "config.json").read_text())["transformers_version"] == "4.33.0"
    replica = Encoder.load(str(folder), device="cpu", dtype="float32")
    info = replica.info()
    assert info["replica"] is True and info["dims"] == {"dense": 32, "colbert_vecs": 32, "sparse": 4096}
    item = replica.encode(["a loadable checkpoint"], colbert=True).items[0]
    assert isinstance(item, Embedding) and abs(float(np.linalg.norm(item.dense)) - 1) < 1e-5
    assert item.colbert.shape == (item.n_tokens - 1, 32)
