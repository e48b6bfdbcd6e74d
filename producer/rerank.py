"""BGE-M3's own rerank, the producer's side: a ``compute_score`` call split into ``m3q.score`` jobs, and their
answers merged into FlagEmbedding's five lists.

:class:`ScoreCall` is the one core of :meth:`Client.compute_score <producer.client.Client.compute_score>`,
its asyncio twin and :meth:`Client.rerank <producer.client.Client.rerank>`: it checks the pairs before
anything is sent (a bad one is a :class:`~producer.contract.errors.PayloadError` naming it), cuts them into
jobs of :data:`~producer.contract.wire.SCORE_BATCH_PAIRS` pairs (a query or passage repeated in a job is
sent and encoded once) and merges the workers' answers in input order. The scoring itself is
``worker/scoring.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

from producer.contract import checks, wire
from producer.contract.errors import ConfigError, PayloadError
from producer.contract.settings import Settings

RERANK_WEIGHTS = (0.4, 0.2, 0.4)
"""[dense, sparse, colbert] of :meth:`Client.rerank <producer.client.Client.rerank>`, ``m3q search --mode
m3`` and ``/rerank``: BGE-M3's paper's weights (``compute_score`` keeps FlagEmbedding's [1, 1, 1])."""


class Ranked(NamedTuple):
    """One passage of a rerank: its index in the input and its ``colbert+sparse+dense`` score."""

    index: int
    score: float


class Scores(dict):
    """FlagEmbedding's five lists (``dense``, ``sparse``, ``colbert``, ``sparse+dense``,
    ``colbert+sparse+dense``: one float per pair, or one float each for a single pair); ``truncated``: how
    many texts were cut to their token limit (counted once per job that encodes them), and ``cut``: the
    positions of the pairs with a text cut."""

    truncated: int = 0
    cut: tuple[int, ...] = ()


@dataclass(frozen=True)
class ScoreJob:
    """One job of a call: its first pair's position and its payload."""

    first: int
    size: int
    payload: dict[str, Any]


class ScoreCall:
    """One ``compute_score`` call: its pairs checked and cut into jobs; :meth:`merge` joins their answers."""

    def __init__(self, pairs: Sequence[Any], weights: Sequence[float] | None, max_query_length: int | None,
                 max_passage_length: int | None, s: Settings, batch_size: int = wire.SCORE_BATCH_PAIRS,
                 truncation_side: str = "right") -> None:
        self.single = _is_pair(pairs)
        self.pairs = [tuple(pairs)] if self.single else list(pairs)
        batch_size = _length(batch_size, "batch_size", 1)
        options = {"weights": _weights(weights), "max_query_length": _length(max_query_length, "max_query_length"),
                   "max_passage_length": _length(max_passage_length, "max_passage_length"),
                   "batch_size": batch_size if batch_size != wire.SCORE_BATCH_PAIRS else None,
                   "truncation_side": _side(truncation_side)}
        self.options = {k: v for k, v in options.items() if v is not None}
        _check_pairs(self.pairs, s.max_text_chars)
        # Jobs of whole batches: the ColBERT padding rule is FlagEmbedding's per batch.
        size = max(1, wire.SCORE_BATCH_PAIRS // batch_size) * batch_size
        self.jobs = [self._job(start, self.pairs[start:start + size]) for start in range(0, len(self.pairs), size)]

    def _job(self, first: int, pairs: list[tuple]) -> ScoreJob:
        queries: dict[str, int] = {}
        passages: dict[str, int] = {}
        index = [[queries.setdefault(q, len(queries)), passages.setdefault(p, len(passages))] for q, p in pairs]
        return ScoreJob(first, len(pairs), {"queries": list(queries), "texts": list(passages), "pairs": index,
                                            **self.options})

    def merge(self, answers: list[dict[str, Any]]) -> Scores:
        """The jobs' answers (in job order) as FlagEmbedding's five lists."""
        out = Scores({name: [] for name in wire.SCORE_LISTS})
        truncated, cut = 0, []
        for job, raw in zip(self.jobs, answers):
            for name in wire.SCORE_LISTS:
                out[name].extend(float(v) for v in raw["scores"][name])
            truncated += int(raw.get("truncated", 0))
            cut += [job.first + i for i in raw.get("cut", ())]
        if self.single:
            out = Scores({name: values[0] for name, values in out.items()})
        out.truncated, out.cut = truncated, tuple(cut)
        return out


def ranked(scores: Scores, k: int | None) -> list[Ranked]:
    """(index, score) by ``colbert+sparse+dense``, best first (ties by index), the first ``k``."""
    values = scores["colbert+sparse+dense"]
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return [Ranked(i, values[i]) for i in (order if k is None else order[:k])]


def rerank_pairs(query: object, passages: Sequence[object], k: int | None) -> list[tuple[object, object]]:
    """The pairs of a rerank (``query`` with each passage), or ConfigError for a ``k`` or list that cannot work."""
    if isinstance(passages, (str, bytes)) or not isinstance(passages, Sequence):
        raise ConfigError(f"passages must be a list of texts, got {type(passages).__name__}")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise ConfigError(f"k must be a positive integer or None, got {k!r}")
    return [(query, p) for p in passages]


def _is_pair(pairs: Any) -> bool:
    # FlagEmbedding's rule: a pair alone is two strings, not a list of pairs.
    return isinstance(pairs, (tuple, list)) and len(pairs) == 2 and isinstance(pairs[0], str) \
        and isinstance(pairs[1], str)


def _check_pairs(pairs: list[Any], max_chars: int) -> None:
    """Every pair is (query, passage) of two texts a worker accepts; PayloadError naming the first bad one."""
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise PayloadError(f"pair {i}: must be (query, passage), got {_describe(pair)}; nothing was sent")
        for side, text in zip(("query", "passage"), pair):
            reason = checks.text_problem(text, max_chars)
            if reason:
                raise PayloadError(f"pair {i}: its {side}: {reason}; nothing was sent")


def _describe(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:80] + "..."


def _weights(weights: Sequence[float] | None) -> list[float] | None:
    if weights is None:
        return None
    values = list(weights) if isinstance(weights, (list, tuple)) else None
    if values is None or len(values) != 3 or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and w == w and abs(w) != float("inf")
            for w in values):
        raise ConfigError(f"weights must be three numbers [dense, sparse, colbert], got {weights!r}")
    return [float(w) for w in values]


def _side(side: str) -> str | None:
    if side not in wire.TRUNCATION_SIDES:
        raise ConfigError(f"truncation_side must be 'right' or 'left', got {side!r}")
    return None if side == "right" else side


def _length(value: int | None, name: str, least: int = 2) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
        raise ConfigError(f"{name} must be an integer of at least {least}, got {value!r}")
    return value
