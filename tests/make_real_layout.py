"""Write tests/data/real-layout*: small checkpoints laid out exactly like BAAI/bge-m3, and FlagEmbedding's
output on them (tests/data/real-layout-golden.npz), for tests/test_real_layout.py.

Run by hand (not collected by pytest), from the repository root, in the CI venv (transformers 4.57,
FlagEmbedding 1.4.2, sentencepiece):

    .venv/bin/python tests/make_real_layout.py

What it writes, every file name of BAAI/bge-m3 but the images, the README and the ONNX export:

- ``real-layout/``: ``config.json`` of an ``XLMRobertaModel`` (2 layers, hidden 32, 8194 positions);
  ``pytorch_model.bin``, a torch zip with the pooler, and no safetensors; ``sentencepiece.bpe.model``, a
  SentencePiece unigram model (``nmt_nfkc``) trained on a small multilingual corpus (the project's own
  texts plus the lines below); ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``
  as ``XLMRobertaTokenizerFast.save_pretrained`` writes them (``"tokenizer_class": "XLMRobertaTokenizer"``);
  ``colbert_linear.pt``, ``sparse_linear.pt``; ``1_Pooling/config.json``, ``modules.json``,
  ``config_sentence_transformers.json``, ``sentence_bert_config.json``.
- ``real-layout-older/``: the same checkpoint, its ``tokenizer.json`` in the older form that hub
  checkpoints of the transformers 4.2x-4.3x era carry (BAAI/bge-m3's own among them): normalizer
  ``Sequence[Precompiled, Replace(" {2,}", " ")]``, pre-tokenizer and decoder ``Metaspace`` with
  ``add_prefix_space``.
- ``real-layout-golden.npz``: ``BGEM3FlagModel`` on each, for ``TEXTS`` as documents (8192 tokens) and
  queries (512), in tests/make_golden.py's layout with a ``FORM_`` prefix (``current_``, ``older_``);
  no ColBERT rows for the document over 8192 tokens (they would be most of the file).

Regenerate only when the fixture or the texts change; never from our own encoder.
"""
from __future__ import annotations

import io
import json
import shutil
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
FORMS = {"current": DATA / "real-layout", "older": DATA / "real-layout-older"}
GOLDEN = DATA / "real-layout-golden.npz"
HIDDEN, LAYERS, HEADS, INTERMEDIATE, POSITIONS = 32, 2, 2, 64, 8194
VOCAB_PIECES = 3000  # SentencePiece pieces (the corpus allows about this many)

# More training text in scripts and forms the project's own corpus lacks.
EXTRA_CORPUS = [
    "Die Warteschlange trennt Anfragen von Dokumenten, damit Suchanfragen nie warten müssen.",
    "Les résultats sont écrits dans la base de données vectorielle après chaque lot.",
    "El trabajador carga el modelo una vez antes de la primera tarea y luego procesa lotes.",
    "Каждый работник загружает модель один раз перед первой задачей и обрабатывает пакеты.",
    "Η βιβλιοθήκη ανοίγει στις εννέα το πρωί και κλείνει στις έξι το απόγευμα.",
    "查询和文档在不同的队列中传输，长文档按词元数量分批处理。",
    "長い文書はトークン数で分割され、短い質問は先に処理されます。",
    "검색 요청은 문서보다 먼저 처리되며 결과는 벡터 데이터베이스에 저장됩니다.",
    "يتم تخزين النتائج في قاعدة بيانات المتجهات بعد كل دفعة من النصوص.",
    "कार्यकर्ता एक समय में एक बैच संसाधित करता है और परिणाम वापस लिखता है।",
    "ห้องสมุดเปิดเวลาเก้าโมงเช้าและปิดเวลาหกโมงเย็น",
    "Full-width ＡＢＣ　ｄｅｆ　１２３ and half-width ｶﾀｶﾅ, ligatures ﬁ ﬂ, units ㎏ ㎞ ㍿, numbers ① ② Ⅻ.",
]

LONG_PARAGRAPH = ("The small library at the end of our street opens at nine. Die Bibliothek öffnet um neun Uhr. "
                  "Библиотека открывается в девять. 图书馆九点开门。 ")
# Texts where transformers 5.x's XLM-R tokenizer and tokenizer.json disagree (issue 12), and other edges.
TEXTS = [
    "The library opens at nine in the morning.",
    "Die Bibliothek öffnet um neun Uhr morgens.",
    "Библиотека открывается в девять часов утра.",
    "图书馆早上九点开门。",
    "図書館は朝九時に開きます。",
    "next\u0085line after a NEL",                     # U+0085 NEL
    "a literal \u2581 piece marker and \u2581\u2581two",  # '▁' in the text itself
    "\u2581",
    "word\u2581 and \u2581word",
    "fill in the  <mask> please",                        # <mask> after two spaces
    "<mask> first, then   <mask>  twice",
    "trailing space ",
    "trailing newline\n",
    "trailing spaces and tabs  \t ",
    "first paragraph.\r\n\r\nsecond paragraph after CRLF.\r\nthird line",
    "line one\r\nline two\r\n",
    "a paragraph.\r\n\r\n another, indented \r\n",
    "   three leading spaces",
    "\n\nleading newlines",
    "many     inner      spaces",
    "Full-width ＡＢＣ　ｄｅｆ　１２３！ and half-width ｶﾀｶﾅ",
    "compatibility: ﬁne ﬂow ㎏ ㎞ ① ② Ⅻ ™ ½ ｱｲｳ",
    "tab\tseparated\tcolumns",
    "mixed\u00a0no-break\u2009thin\u3000ideographic spaces",
    "emoji 🚀✅ and ZWJ 👩\u200d💻",
    LONG_PARAGRAPH * 700,                                # well over 8192 tokens: truncated
]


def corpus() -> list[str]:
    """The training lines: the project's own texts (replica corpus, sample corpus) and the lines above."""
    lines = (ROOT / "worker" / "replica" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    for row in (ROOT / "producer" / "data" / "sample_corpus.jsonl").read_text(encoding="utf-8").splitlines():
        lines.append(json.loads(row)["text"])
    return [line for line in lines + EXTRA_CORPUS if line.strip()]


def train_sentencepiece(out: Path) -> Path:
    """A unigram SentencePiece model with XLM-R's settings (nmt_nfkc, <unk>=0, <s>=1, </s>=2)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, model_type="unigram", vocab_size=VOCAB_PIECES,
        hard_vocab_limit=False, normalization_rule_name="nmt_nfkc", character_coverage=1.0, num_threads=1,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    path = out / "sentencepiece.bpe.model"
    path.write_bytes(model.getvalue())
    return path


def write_tokenizer(out: Path) -> int:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json as transformers writes them."""
    from transformers import XLMRobertaTokenizerFast

    spm_file = train_sentencepiece(out)
    tokenizer = XLMRobertaTokenizerFast(vocab_file=str(spm_file), model_max_length=8192)
    tokenizer.save_pretrained(str(out))
    return len(tokenizer)


def write_model(out: Path, vocab_size: int) -> None:
    """config.json and pytorch_model.bin (a torch zip, pooler included), and the two heads."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(0)
    config = XLMRobertaConfig(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                              num_attention_heads=HEADS, intermediate_size=INTERMEDIATE,
                              max_position_embeddings=POSITIONS, type_vocab_size=1, layer_norm_eps=1e-5, bos_token_id=0,
                              pad_token_id=1, eos_token_id=2, architectures=["XLMRobertaModel"])
    model = XLMRobertaModel(config, add_pooling_layer=True)
    model.save_pretrained(str(out), safe_serialization=False)
    raw = json.loads((out / "config.json").read_text())
    raw["transformers_version"] = "4.33.0"  # what BAAI/bge-m3 records (newer ones make 4.57.3+ warn)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    torch.save(torch.nn.Linear(HIDDEN, HIDDEN).state_dict(), out / "colbert_linear.pt")
    torch.save(torch.nn.Linear(HIDDEN, 1).state_dict(), out / "sparse_linear.pt")


def write_sentence_transformers_files(out: Path) -> None:
    """The sentence-transformers files BAAI/bge-m3 carries (CLS pooling, then normalise)."""
    (out / "1_Pooling").mkdir(exist_ok=True)
    pooling = {"word_embedding_dimension": HIDDEN, "pooling_mode_cls_token": True,
               "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False}
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    versions = {"__version__": {"sentence_transformers": "2.2.2", "transformers": "4.33.0", "pytorch": "2.1.2+cu121"}}
    files = {"1_Pooling/config.json": pooling, "modules.json": modules, "config_sentence_transformers.json": versions,
             "sentence_bert_config.json": {"max_seq_length": 8192, "do_lower_case": False}}
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2) + "\n")


def write_older_form(current: Path, older: Path) -> None:
    """A copy whose tokenizer.json has the older normalizer, pre-tokenizer and decoder."""
    shutil.copytree(current, older)
    file = older / "tokenizer.json"
    raw = json.loads(file.read_text(encoding="utf-8"))
    precompiled = next(n for n in raw["normalizer"]["normalizers"] if n["type"] == "Precompiled")
    raw["normalizer"] = {"type": "Sequence", "normalizers": [
        precompiled, {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]}
    metaspace = {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True}
    raw["pre_tokenizer"], raw["decoder"] = metaspace, dict(metaspace)
    file.write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def golden(folder: Path, form: str) -> dict[str, np.ndarray]:
    """FlagEmbedding's outputs on ``TEXTS``, both kinds (the >8192-token document without ColBERT)."""
    import torch
    from FlagEmbedding import BGEM3FlagModel
    from make_golden import flag_outputs

    torch.manual_seed(0)
    model = BGEM3FlagModel(str(folder), use_fp16=False, devices="cpu", passage_max_length=8192,
                           query_max_length=512)
    arrays = {**flag_outputs(model, "documents", TEXTS[:-1]), **flag_outputs(model, "queries", TEXTS)}
    long = model.encode_corpus(TEXTS[-1:], max_length=8192, return_dense=True, return_sparse=True)
    lexical = sorted((int(k), float(v)) for k, v in long["lexical_weights"][0].items())
    arrays.update(long_text=np.array(TEXTS[-1]), long_dense=np.asarray(long["dense_vecs"][0], np.float32),
                  long_sparse_ids=np.array([k for k, _ in lexical], np.int64),
                  long_sparse_weights=np.array([v for _, v in lexical], np.float32))
    return {f"{form}_{k}": v for k, v in arrays.items()}


def main() -> int:
    for folder in FORMS.values():
        shutil.rmtree(folder, ignore_errors=True)
    current = FORMS["current"]
    current.mkdir(parents=True)
    vocab_size = write_tokenizer(current)
    write_model(current, vocab_size)
    write_sentence_transformers_files(current)
    write_older_form(current, FORMS["older"])
    arrays: dict[str, np.ndarray] = {}
    for form, folder in FORMS.items():
        arrays.update(golden(folder, form))
    arrays["versions"] = np.array([f"{n}={version(n)}"
                                   for n in ("FlagEmbedding", "transformers", "tokenizers", "torch")])
    np.savez_compressed(GOLDEN, **arrays)
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in FORMS.values()}
    sizes[GOLDEN.name] = GOLDEN.stat().st_size
    print(f"vocabulary {vocab_size}; bytes {sizes}; {', '.join(arrays['versions'])}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_golden, beside this file
    sys.exit(main())
