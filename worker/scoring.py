"""BGE-M3's own rerank on a worker: ``m3q.score`` jobs, scored with all three outputs of one forward pass.

A score job (:data:`~producer.contract.wire.SCORE_OPTIONS`) carries its queries and passages once each and
the pairs between them. Both go through the device loop as queries (served before document steps, batched
across jobs), asking for dense, sparse and ColBERT at once; the scores are computed here, next to the
encoder, and only they travel back (:class:`~producer.contract.wire.ScoreAnswer`).

The numbers are ``BGEM3FlagModel.compute_score``'s (FlagEmbedding 1.4.2), formula by formula:

- dense: the dot product of the two L2-normalized CLS vectors;
- sparse: the sum, over the token ids both texts share, of the product of their weights;
- colbert: for each query vector (one per token after CLS), its best dot product with a passage vector,
  summed and divided by the number of query vectors. FlagEmbedding pads the passages of a batch to the
  longest with zero vectors, so on a passage shorter than its batch's longest no query token scores below
  0: reproduced per run of its ``batch_size`` pairs (default
  :data:`~producer.contract.wire.SCORE_BATCH_PAIRS`, FlagEmbedding's);
- ``sparse+dense`` and ``colbert+sparse+dense``: the weighted averages, with weights [dense, sparse,
  colbert] (FlagEmbedding's default [1, 1, 1]).
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from producer.contract import checks, wire
from producer.contract.wire import Embedding, ItemError, PayloadError, check_options
from worker.encoder import EncodeResult
from worker.jobs import check_size, stamp
from worker.runtime import Runtime

TASK = wire.TASK_SCORE
DEFAULT_WEIGHTS = (1.0, 1.0, 1.0)
"""FlagEmbedding's weights when none are given: [dense, sparse, colbert]."""


@dataclass(frozen=True)
class ScoreJob:
    """A checked score job: its pairs as (query index, passage index), weights, and token limits."""

    queries: list[str]
    passages: list[str]
    pairs: list[tuple[int, int]]
    weights: tuple[float, float, float]
    batch_size: int
    max_query_length: int
    max_passage_length: int
    truncation_side: str = "right"


SCORER = ThreadPoolExecutor(1, thread_name_prefix="m3q-scoring")
"""Where scores are computed: neither on the device thread nor on the query stream's writer, since a job of
long passages takes seconds of matrix products that neither the next forward pass nor other jobs' replies
should wait for."""


def start(rt: Runtime, payload: Any) -> Future:
    """Check the job and queue its texts on the device loop; the future resolves to the answer, scored on
    :data:`SCORER` once both sides are encoded."""
    job = check(rt, payload)
    engine = rt.engine
    side = job.truncation_side
    queries = engine.submit(job.queries, "queries", colbert=True, max_length=job.max_query_length,
                            truncation_side=side)
    passages = engine.submit(job.passages, "queries", colbert=True, max_length=job.max_passage_length,
                             truncation_side=side)
    return then(gather([queries, passages]), lambda results: answer(rt, job, *results))


def then(future: Future, make: Callable[[Any], Any]) -> Future:
    """A future of ``make(future.result())``, run on :data:`SCORER`; a failure on the way fails it."""
    out: Future = Future()

    def run(result: Any) -> None:
        try:
            out.set_result(make(result))
        except Exception as e:  # noqa: BLE001 - the job fails with it, the thread goes on
            out.set_exception(e)

    def done(f: Future) -> None:
        try:
            SCORER.submit(run, f.result())
        except Exception as e:  # noqa: BLE001 - the step failed (or the executor is shut): the job fails
            out.set_exception(e)
    future.add_done_callback(done)
    return out


def gather(futures: list[Future]) -> Future:
    """A future of every result of ``futures``, in order; the first failure fails it."""
    out: Future = Future()
    left = [len(futures)]
    lock = threading.Lock()

    def one_done(_: Future) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        try:
            out.set_result([f.result() for f in futures])
        except Exception as e:  # noqa: BLE001 - a failed step fails the score job
            out.set_exception(e)
    for f in futures:
        f.add_done_callback(one_done)
    return out


# ---- the payload ---------------------------------------------------------------------------------------

def check(rt: Runtime, payload: Any) -> ScoreJob:
    """The job a payload asks for, or a PayloadError naming what is wrong (a bad pair by its index)."""
    payload = check_options(payload, wire.SCORE_OPTIONS)
    queries, passages = payload.get("queries"), payload["texts"]
    if not isinstance(queries, list):
        raise PayloadError("payload needs 'queries', a list")
    check_size(rt, {"texts": queries + passages})
    pairs = _pairs(payload.get("pairs"), len(queries), len(passages))
    _check_texts(rt, queries, passages, pairs)
    limits = rt.encoder.limits
    side = payload.get("truncation_side", "right")
    if side not in wire.TRUNCATION_SIDES:
        raise PayloadError(f"option 'truncation_side' must be 'right' or 'left', got {side!r}")
    batch = payload.get("batch_size", wire.SCORE_BATCH_PAIRS)
    if not _index(batch) or not batch:
        raise PayloadError(f"option 'batch_size' must be a positive integer, got {batch!r}")
    return ScoreJob(queries, passages, pairs, weights_of(payload.get("weights")), batch,
                    _length(rt, payload, "max_query_length", limits.query_max_length),
                    _length(rt, payload, "max_passage_length", limits.document_max_length), side)


def _pairs(raw: Any, n_queries: int, n_passages: int) -> list[tuple[int, int]]:
    if not isinstance(raw, list) or not raw:
        raise PayloadError("payload needs 'pairs', a non-empty list of [query index, text index]")
    for i, pair in enumerate(raw):
        if not (isinstance(pair, list) and len(pair) == 2 and all(_index(v) for v in pair)
                and pair[0] < n_queries and pair[1] < n_passages):
            raise PayloadError(f"pair {i}: must be [query index, text index] within 'queries' and 'texts', "
                               f"got {pair!r}")
    return [(q, p) for q, p in raw]


def _index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_texts(rt: Runtime, queries: list, passages: list, pairs: list[tuple[int, int]]) -> None:
    """Every text checked before anything is encoded: a bad one fails the job naming its first pair."""
    limit = rt.settings.max_text_chars
    for side, texts, at in (("query", queries, 0), ("passage", passages, 1)):
        for i, text in enumerate(texts):
            reason = checks.text_problem(text, limit)
            if reason:
                first = next((j for j, pair in enumerate(pairs) if pair[at] == i), None)
                raise PayloadError(f"{side} {i}: {reason}" if first is None else f"pair {first}: its {side}: {reason}")


def weights_of(raw: Any) -> tuple[float, float, float]:
    """[dense, sparse, colbert] weights: three finite numbers (default :data:`DEFAULT_WEIGHTS`)."""
    if raw is None:
        return DEFAULT_WEIGHTS
    if not (isinstance(raw, (list, tuple)) and len(raw) == 3
            and all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in raw)):
        raise PayloadError(f"'weights' must be three numbers [dense, sparse, colbert], got {raw!r}")
    return float(raw[0]), float(raw[1]), float(raw[2])


def _length(rt: Runtime, payload: dict, name: str, default: int) -> int:
    value = payload.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not 2 <= value <= rt.encoder.max_positions:
        raise PayloadError(f"option {name!r} must be an integer from 2 to {rt.encoder.max_positions}, "
                           f"got {value!r}")
    return value


# ---- the scores ----------------------------------------------------------------------------------------

def answer(rt: Runtime, job: ScoreJob, queries: EncodeResult, passages: EncodeResult) -> wire.ScoreAnswer:
    """The job's five lists of scores, from its encoded texts."""
    q_items = _embeddings(queries.items, job, "query", 0)
    p_items = _embeddings(passages.items, job, "passage", 1)
    floors = padded(job.pairs, [len(p.colbert) for p in p_items], job.batch_size)
    signals = np.array([signal_scores(q_items[q], p_items[p], floor)
                        for (q, p), floor in zip(job.pairs, floors)], dtype=np.float64)
    cut = [i for i, (q, p) in enumerate(job.pairs) if q_items[q].truncated or p_items[p].truncated]
    return {"scores": combine(signals, job.weights), "truncated": queries.truncated + passages.truncated,
            "cut": cut, "tokens": queries.tokens + passages.tokens, **stamp(rt)}


def _embeddings(items: list, job: ScoreJob, side: str, at: int) -> list[Embedding]:
    for i, item in enumerate(items):
        if isinstance(item, ItemError):  # out of memory, alone: the texts were checked before
            first = next(j for j, pair in enumerate(job.pairs) if pair[at] == i)
            raise PayloadError(f"pair {first}: its {side}: {item.reason}")
    return items


def padded(pairs: list[tuple[int, int]], rows: list[int], batch_size: int) -> list[bool]:
    """Per pair, whether FlagEmbedding pads its passage: shorter than the longest of its batch."""
    out = []
    for start in range(0, len(pairs), batch_size):
        lengths = [rows[p] for _, p in pairs[start:start + batch_size]]
        longest = max(lengths)
        out += [n < longest for n in lengths]
    return out


def signal_scores(q: Embedding, p: Embedding, floor: bool) -> tuple[float, float, float]:
    """(dense, sparse, colbert) of one pair; ``floor``: its passage is padded in FlagEmbedding's batch."""
    dense = float(np.dot(q.dense, p.dense))
    _, qi, pi = np.intersect1d(q.sparse_ids, p.sparse_ids, assume_unique=True, return_indices=True)
    sparse = float(np.dot(q.sparse_weights[qi].astype(np.float64), p.sparse_weights[pi]))
    best = (q.colbert @ p.colbert.T).max(axis=1)
    if floor:
        best = np.maximum(best, 0.0)
    return dense, sparse, float(best.sum(dtype=np.float64) / len(q.colbert))


def combine(signals: np.ndarray, weights: tuple[float, float, float]) -> dict[str, list[float]]:
    """FlagEmbedding's five lists from (dense, sparse, colbert) per pair (0/0 is NaN there too)."""
    w_dense, w_sparse, w_colbert = weights
    dense, sparse, colbert = signals[:, 0], signals[:, 1], signals[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        sparse_dense = (sparse * w_sparse + dense * w_dense) / np.float64(w_sparse + w_dense)
        all_three = (colbert * w_colbert + sparse * w_sparse + dense * w_dense) / np.float64(sum(weights))
    return {"dense": dense.tolist(), "sparse": sparse.tolist(), "colbert": colbert.tolist(),
            "sparse+dense": sparse_dense.tolist(), "colbert+sparse+dense": all_three.tolist()}
