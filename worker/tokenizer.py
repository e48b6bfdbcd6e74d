"""The checkpoint's own tokenizer: ``tokenizer.json`` run by the ``tokenizers`` library, and nothing else.

transformers is not involved, on purpose. Its tokenizer classes differ across versions in how they read a
checkpoint: transformers 5.x maps ``"tokenizer_class": "XLMRobertaTokenizer"`` to its own class, keeps only
the vocabulary, the charsmap and the post-processor of ``tokenizer.json`` and rebuilds the normalizer and
pre-tokenizer from its defaults, so some texts get other ids than FlagEmbedding gets under transformers 4.x
(which runs ``tokenizer.json`` as written). Running the file itself gives the same ids under any version.

The special tokens come from the checkpoint's own files, read with transformers' precedence:
``special_tokens_map.json`` over ``tokenizer_config.json``; a name is turned into an id by ``tokenizer.json``.
A role neither file names is the special token of BGE-M3's (XLM-R's) name among ``tokenizer.json``'s
added tokens, as transformers' XLM-R class defaults would have it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer

from worker.model import ModelLoadError

TOKENIZER_FILE = "tokenizer.json"
SPECIAL_FILES = ("special_tokens_map.json", "tokenizer_config.json")  # the first that names a token wins
# Each special token and the names a checkpoint may give it, in order (XLM-R: cls = bos = <s>, eos = sep = </s>).
SPECIAL_NAMES = {"cls": ("cls_token", "bos_token"), "eos": ("eos_token", "sep_token"), "pad": ("pad_token",),
                 "unk": ("unk_token",), "mask": ("mask_token",)}
XLMR_SPECIALS = {"cls": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>", "mask": "<mask>"}


@dataclass(frozen=True)
class SpecialIds:
    """The ids of the special tokens; cls and eos open and close every sequence."""

    cls: int
    eos: int
    pad: int | None = None
    unk: int | None = None
    mask: int | None = None

    @property
    def unused(self) -> list[int]:
        """Tokens that never get a sparse weight (FlagEmbedding drops cls, eos, pad and unk)."""
        return [i for i in (self.cls, self.eos, self.pad, self.unk) if i is not None]


class CheckpointTokenizer:
    """``tokenizer.json`` with truncation and padding off: the encoder truncates itself, and reports it."""

    def __init__(self, backend: Tokenizer, specials: SpecialIds) -> None:
        self.backend = backend
        self.specials = specials

    @classmethod
    def load(cls, folder: Path) -> "CheckpointTokenizer":
        """Read ``folder/tokenizer.json`` and the special tokens; anything missing is a ModelLoadError."""
        backend = _read_backend(folder)
        specials = _special_ids(folder, backend)
        _check_post_processor(folder, backend, specials)
        return cls(backend, specials)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without the special tokens around it (no character offsets: a third faster)."""
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def tokens(self, text: str) -> list[str]:
        """The pieces of one text as the model sees them, cls and eos included (for tests and debugging)."""
        return [self.id_to_token(i) for i in (self.specials.cls, *self.encode([text])[0], self.specials.eos)]

    def pieces(self, text: str, add_special_tokens: bool = True) -> list[list]:
        """TEI's ``/tokenize`` of one text: ``[id, text, special, start, stop]`` per token. A special token's
        text is the token itself, with no offsets; another's is its span of ``text``, and ``start`` and
        ``stop`` are UTF-8 byte offsets into it, as TEI gives them."""
        encoding = self.backend.encode(text, add_special_tokens=add_special_tokens)
        raw = text.encode("utf-8")
        at = None if len(raw) == len(text) else list(accumulate((len(c.encode("utf-8")) for c in text), initial=0))
        out: list[list] = []
        for token_id, (start, stop), special, token in zip(encoding.ids, encoding.offsets,
                                                           encoding.special_tokens_mask, encoding.tokens):
            if special:
                out.append([token_id, token, True, None, None])
                continue
            if at is not None:  # character offsets to byte offsets
                start, stop = at[start], at[stop]
            out.append([token_id, raw[start:stop].decode("utf-8", errors="replace"), False, start, stop])
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of token ids (TEI's ``/decode``)."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Ids run from 0 to this, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """The id of a piece, or None where the vocabulary lacks it."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The piece of an id."""
        return self.backend.id_to_token(token_id)


def _read_backend(folder: Path) -> Tokenizer:
    file = folder / TOKENIZER_FILE
    if not file.is_file():
        found = [n for n in ("sentencepiece.bpe.model", "tokenizer.model", "vocab.json") if (folder / n).exists()]
        also = f" (it has only {', '.join(found)})" if found else ""
        raise ModelLoadError(
            f"{folder}: no {TOKENIZER_FILE}{also}. The worker tokenizes exactly as the checkpoint's "
            f"{TOKENIZER_FILE} says and never converts a tokenizer itself; write one with transformers 4.x: "
            f"XLMRobertaTokenizerFast.from_pretrained(DIR).save_pretrained(DIR)")
    try:
        backend = Tokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise ModelLoadError(f"{file}: cannot read the tokenizer ({e})") from e
    backend.no_truncation()
    backend.no_padding()
    return backend


def _special_tokens(folder: Path) -> dict[str, str]:
    """Each special-token name the checkpoint's files define, as its text (special_tokens_map.json first)."""
    found: dict[str, str] = {}
    for name in reversed(SPECIAL_FILES):  # later files override earlier ones
        file = folder / name
        if not file.is_file():
            continue
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{file}: not readable JSON ({e})") from e
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{file}: not a JSON object")
        for key, value in raw.items():
            if key.endswith("_token"):
                text = value.get("content") if isinstance(value, dict) else value
                if isinstance(text, str):
                    found[key] = text
    return found


def _special_ids(folder: Path, backend: Tokenizer) -> SpecialIds:
    named = _special_tokens(folder)
    added = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    ids: dict[str, int | None] = {}
    for role, keys in SPECIAL_NAMES.items():
        text = next((named[k] for k in keys if k in named), None)
        if text is None:  # not named: the added special token of XLM-R's name, if there is one
            ids[role] = added.get(XLMR_SPECIALS[role])
            continue
        ids[role] = backend.token_to_id(text)
        if ids[role] is None:
            raise ModelLoadError(f"{folder}: special token {text!r} ({role}) is not in {TOKENIZER_FILE}")
    for role in ("cls", "eos"):
        if ids[role] is None:
            raise ModelLoadError(f"{folder}: {' or '.join(SPECIAL_FILES)} names no {SPECIAL_NAMES[role][0]} "
                                 f"(nor {SPECIAL_NAMES[role][1]}) and {TOKENIZER_FILE} has no special "
                                 f"{XLMR_SPECIALS[role]}; BGE-M3 needs it around every text")
    return SpecialIds(**ids)  # type: ignore[arg-type]


def _check_post_processor(folder: Path, backend: Tokenizer, specials: SpecialIds) -> None:
    """The reference lets ``tokenizer.json``'s post-processor add the special tokens; ours must agree."""
    ids = backend.encode("a", add_special_tokens=True).ids
    if not ids or ids[0] != specials.cls or ids[-1] != specials.eos:
        raise ModelLoadError(
            f"{folder}: {TOKENIZER_FILE}'s post-processor does not put {backend.id_to_token(specials.cls)!r} "
            f"before and {backend.id_to_token(specials.eos)!r} after a text (it gives ids {ids}), so this "
            f"encoder would not equal the reference on it")
