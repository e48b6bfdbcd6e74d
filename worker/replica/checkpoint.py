"""Random-weight BGE-M3 replicas: checkpoints with BGE-M3's exact on-disk layout.

A replica directory holds what ``FlagEmbedding.BGEM3FlagModel`` (and pymilvus'
``BGEM3EmbeddingFunction``) load from a real BGE-M3 download: an
``XLMRobertaModel`` in ``model.safetensors`` plus ``config.json``, the two
heads ``colbert_linear.pt`` / ``sparse_linear.pt`` and an XLM-R style Unigram
tokenizer.  The weights are random, so the embeddings mean nothing; replicas
exist so tests and capacity planning can run the real loading and inference
code without the Hugging Face hub.

The tokenizer is built offline by ``worker.replica.tokenizer`` from
``corpus.txt`` (text written for this project), so no vocabulary is
downloaded either.

Usage::

    python -m worker.replica DIR --size tiny|small|base|large [--seed N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import XLMRobertaConfig, XLMRobertaModel

from producer.contract.errors import ConfigError
from worker.replica.tokenizer import MODEL_MAX_LENGTH, build_tokenizer, corpus_text, save_tokenizer


@dataclass(frozen=True)
class ReplicaSize:
    """Shape of one replica size (XLM-RoBERTa hyper-parameters)."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab_size: int


# BGE-M3's real vocabulary has 250002 entries; "tiny" uses a few thousand so
# the committed test checkpoint stays small.
SIZES: dict[str, ReplicaSize] = {
    "tiny": ReplicaSize(layers=2, hidden=32, heads=2, intermediate=64, vocab_size=4096),
    "small": ReplicaSize(layers=6, hidden=384, heads=12, intermediate=1536, vocab_size=250002),
    "base": ReplicaSize(layers=12, hidden=768, heads=12, intermediate=3072, vocab_size=250002),
    "large": ReplicaSize(layers=24, hidden=1024, heads=16, intermediate=4096, vocab_size=250002),
}

# XLM-R positions start after the padding index (1), so 8194 positions give
# every size BGE-M3's 8192-token document limit.
MAX_POSITION_EMBEDDINGS = 8194
CHECKPOINT_TRANSFORMERS_VERSION = "4.33.0"  # what BAAI/bge-m3's config.json records

MARKER_FILE = "m3q_replica.json"

# Typical |sparse_linear(h)| is about this value (real BGE-M3 lexical weights
# are mostly 0.05-0.35).
SPARSE_SCALE = 0.25
# Share of probe tokens whose sparse weight is positive.  Above one half
# because a text's tokens share context, so per-text shares scatter around
# this value; 0.6 keeps short texts from ending up with no lexical weights.
SPARSE_POSITIVE_SHARE = 0.6


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def write_replica(path: str | os.PathLike, size: str = "small", seed: int = 0) -> Path:
    """Write a random-weight BGE-M3 replica of ``size`` into directory ``path``.

    The directory is created if needed; existing replica files are overwritten.
    The same ``size`` and ``seed`` always produce the same files.  Returns the
    directory as a ``Path``.
    """
    if size not in SIZES:
        raise ConfigError(f"unknown replica size {size!r}; choose one of {sorted(SIZES)}")
    shape = SIZES[size]
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(shape.vocab_size)
    save_tokenizer(tokenizer, out)
    model = _build_model(shape, seed)
    model.save_pretrained(out, safe_serialization=True)
    _pin_transformers_version(out / "config.json")
    colbert, sparse = _build_heads(model, tokenizer, seed)
    torch.save(colbert.state_dict(), out / "colbert_linear.pt")
    torch.save(sparse.state_dict(), out / "sparse_linear.pt")
    _write_readme(out, size, shape, seed)
    _write_marker(out, size, seed)
    _make_world_readable(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: ``python -m worker.replica DIR --size S [--seed N]``."""
    parser = argparse.ArgumentParser(prog="python -m worker.replica",
                                     description="Write a random-weight BGE-M3 replica checkpoint.")
    parser.add_argument("directory", help="output directory")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_replica(args.directory, size=args.size, seed=args.seed)
    print(out)
    return 0


# --------------------------------------------------------------------------
# Model and heads
# --------------------------------------------------------------------------


def _pin_transformers_version(config_path: Path) -> None:
    """Record the transformers version BAAI/bge-m3's config.json records, not the one that wrote the replica.

    transformers 4.57.3 and later read a local config.json written by a newer version than 4.57.2 as a
    possible Mistral checkpoint, and warn at every tokenizer load that its regex is wrong; the real
    checkpoint's older version does not trigger that, so neither does the replica's.
    """
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["transformers_version"] = CHECKPOINT_TRANSFORMERS_VERSION
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _model_config(shape: ReplicaSize) -> XLMRobertaConfig:
    return XLMRobertaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        position_embedding_type="absolute",
    )


def _build_model(shape: ReplicaSize, seed: int) -> XLMRobertaModel:
    """An ``XLMRobertaModel`` of ``shape`` with weights drawn from a seeded generator."""
    model = XLMRobertaModel(_model_config(shape))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            _init_parameter(name, param, shape.layers, generator)
        # Like HF's own init: padding rows stay zero.
        model.embeddings.word_embeddings.weight[1].zero_()
        model.embeddings.position_embeddings.weight[1].zero_()
    return model.eval()


def _init_parameter(name: str, param: torch.Tensor, layers: int, generator: torch.Generator) -> None:
    """Initialise one parameter so a random model's outputs stay informative.

    HF's std=0.02 init makes every text's CLS vector nearly identical and deep
    stacks collapse all tokens onto one direction.  Instead: unit-scale word
    embeddings, sharp attention (large query/key scale, so tokens attend to a
    few content-dependent positions) and residual branches scaled by
    1/sqrt(layers) so 24 layers do not wash token identity out.
    """
    if "LayerNorm" in name or "layer_norm" in name:
        param.fill_(1.0 if name.endswith("weight") else 0.0)
    elif name.endswith("bias") or "token_type_embeddings" in name:
        param.zero_()  # one token type only: a constant offset would carry no signal
    elif "word_embeddings" in name:
        param.normal_(0.0, 1.0, generator=generator)
    elif "position_embeddings" in name:
        param.normal_(0.0, 0.3, generator=generator)
    else:
        fan_in = param.shape[1]
        param.normal_(0.0, _linear_gain(name, layers) / math.sqrt(fan_in), generator=generator)


def _linear_gain(name: str, layers: int) -> float:
    """Gain over 1/sqrt(fan_in) for a Linear weight, chosen by its role."""
    if ".query." in name or ".key." in name:
        return 2.0
    if name.endswith("output.dense.weight"):  # attention and FFN outputs feed the residual sum
        return 1.0 / math.sqrt(layers)
    return 1.0


def _build_heads(
    model: XLMRobertaModel, tokenizer: Tokenizer, seed: int
) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """The ColBERT head Linear(h, h) and the sparse head Linear(h, 1), as BGE-M3 stores them.

    The sparse bias is calibrated on the corpus so that a share of
    ``SPARSE_POSITIVE_SHARE`` of the tokens of typical text get a positive
    lexical weight relu(sparse_linear(h)); the rest get none.
    """
    hidden = model.config.hidden_size
    generator = torch.Generator().manual_seed(seed + 1)  # separate stream from the encoder
    colbert = torch.nn.Linear(hidden, hidden)
    sparse = torch.nn.Linear(hidden, 1)
    with torch.no_grad():
        colbert.weight.normal_(0.0, 1.0 / math.sqrt(hidden), generator=generator)
        colbert.bias.zero_()
        sparse.weight.normal_(0.0, SPARSE_SCALE / math.sqrt(hidden), generator=generator)
        pre_activation = _probe_hidden_states(model, tokenizer) @ sparse.weight[0]
        threshold = torch.quantile(pre_activation, 1.0 - SPARSE_POSITIVE_SHARE).item()
        # Rounded so thread-count float noise cannot change the saved bytes.
        sparse.bias.fill_(round(-threshold, 3))
    return colbert, sparse


def _probe_hidden_states(model: XLMRobertaModel, tokenizer: Tokenizer, max_tokens: int = 32) -> torch.Tensor:
    """Last hidden states of the ordinary tokens that open each corpus line.

    Short prefixes keep this cheap for the 24-layer size; ~800 tokens pin a
    median well enough.
    """
    states = []
    with torch.inference_mode():
        for line in corpus_text().splitlines():
            ids = tokenizer.encode(line).ids
            ids = ids[: max_tokens - 1] + ids[-1:]  # keep the closing </s>
            if len(ids) > 2:
                output = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
                states.append(output[1:-1])
    return torch.cat(states).clone()


# --------------------------------------------------------------------------
# Documentation files
# --------------------------------------------------------------------------


def _write_readme(out: Path, size: str, shape: ReplicaSize, seed: int) -> None:
    text = f"""# m3-queue BGE-M3 replica ({size}, seed {seed}) - RANDOM WEIGHTS

**The weights in this directory are RANDOM.  Its embeddings, similarities and
lexical weights mean nothing.**

This is an m3-queue replica of BAAI/bge-m3's on-disk format, written by
`python -m worker.replica` for tests and capacity planning.  It loads with
FlagEmbedding's `BGEM3FlagModel` and pymilvus' `BGEM3EmbeddingFunction` and
costs the same compute per token as a real model of its shape:

| layers | hidden | heads | intermediate | vocab | max tokens |
| --- | --- | --- | --- | --- | --- |
| {shape.layers} | {shape.hidden} | {shape.heads} | {shape.intermediate} | {shape.vocab_size} | {MODEL_MAX_LENGTH} |

Only timings, memory use and output shapes measured with it are meaningful.
Never index or serve its vectors as if they were BGE-M3 embeddings.

The tokenizer is an XLM-R layout Unigram tokenizer built offline from a small
text sample; it is not BGE-M3's vocabulary, so token ids differ from the real
model's, while token counts per text are of a similar order.
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def _make_world_readable(out: Path) -> None:
    """safetensors writes model.safetensors as 0600; workers may run as another user."""
    for path in out.iterdir():
        if path.is_file():
            path.chmod(path.stat().st_mode | 0o444)


def _write_marker(out: Path, size: str, seed: int) -> None:
    marker = {"m3q_replica": True, "size": size, "seed": seed, "random_weights": True}
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")

