"""The BGE-M3 model: checkpoint loading, a padding-free XLM-RoBERTa forward pass, and the three heads.

The transformer is re-implemented in plain torch over *packed* sequences (all tokens of a batch in one
``[tokens, hidden]`` tensor, no padding): dense layers never touch pad tokens, and attention runs per group
of equal-length sequences without a mask, which is what makes the CPU's flash-attention kernel fast. The
weights are the checkpoint's own, so the numbers equal FlagEmbedding's ``BGEM3FlagModel``; the module does
not depend on the transformers model classes, so it behaves the same under transformers 4.x and 5.x.
"""
from __future__ import annotations

import contextlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from producer.contract.errors import ModelLoadError
from worker.slicing import Slicer

HEADS = ("colbert_linear.pt", "sparse_linear.pt")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# What the worker reads from a hub checkpoint besides the weights, by exact name: a pattern like "*.json"
# would also match sub-folders (BAAI/bge-m3 has onnx/*.json and 1_Pooling/config.json).
CHECKPOINT_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", *HEADS]
CONTIGUOUS_FROM = 256  # sequence length from which attention gets contiguous heads
PADDED_ATTENTION_ON = {"cuda"}  # device types where a step's attention is one masked call (padding_for)
PADDING_AT_MOST = 2.0  # ... if the padded batch has at most this many times the real rows,
PADDING_FREE = 8192    # or at most this many rows in all (a step of queries)
# Attention kernels allowed on CUDA: everything but cuDNN's. Where torch prefers cuDNN attention (Hopper and
# newer GPUs with a recent cuDNN), it builds a cuDNN graph for every new shape, which costs tens to hundreds
# of milliseconds. A query step has a new shape almost every time (its batch size and longest query vary), so
# that cost would land on nearly every step. Flash and memory-efficient attention have no per-shape set-up.
CUDA_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# ---- finding the checkpoint ------------------------------------------------------------------------

def resolve_checkpoint(model: str) -> Path:
    """A local directory as given, or a hub id fetched into (or found in) the Hugging Face cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"model {model!r} is not a checkpoint directory (M3Q_MODEL)")
    return _from_hub(model)


def _from_hub(repo_id: str) -> Path:
    """The checkpoint's files in the Hugging Face cache, fetched where missing, all at one revision."""
    try:
        folder = _hub_snapshot(repo_id)
        _hub_weights(repo_id, folder.name)
        return folder
    except Exception as e:  # noqa: BLE001 - every hub failure gets the same explanation
        raise ModelLoadError(
            f"model {repo_id!r} is not in the Hugging Face cache and the hub could not be reached "
            f"({type(e).__name__}). Set M3Q_MODEL to a local checkpoint directory, or make a random-weight "
            f"replica for tests and capacity planning with `m3q replica DIR --size small`."
        ) from e


def _hub_snapshot(repo_id: str) -> Path:
    """The small files, with ``main`` resolved once: the folder is ``snapshots/<commit>``."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=CHECKPOINT_FILES))


def _hub_weights(repo_id: str, commit: str) -> Path:
    """The first weight file the repository has, at ``commit`` (the snapshot's: a push between the two
    calls cannot pair one commit's config with another's weights)."""
    from huggingface_hub import hf_hub_download

    errors: list[Exception] = []
    for name in WEIGHT_FILES:
        try:
            return Path(hf_hub_download(repo_id, name, revision=commit))
        except Exception as e:  # noqa: BLE001 - try the next weight format
            errors.append(e)
    raise errors[-1]


# ---- the architecture --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """The XLM-RoBERTa hyper-parameters that the forward pass needs."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    type_vocab_size: int = 1

    @classmethod
    def read(cls, folder: Path) -> "Config":
        """Read ``config.json``, refusing architectures this forward pass does not implement."""
        raw = json.loads((folder / "config.json").read_text())
        if raw.get("position_embedding_type", "absolute") != "absolute" or raw.get("hidden_act", "gelu") != "gelu":
            raise ModelLoadError(f"{folder}: only absolute positions and gelu are supported (BGE-M3's own)")
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


class Layer(nn.Module):
    """One post-LayerNorm transformer layer with fused QKV."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        self.heads = c.num_attention_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.attn_out = nn.Linear(c.hidden_size, c.hidden_size)
        self.attn_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.up = nn.Linear(c.hidden_size, c.intermediate_size)
        self.down = nn.Linear(c.intermediate_size, c.hidden_size)
        self.out_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, runs: Sequence[tuple[int, int, int]], slicer: Slicer | None = None,
                padded: Padding | None = None) -> torch.Tensor:
        if slicer is None:
            qkv = self.qkv(x)
            if padded is not None:
                return self._rest(self._attend_padded(qkv, padded), x)
            ctx = [self._attend(*self._heads(qkv, run), 0, run[1] * run[2]) for run in runs]
            return self._rest(torch.cat(ctx), x)
        # The same arithmetic, cut into row slices with pauses between them (worker/slicing.py).
        hidden = x.shape[-1]
        qkv = torch.cat([self.qkv(x[a:b]) for a, b in slicer.ranges(len(x), 6 * hidden * hidden, "linear")])
        ctx = []
        for run in runs:
            q, k, v = self._heads(qkv, run)
            ctx += [self._attend(q, k, v, a, b)
                    for a, b in slicer.ranges(run[1] * run[2], 4 * run[2] * hidden, "attention")]
        attended = torch.cat(ctx)
        per_row = 2 * hidden * (hidden + 2 * self.up.out_features)
        return torch.cat([self._rest(attended[a:b], x[a:b]) for a, b in slicer.ranges(len(x), per_row, "linear")])

    def _rest(self, ctx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # Everything after attention works token by token.
        x = self.attn_norm(self.attn_out(ctx) + x)
        return self.out_norm(self.down(F.gelu(self.up(x))) + x)

    def _heads(self, qkv: torch.Tensor, run: tuple[int, int, int]) -> list[torch.Tensor]:
        """q, k and v of a run of ``count`` sequences of ``length`` tokens, as [count, heads, length, head size]."""
        start, count, length = run
        rows = qkv[start:start + count * length]
        shape = (count, length, self.heads, qkv.shape[-1] // (3 * self.heads))
        heads = [t.reshape(shape).transpose(1, 2) for t in rows.split(qkv.shape[-1] // 3, dim=-1)]
        # Long sequences: the CPU attention kernel runs about 15% faster on contiguous heads than on strided
        # views, which pays for the copy; short ones (queries) are faster without it.
        return [t.contiguous() for t in heads] if length >= CONTIGUOUS_FROM else heads

    def _attend_padded(self, qkv: torch.Tensor, p: Padding) -> torch.Tensor:
        """All sequences' attention in one masked call (see :func:`padding_for`)."""
        padded = qkv.new_zeros(p.count * p.length, qkv.shape[-1])
        padded[p.slots] = qkv
        q, k, v = self._heads(padded, (0, p.count, p.length))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=p.keys)
        return out.transpose(1, 2).reshape(p.count * p.length, -1)[p.slots]

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """Attention output, as [rows, hidden], for query rows ``a:b`` of a run (its sequences back to back)."""
        length, out = q.shape[2], []
        while a < b:
            seq, row = divmod(a, length)
            if row == 0 and b - a >= length:  # whole sequences
                n = (b - a) // length
                part = F.scaled_dot_product_attention(q[seq:seq + n], k[seq:seq + n], v[seq:seq + n])
                a += n * length
            else:  # some query rows of one sequence, against all of its keys
                end = min(b, (seq + 1) * length)
                rows = q[seq:seq + 1, :, row:row + end - a]
                part = F.scaled_dot_product_attention(rows, k[seq:seq + 1], v[seq:seq + 1])
                a = end
            out.append(part.transpose(1, 2).reshape(-1, q.shape[1] * q.shape[3]))
        return torch.cat(out) if len(out) > 1 else out[0]


class Transformer(nn.Module):
    """XLM-RoBERTa's encoder over packed sequences."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        self.config = c
        self.word = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))

    def forward(self, ids: torch.Tensor, lengths: Sequence[int], slicer: Slicer | None = None) -> torch.Tensor:
        """``ids``: all sequences' tokens back to back; ``lengths``: sorted longest first."""
        x = self.word(ids) + self.position(self._positions(ids, lengths)) + self.token_type.weight[0]
        x = self.norm(x)
        runs = equal_length_runs(lengths)
        padded = padding_for(lengths, ids.device) if slicer is None and len(runs) > 1 else None
        for layer in self.layers:
            x = layer(x, runs, slicer, padded)
            if slicer is not None:
                slicer.checkpoint()
        return x

    def _positions(self, ids: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        # XLM-R numbers the non-pad tokens of each sequence from pad_token_id + 1.
        pad = self.config.pad_token_id
        real = (ids != pad).long()
        total = real.cumsum(0)
        lengths_t = torch.tensor(lengths, device=ids.device)
        starts = lengths_t.cumsum(0) - lengths_t
        before = torch.repeat_interleave(total[starts] - real[starts], lengths_t)
        return (total - before) * real + pad


@dataclass(frozen=True)
class Padding:
    """Where each packed token sits in a [count, length] padded batch, and which keys are real."""

    count: int
    length: int
    slots: torch.Tensor  # [tokens]: row * length + position of each packed token
    keys: torch.Tensor   # [count, 1, 1, length]: True for a real key


def padding_for(lengths: Sequence[int], device: torch.device) -> Padding | None:
    """A padded layout for attention, where one masked call beats one call per run of equal lengths.

    On CUDA a step of queries has a run per distinct length, and each run costs kernel launches in every
    layer; one masked call costs a few. Only where padding at most doubles the rows, or the padded batch
    is small. On a CPU the per-run calls without a mask are faster (``PADDED_ATTENTION_ON``).
    """
    count, length = len(lengths), max(lengths)
    if device.type not in PADDED_ATTENTION_ON or count * length > max(PADDING_AT_MOST * sum(lengths), PADDING_FREE):
        return None
    lengths_t = torch.tensor(lengths)
    rows = torch.repeat_interleave(torch.arange(count), lengths_t)
    starts = torch.repeat_interleave(lengths_t.cumsum(0) - lengths_t, lengths_t)
    slots = rows * length + torch.arange(len(rows)) - starts
    keys = (torch.arange(length)[None, :] < lengths_t[:, None])[:, None, None, :]
    return Padding(count, length, slots.to(device), keys.to(device))


def attention_kernels(device: torch.device) -> contextlib.AbstractContextManager:
    """The attention kernels a forward pass on ``device`` may use (``CUDA_ATTENTION`` on CUDA)."""
    return sdpa_kernel(CUDA_ATTENTION) if device.type == "cuda" else contextlib.nullcontext()


def equal_length_runs(lengths: Sequence[int]) -> list[tuple[int, int, int]]:
    """(start token, sequence count, length) for each run of equal consecutive lengths."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for n in lengths:
        if runs and runs[-1][2] == n and runs[-1][0] + runs[-1][1] * n == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, n)
        else:
            runs.append((start, 1, n))
        start += n
    return runs


# ---- loading weights -----------------------------------------------------------------------------------

_RENAMES = {
    "embeddings.word_embeddings.weight": "word.weight",
    "embeddings.position_embeddings.weight": "position.weight",
    "embeddings.token_type_embeddings.weight": "token_type.weight",
    "embeddings.LayerNorm.weight": "norm.weight",
    "embeddings.LayerNorm.bias": "norm.bias",
}
_LAYER_RENAMES = {
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "up",
    "output.dense": "down",
    "output.LayerNorm": "out_norm",
}


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The transformer's weights from safetensors or a torch file, without a model-class prefix."""
    for name in WEIGHT_FILES:
        file = folder / name
        if file.exists():
            return {_strip_prefix(k): v for k, v in _read_weights(file).items()}
    raise ModelLoadError(f"{folder}: no transformer weights ({' or '.join(WEIGHT_FILES)})")


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    """One weight file; one that cannot be read is an error that says so (not a config mismatch)."""
    if file.suffix == ".bin" and not zipfile.is_zipfile(file):
        raise ModelLoadError(f"{file}: not a torch zip archive (what torch.save writes since torch 1.6); "
                             "re-save it with torch.save, or convert it to model.safetensors")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a truncated download, a pickle with code, ...: say which file
        raise ModelLoadError(f"{file}: cannot read the weights ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise ModelLoadError(f"{file}: holds a {type(state).__name__}, not a state dict of tensors")
    return state


def _strip_prefix(key: str) -> str:
    for prefix in ("roberta.", "model.", "bert."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def convert_state_dict(state: dict[str, torch.Tensor], c: Config) -> dict[str, torch.Tensor]:
    """Map checkpoint names onto :class:`Transformer`'s, fusing query, key and value."""
    out = {new: state[old] for old, new in _RENAMES.items()}
    for i in range(c.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for part in ("weight", "bias"):
            out[f"layers.{i}.qkv.{part}"] = torch.cat(
                [state[f"{p}attention.self.{n}.{part}"] for n in ("query", "key", "value")])
            for old, new in _LAYER_RENAMES.items():
                out[f"layers.{i}.{new}.{part}"] = state[f"{p}{old}.{part}"]
    return out


def load_head(folder: Path, name: str, in_features: int, out_features: int | None) -> nn.Linear:
    """A head file as a Linear layer; missing or mis-shaped is an error, never a random head."""
    file = folder / name
    if not file.exists():
        raise ModelLoadError(f"{folder}: head {name} is missing; BGE-M3 needs both {' and '.join(HEADS)}")
    state = torch.load(file, map_location="cpu", weights_only=True)
    weight = state.get("weight") if isinstance(state, dict) else None
    if weight is None or weight.ndim != 2 or weight.shape[1] != in_features or (
            out_features is not None and weight.shape[0] != out_features):
        shape = None if weight is None else tuple(weight.shape)
        want = f"({out_features or 'N'}, {in_features})"
        raise ModelLoadError(f"{file}: weight has shape {shape}, expected {want} for hidden size {in_features}")
    head = nn.Linear(in_features, weight.shape[0], bias="bias" in state)
    head.load_state_dict(state)
    return head


# ---- the whole model ---------------------------------------------------------------------------------------

@dataclass
class HeadOutputs:
    """What one forward pass yields, on the CPU, float32."""

    dense: torch.Tensor | None          # [batch, hidden], L2-normalized
    sparse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (row, token id, weight)
    colbert: list[torch.Tensor] | None  # per sequence [length - 1, dim]
    cls: torch.Tensor | None = None     # [batch, hidden], the raw CLS states (not normalized)


class BGEM3Model(nn.Module):
    """Transformer plus the colbert and sparse heads, on one device, for inference only."""

    def __init__(self, config: Config, transformer: Transformer, colbert: nn.Linear, sparse: nn.Linear,
                 unused_token_ids: Sequence[int]) -> None:
        super().__init__()
        self.config = config
        self.transformer = transformer
        self.colbert_head = colbert
        self.sparse_head = sparse
        self.register_buffer("unused_ids", torch.tensor(sorted(set(unused_token_ids)), dtype=torch.long),
                             persistent=False)

    @classmethod
    def load(cls, folder: Path, device: torch.device, dtype: torch.dtype,
             unused_token_ids: Sequence[int]) -> "BGEM3Model":
        """Load weights and heads onto ``device``; the transformer in ``dtype``, the heads in float32."""
        c = Config.read(folder)
        transformer = Transformer(c)
        state = read_state_dict(folder)  # its own errors say what is wrong with the file
        try:
            transformer.load_state_dict(convert_state_dict(state, c))
        except (KeyError, RuntimeError) as e:
            raise ModelLoadError(f"{folder}: weights do not match config.json ({e})") from e
        colbert = load_head(folder, HEADS[0], c.hidden_size, None)
        sparse = load_head(folder, HEADS[1], c.hidden_size, 1)
        model = cls(c, transformer.to(dtype), colbert, sparse, unused_token_ids)
        return model.to(device).eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.unused_ids.device

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, lengths: Sequence[int], dense: bool = True, sparse: bool = True,
                colbert: bool = False, slicer: Slicer | None = None, raw_cls: bool = False) -> HeadOutputs:
        """Encode packed sequences (sorted longest first) and apply the requested heads (``raw_cls``: the CLS
        states before normalization as well).

        With a ``slicer``, the layers run in short slices and the slicer's pause runs between them.
        """
        ids = ids.to(self.device, non_blocking=True)
        with attention_kernels(self.device):
            hidden = self.transformer(ids, lengths, slicer).float()
        starts = torch.tensor([0, *lengths[:-1]], device=self.device).cumsum(0)
        return HeadOutputs(
            F.normalize(hidden[starts], dim=-1).cpu() if dense else None,
            self._sparse(hidden, ids, lengths) if sparse else None,
            self._colbert(hidden, starts, lengths) if colbert else None,
            hidden[starts].cpu() if raw_cls else None,
        )

    def _sparse(self, hidden, ids, lengths) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # relu(sparse_linear) per token, special tokens and non-positive weights dropped, max per token id.
        weights = torch.relu(self.sparse_head(hidden)).squeeze(-1)
        rows = torch.repeat_interleave(torch.arange(len(lengths), device=ids.device),
                                       torch.tensor(lengths, device=ids.device))
        keep = (weights > 0) & ~torch.isin(ids, self.unused_ids)
        keys = rows[keep] * self.config.vocab_size + ids[keep]
        unique, inverse = torch.unique(keys, return_inverse=True)
        best = torch.zeros(unique.shape, dtype=weights.dtype, device=ids.device)
        best = best.scatter_reduce(0, inverse, weights[keep], reduce="amax", include_self=False)
        unique = unique.cpu()
        return unique // self.config.vocab_size, unique % self.config.vocab_size, best.cpu()

    def _colbert(self, hidden, starts, lengths) -> list[torch.Tensor]:
        # One vector per token after CLS (the final </s> included), L2-normalised.
        keep = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        keep[starts] = False
        vectors = F.normalize(self.colbert_head(hidden[keep]), dim=-1).cpu()
        return list(vectors.split([n - 1 for n in lengths]))

    @property
    def dims(self) -> dict[str, int]:
        """Output sizes, as pymilvus reports them."""
        return {"dense": self.config.hidden_size, "colbert_vecs": self.colbert_head.out_features,
                "sparse": self.config.vocab_size}

