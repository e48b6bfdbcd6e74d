"""Random-weight BGE-M3 replicas: checkpoints with BGE-M3's exact on-disk layout.

A replica directory holds what ``FlagEmbedding.BGEM3FlagModel`` (and pymilvus'
``BGEM3EmbeddingFunction``) load from a real BGE-M3 download: an
``XLMRobertaModel`` in ``model.safetensors`` plus ``config.json``, the two
heads ``colbert_linear.pt`` / ``sparse_linear.pt`` and an XLM-R style Unigram
tokenizer.  The weights are random, so the embeddings mean nothing; replicas
exist so tests and capacity planning can run the real loading and inference
code without the Hugging Face hub.

The tokenizer is built offline from ``replica_corpus.txt`` (text written for
this project), so no vocabulary is downloaded either.

Usage::

    python -m worker.replica DIR --size tiny|small|base|large [--seed N]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import string
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizerFast


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
MODEL_MAX_LENGTH = 8192

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3, as in fairseq XLM-R
MASK_TOKEN = "<mask>"  # always the last id
UNK_ID = 3
METASPACE = "\u2581"

CORPUS_PATH = Path(__file__).with_name("replica_corpus.txt")
MARKER_FILE = "m3q_replica.json"

# Unigram log-probability scores for pieces that were not learned by the
# trainer.  Learned pieces score roughly -3..-10; whole corpus words sit in
# that range so they win, n-gram pieces a little lower so they only fill gaps,
# fillers far below anything a real segmentation would use.
WORD_SCORE = -7.0
NGRAM_SCORE = -9.0
CHAR_SCORE = -10.0
FILLER_SCORE = -30.0

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
        raise ValueError(f"unknown replica size {size!r}; choose one of {sorted(SIZES)}")
    shape = SIZES[size]
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(shape.vocab_size)
    _save_tokenizer(tokenizer, out)
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


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """Build the XLM-R layout Unigram tokenizer with exactly ``vocab_size`` ids.

    ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, ordinary pieces from 4 and
    ``<mask>`` = ``vocab_size - 1``.  Nothing is downloaded.
    """
    n_pieces = vocab_size - len(SPECIAL_TOKENS) - 1
    vocab = [(token, 0.0) for token in SPECIAL_TOKENS]
    vocab += _piece_inventory(n_pieces)
    vocab.append((MASK_TOKEN, 0.0))

    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=UNK_ID, byte_fallback=False))
    # XLM-R's sentencepiece normaliser is NFKC plus whitespace clean-up.
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    specials = [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    # As in XLM-R, "<mask>" swallows the space before it.
    specials.append(AddedToken(MASK_TOKEN, lstrip=True, special=True, normalized=False))
    tokenizer.add_special_tokens(specials)
    return tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: ``python -m worker.replica DIR --size S [--seed N]``."""
    parser = argparse.ArgumentParser(description="Write a random-weight BGE-M3 replica checkpoint.")
    parser.add_argument("directory", help="output directory")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_replica(args.directory, size=args.size, seed=args.seed)
    print(out)
    return 0


# --------------------------------------------------------------------------
# Tokenizer: piece inventory
# --------------------------------------------------------------------------


def _piece_inventory(n_pieces: int) -> list[tuple[str, float]]:
    """Return exactly ``n_pieces`` distinct (piece, score) pairs, best first.

    Learned pieces come first, then whole corpus words, then n-gram coverage
    pieces (most useful first) and finally filler pieces if room is left.
    Truncating this list is how smaller vocabularies are made.
    """
    text = _corpus_text()
    learned = _learned_pieces(text)
    if n_pieces < len(learned):
        raise ValueError(f"vocabulary too small: need at least {len(learned) + 5} ids")
    seen_ngrams = _substring_counts(text)
    ngrams = _ngram_pieces()
    used_ngrams = [p for p in ngrams if seen_ngrams[p]]
    unused_ngrams = [p for p in ngrams if not seen_ngrams[p]]
    used_ngrams.sort(key=lambda p: -seen_ngrams[p])  # stable: ties keep generation order
    unused_ngrams.sort(key=len)
    tiers: list[tuple[Iterable[str], float]] = [
        (_word_pieces(text), WORD_SCORE),
        (used_ngrams, NGRAM_SCORE),
        (_ideograph_pieces(), CHAR_SCORE),
        (unused_ngrams, NGRAM_SCORE),
        (_filler_pieces(), FILLER_SCORE),
    ]
    return _take_unique(learned, tiers, n_pieces)


def _take_unique(
    head: list[tuple[str, float]], tiers: list[tuple[Iterable[str], float]], n: int
) -> list[tuple[str, float]]:
    """Append pieces from ``tiers`` to ``head`` (skipping duplicates) until ``n`` pieces."""
    pieces = list(head)
    seen = {piece for piece, _ in pieces} | set(SPECIAL_TOKENS) | {MASK_TOKEN}
    for candidates, score in tiers:
        for piece in candidates:
            if len(pieces) == n:
                return pieces
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, score))
    return pieces


def _corpus_text() -> str:
    """The embedded multilingual training text, normalised like the tokenizer does."""
    return normalizers.NFKC().normalize_str(CORPUS_PATH.read_text(encoding="utf-8"))


def _learned_pieces(text: str) -> list[tuple[str, float]]:
    """Train a Unigram model on ``text``; return its pieces (no specials) and scores."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=8000,  # an upper bound; a corpus this small yields ~2k pieces
        special_tokens=list(SPECIAL_TOKENS),
        unk_token="<unk>",
        initial_alphabet=_base_alphabet(),
        max_piece_length=16,
        show_progress=False,
    )
    with _single_threaded_tokenizers():
        tokenizer.train_from_iterator(text.splitlines(), trainer)
    vocab = json.loads(tokenizer.to_str())["model"]["vocab"]
    pieces = [(piece, score) for piece, score in vocab if piece not in SPECIAL_TOKENS]
    # Characters the EM step did not keep get `floor + k * 1e-4` in hash-set
    # order, which changes from run to run: give that whole band the floor
    # score and break ties by name so the output is reproducible.
    floor = round(min(score for _, score in pieces), 4)
    pieces = [(piece, floor if score < floor + 0.2 else round(score, 4)) for piece, score in pieces]
    return sorted(pieces, key=lambda item: (-item[1], item[0]))


@contextlib.contextmanager
def _single_threaded_tokenizers() -> Iterator[None]:
    """Run the `tokenizers` trainer serially: parallel EM sums are order dependent."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _char_range(first: int, last: int) -> list[str]:
    return [chr(code) for code in range(first, last + 1)]


def _base_alphabet() -> list[str]:
    """Characters every replica vocabulary contains, even if the corpus lacks them."""
    return (
        _char_range(0x21, 0x7E)  # printable ASCII
        + _char_range(0xC0, 0x17F)  # Latin-1 letters and Latin Extended-A
        + _char_range(0x386, 0x3CE)  # Greek
        + _char_range(0x400, 0x45F)  # Cyrillic
        + _char_range(0x621, 0x64A)  # Arabic letters
        + _char_range(0x900, 0x97F)  # Devanagari
        + _char_range(0x3000, 0x303F)  # CJK punctuation
        + _char_range(0x3041, 0x3096)  # Hiragana
        + _char_range(0x30A1, 0x30FC)  # Katakana
        + list("\u2013\u2014\u2018\u2019\u201c\u201d\u2026\u2022\u20ac\u00a3\u00a5\u00b0\u00a7\u00a9\u00ae")
    )


def _word_pieces(text: str) -> list[str]:
    """Whole-word pieces for every alphabetic corpus word, most frequent first.

    Whole words are what make a real 250k vocabulary tokenize common text at
    ~1.3 pieces per word; the trainer alone keeps too few from a small corpus.
    """
    counts = Counter(word.lower() for word in text.split() if word.isalpha() and len(word) <= 16)
    ranked = sorted(counts, key=lambda word: (-counts[word], word))
    return [METASPACE + form for word in ranked for form in (word, word.capitalize())]


# Latin syllable parts: onset + nucleus + coda covers most pronounceable
# fragments of English, German, French and Spanish words.
_ONSETS = [""] + list("bcdfghjklmnprstvwxyz") + (
    "bl br ch cl cr dr fl fr gl gr kn ph pl pr qu sc sh sk sl sm sn sp st sw th tr tw wh wr "
    "sch scr spl spr str thr"
).split()
_NUCLEI = list("aeiouy") + "ai au ay ea ee ei eu ia ie io oa oi oo ou ow oy ue ui".split()
_CODAS = [""] + list("bcdfgklmnprstvxz") + (
    "ck ct ft ld lf lk ll lm lp lt mb mp nd ng nk ns nt pt rb rc rd rk rl rm rn rp rs rt "
    "sh sk sp ss st th tch ch dge nce nse rse rth"
).split()


def _ngram_pieces() -> list[str]:
    """Coverage pieces for unseen words: Latin syllables, bigrams in several scripts, digits."""
    syllables = sorted({o + n + c for o in _ONSETS for n in _NUCLEI for c in _CODAS})
    pieces = [p for s in syllables for p in (METASPACE + s, METASPACE + s.capitalize(), s)]
    alphabets = [
        string.ascii_lowercase,
        string.ascii_uppercase,
        "".join(_char_range(0x430, 0x44F)) + "\u0451",  # Russian lower case
        "".join(_char_range(0x3B1, 0x3C9)),  # Greek lower case
    ]
    for letters in alphabets:
        bigrams = ["".join(pair) for pair in itertools.product(letters, repeat=2)]
        pieces += [METASPACE + b for b in bigrams] + bigrams
        pieces += [METASPACE + b[0].upper() + b[1] for b in bigrams]  # capitalised word starts
    digits = ["".join(d) for n in (1, 2, 3) for d in itertools.product(string.digits, repeat=n)]
    return pieces + [METASPACE + d for d in digits] + digits


def _ideograph_pieces() -> list[str]:
    """Single CJK ideographs and Hangul syllables, so CJK text does not become <unk>."""
    return _char_range(0x4E00, 0x9FFF) + _char_range(0xAC00, 0xD7A3)


def _filler_pieces() -> Iterator[str]:
    """Unreachable-in-practice pieces that only pad a vocabulary to its size."""
    for index in itertools.count():
        yield f"{METASPACE}m3q-filler-{index:06d}"


def _substring_counts(text: str, max_len: int = 9) -> Counter[str]:
    """Count every substring (up to ``max_len``) of the corpus's ▁-prefixed words."""
    counts: Counter[str] = Counter()
    for word in text.split():
        marked = METASPACE + word
        for start in range(len(marked)):
            for end in range(start + 1, min(len(marked), start + max_len) + 1):
                counts[marked[start:end]] += 1
    return counts


def _save_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    """Save tokenizer.json, tokenizer_config.json and special_tokens_map.json as XLM-R does."""
    fast = XLMRobertaTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=MODEL_MAX_LENGTH, clean_up_tokenization_spaces=True
    )
    fast.save_pretrained(out, legacy_format=False)
    # Same content as the pretty-printed file, at under half the size.
    fast.backend_tokenizer.save(str(out / "tokenizer.json"), pretty=False)
    # BGE-M3 names the slow class; AutoTokenizer still picks the fast one, and
    # transformers 5 maps the name to its single tokenizers-backed class.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "XLMRobertaTokenizer"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


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
        for line in _corpus_text().splitlines():
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


if __name__ == "__main__":
    raise SystemExit(main())
