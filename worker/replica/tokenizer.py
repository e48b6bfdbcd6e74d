"""The offline XLM-R layout Unigram tokenizer of random-weight BGE-M3 replicas.

``build_tokenizer`` makes a tokenizer with BGE-M3's special-token layout and
any vocabulary size: pieces a Unigram trainer learns from
``corpus.txt`` (text written for this project), then whole corpus
words, n-gram and ideograph coverage pieces and fillers.  ``save_tokenizer``
writes it the way XLM-R checkpoints store theirs.  Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import string
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import XLMRobertaTokenizerFast

MODEL_MAX_LENGTH = 8192  # BGE-M3's document limit in tokens

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3, as in fairseq XLM-R
MASK_TOKEN = "<mask>"  # always the last id
UNK_ID = 3
METASPACE = "\u2581"

CORPUS_PATH = Path(__file__).with_name("corpus.txt")

# Unigram log-probability scores for pieces that were not learned by the
# trainer.  Learned pieces score roughly -3..-10; whole corpus words sit in
# that range so they win, n-gram pieces a little lower so they only fill gaps,
# fillers far below anything a real segmentation would use.
WORD_SCORE = -7.0
NGRAM_SCORE = -9.0
CHAR_SCORE = -10.0
FILLER_SCORE = -30.0


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


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


def save_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
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


def corpus_text() -> str:
    """The embedded multilingual training text, normalised like the tokenizer does."""
    return normalizers.NFKC().normalize_str(CORPUS_PATH.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------
# Piece inventory
# --------------------------------------------------------------------------


def _piece_inventory(n_pieces: int) -> list[tuple[str, float]]:
    """Return exactly ``n_pieces`` distinct (piece, score) pairs, best first.

    Learned pieces come first, then whole corpus words, then n-gram coverage
    pieces (most useful first) and finally filler pieces if room is left.
    Truncating this list is how smaller vocabularies are made.
    """
    text = corpus_text()
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
