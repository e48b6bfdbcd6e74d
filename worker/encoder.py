"""The encoder: validate and tokenize (pre), forward pass in token-budget steps (core), split results (post).

``Encoder.encode`` does all three for one call. The worker's engine calls the stages separately, so that
it can merge texts of several jobs into one step and serve queries between the steps of a long job.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from producer.contract.checks import text_problem
from producer.contract.errors import ConfigError
from producer.contract.settings import Settings
from producer.contract.wire import TRUNCATION_SIDES, Embedding, Item, ItemError
from worker.batcher import plan_batches
from worker.device import dtype_name, pin, resolve_device, resolve_dtype
from worker.model import BGEM3Model, resolve_checkpoint
from worker.slicing import Slicer
from worker.tokenizer import CheckpointTokenizer

log = logging.getLogger(__name__)

_DEFAULTS = Settings()  # the limits' defaults are the settings' (M3Q_QUERY_MAX_LENGTH, ...): written once, there


@dataclass(frozen=True)
class Limits:
    """Per-text and per-step limits; each defaults to its setting's default."""

    query_max_length: int = _DEFAULTS.query_max_length
    document_max_length: int = _DEFAULTS.document_max_length
    max_text_chars: int = _DEFAULTS.max_text_chars
    max_batch_tokens: int = _DEFAULTS.max_batch_tokens

    @classmethod
    def from_settings(cls, s: Settings) -> "Limits":
        """The limits that settings describe."""
        return cls(s.query_max_length, s.document_max_length, s.max_text_chars, s.max_batch_tokens)

    def max_length(self, kind: str) -> int:
        """Token limit of a kind of text."""
        return self.query_max_length if kind == "queries" else self.document_max_length


@dataclass
class Prepared:
    """A tokenized text, ready for a step; ``normalize``: its dense vector L2-normalized (else the raw CLS state)."""

    index: int
    ids: list[int]
    truncated: bool
    normalize: bool = True


@dataclass
class EncodeResult:
    """One call's items in input order, and how many texts were truncated."""

    items: list[Item]
    truncated: int = 0
    tokens: int = 0


class Encoder:
    """BGE-M3 on one device: equal to FlagEmbedding's BGEM3FlagModel, batched by tokens."""

    def __init__(self, model: BGEM3Model, tokenizer: CheckpointTokenizer, limits: Limits, name: str,
                 device_name: str, replica: dict | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.limits = limits
        self.name = name
        self.device_name = device_name
        self.replica = replica
        self._cls, self._eos = tokenizer.specials.cls, tokenizer.specials.eos

    @classmethod
    def load(cls, model: str = "BAAI/bge-m3", device: str = "cpu", dtype: str = "auto",
             limits: Limits | None = None) -> "Encoder":
        """Load a hub id or a local checkpoint onto ``device`` once, for inference."""
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        pin(torch_device)
        folder = resolve_checkpoint(model)
        replica = _replica_marker(folder)
        if replica:
            log.warning("%s is an m3-queue REPLICA with random weights (size %s): its vectors mean nothing",
                        folder, replica.get("size"))
        tokenizer = CheckpointTokenizer.load(folder)
        net = BGEM3Model.load(folder, torch_device, torch_dtype, tokenizer.specials.unused)
        return cls(net, tokenizer, limits or Limits(), model, device, replica)

    @property
    def max_positions(self) -> int:
        """Longest input the position embeddings allow (XLM-R reserves pad_token_id + 1 of them)."""
        c = self.model.config
        return c.max_position_embeddings - c.pad_token_id - 1

    @property
    def dtype(self) -> torch.dtype:
        return self.model.transformer.word.weight.dtype

    def info(self) -> dict:
        """What this encoder is: model, device, dtype, output sizes, replica or not."""
        return {"model": self.name, "device": self.device_name, "dtype": dtype_name(self.dtype),
                "dims": self.model.dims, "replica": bool(self.replica)}

    def warm_up(self) -> float:
        """Run a step of queries and a long document once, before the first job; returns the seconds taken.

        First calls pay one-time costs (CUDA loads each kernel on first use; the CPU's kernels set up their
        buffers), which would otherwise land on the first jobs' latency. Between them the two steps use
        both attention paths: padded or per-run short sequences, and a long sequence with contiguous heads.
        """
        started = time.perf_counter()
        words = "m3-queue warms up its device"
        self.encode([" ".join([words] * n) for n in (1, 2, 4, 8)], "queries")
        self.encode([" ".join([words] * 80)], "documents")
        return time.perf_counter() - started

    # ---- pre ------------------------------------------------------------------------------------------

    def prepare(self, texts: Sequence[object], kind: str = "documents", max_length: int | None = None,
                truncation_side: str = "right", normalize: bool = True) -> list[Prepared | ItemError]:
        """Validate and tokenize; a bad text becomes an ItemError in its place. A text over the token limit
        keeps its first tokens, or its last ones with ``truncation_side="left"``."""
        limit = max_length or self.limits.max_length(kind)
        if limit < 2:
            raise ConfigError(f"max_length must be at least 2, got {limit}")
        if limit > self.max_positions:
            raise ConfigError(f"max_length {limit} is over the model's {self.max_positions} positions")
        if truncation_side not in TRUNCATION_SIDES:
            raise ConfigError(f"truncation_side must be 'right' or 'left', got {truncation_side!r}")
        out: list[Prepared | ItemError | None] = [None] * len(texts)
        good = []
        for i, text in enumerate(texts):
            reason = text_problem(text, self.limits.max_text_chars)
            if reason:
                out[i] = ItemError(reason)
            else:
                good.append(i)
        keep = limit - 2  # tokens of the text itself, between cls and eos
        if good:
            encoded = self.tokenizer.encode([texts[i] for i in good])
            for i, ids in zip(good, encoded):
                kept = ids[max(0, len(ids) - keep):] if truncation_side == "left" else ids[:keep]
                out[i] = Prepared(i, [self._cls, *kept, self._eos], len(ids) > keep, normalize)
        return out  # type: ignore[return-value]

    def plan(self, prepared: Sequence[Prepared]) -> list[list[Prepared]]:
        """Token-budget steps, longest texts first."""
        steps = plan_batches([len(p.ids) for p in prepared], self.limits.max_batch_tokens)
        return [[prepared[i] for i in step] for step in steps]

    # ---- core + post ----------------------------------------------------------------------------------

    def run(self, step: Sequence[Prepared], dense: bool = True, sparse: bool = True,
            colbert: bool = False, slicer: Slicer | None = None) -> list[Item]:
        """One forward pass over ``step``; items come back aligned with ``step``.

        On out-of-memory the step is halved and retried; a lone text that still does not fit gets an error.
        A ``slicer`` runs the pass in short slices with pauses between them (worker/slicing.py).
        """
        order = sorted(range(len(step)), key=lambda i: -len(step[i].ids))
        items = self._run_sorted([step[i] for i in order], dense, sparse, colbert, slicer)
        aligned: list[Item] = [None] * len(step)  # type: ignore[list-item]
        for i, item in zip(order, items):
            aligned[i] = item
        return aligned

    def _run_sorted(self, step: list[Prepared], dense: bool, sparse: bool, colbert: bool,
                    slicer: Slicer | None) -> list[Item]:
        try:
            return self._forward(step, dense, sparse, colbert, slicer)
        except torch.OutOfMemoryError:
            if self.model.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(step) == 1:
                return [ItemError(f"{len(step[0].ids)} tokens do not fit on {self.device_name} even alone "
                                  "(out of memory); lower M3Q_DOCUMENT_MAX_LENGTH")]
            half = len(step) // 2
            log.warning("out of memory on a step of %d texts; splitting it", len(step))
            return (self._run_sorted(step[:half], dense, sparse, colbert, slicer)
                    + self._run_sorted(step[half:], dense, sparse, colbert, slicer))

    def _forward(self, step: Sequence[Prepared], dense: bool, sparse: bool, colbert: bool,
                 slicer: Slicer | None) -> list[Item]:
        lengths = [len(p.ids) for p in step]
        ids = torch.tensor([t for p in step for t in p.ids], dtype=torch.long)
        raw = dense and not all(p.normalize for p in step)
        out = self.model(ids, lengths, dense=dense and any(p.normalize for p in step), sparse=sparse,
                         colbert=colbert, raw_cls=raw, slicer=slicer)
        sparse_rows = _split_sparse(out.sparse, len(step)) if out.sparse is not None else None
        items: list[Item] = []
        for j, p in enumerate(step):
            vectors = out.dense if p.normalize else out.cls
            items.append(Embedding(
                vectors[j].numpy() if vectors is not None else None,
                sparse_rows[j][0] if sparse_rows else None,
                sparse_rows[j][1] if sparse_rows else None,
                out.colbert[j].numpy() if out.colbert is not None else None,
                len(p.ids), p.truncated))
        return items

    # ---- all three --------------------------------------------------------------------------------------

    def encode(self, texts: Sequence[object], kind: str = "documents", *, dense: bool = True, sparse: bool = True,
               colbert: bool = False, max_length: int | None = None, truncation_side: str = "right",
               normalize: bool = True) -> EncodeResult:
        """Encode ``texts`` in-process; items come back in input order. ``normalize=False``: dense vectors are
        the raw CLS states (what TEI returns for ``"normalize": false``)."""
        prepared = self.prepare(texts, kind, max_length, truncation_side, normalize)
        items: list[Item | None] = [p if isinstance(p, ItemError) else None for p in prepared]
        good = [p for p in prepared if isinstance(p, Prepared)]
        for step in self.plan(good):
            for p, item in zip(step, self.run(step, dense, sparse, colbert)):
                items[p.index] = item
        return EncodeResult(items, sum(p.truncated for p in good), sum(len(p.ids) for p in good))  # type: ignore[arg-type]


def _split_sparse(sparse, rows: int) -> list[tuple]:
    """(token ids, weights) per row from the flat (row, id, weight) triple."""
    row, token, weight = sparse
    counts = torch.bincount(row, minlength=rows).tolist()
    tokens, weights = token.split(counts), weight.split(counts)
    return [(t.numpy(), w.numpy()) for t, w in zip(tokens, weights)]


def _replica_marker(folder: Path) -> dict | None:
    marker = folder / "m3q_replica.json"
    return json.loads(marker.read_text()) if marker.exists() else None
