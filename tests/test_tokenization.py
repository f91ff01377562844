"""Tokenizers: training, special ids, round trips, the errors for bad files, WordPiece ids
identical to HuggingFace's BertTokenizer (and google-research/bert's), and opening HuggingFace,
google and tfbert directories."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from tfbert import tokenization
from tfbert.tokenization import TokenizerError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL_IDS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}

_WORDS = ("the river water stone rain falls slowly into valley and a old man walked along road "
          "carrying bread towards village where children played quietly under tall trees near "
          "bridge while evening light faded over distant hills beyond fields of wheat").split()
_RU_WORDS = "река вода камень дождь медленно течёт в долину и старый человек шёл по дороге".split()


def write_corpus(path, num_documents=30, seed=0) -> str:
    """Synthetic English and Russian prose: one sentence per line, blank line between docs."""
    rng = random.Random(seed)
    documents = []
    for d in range(num_documents):
        words = _RU_WORDS if d % 3 == 2 else _WORDS
        sentences = []
        for _ in range(rng.randint(2, 9)):
            sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
            sentences.append(sentence.capitalize() + rng.choice([".", ".", "?", "!"]))
        documents.append("\n".join(sentences))
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(documents) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def spm_model(corpus, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("spm") / "spm")
    return tokenization.train_sentencepiece([corpus], prefix, vocab_size=120)


@pytest.fixture(scope="module")
def wordpiece_vocab(corpus, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("wordpiece") / "vocab.txt")
    return tokenization.train_wordpiece([corpus], path, vocab_size=150)


def test_sentencepiece_special_ids_and_size(spm_model):
    tok = tokenization.load_tokenizer("sentencepiece", spm_model)
    assert isinstance(tok, tokenization.SentencePieceTokenizer)
    assert tok.special_ids == SPECIAL_IDS
    assert tok.convert_ids_to_tokens(range(5)) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tok.vocab_size == 120
    assert tok.tokenizer_type == "sentencepiece"
    assert tok.files == [spm_model]
    assert os.path.exists(spm_model[:-len(".model")] + ".vocab")


def test_sentencepiece_round_trip(spm_model):
    tok = tokenization.load_tokenizer("sentencepiece", spm_model)
    text = "The old man walked along the road."
    tokens = tok.tokenize(text)
    assert len(tokens) > 1
    ids = tok.convert_tokens_to_ids(tokens)
    assert tok.convert_ids_to_tokens(ids) == tokens
    assert "".join(tokens).replace("\u2581", " ").strip() == text
    assert tok.special_ids["unk"] not in ids
    # The batched path gives what one call per text gives.
    texts = [text, "Река течёт в долину.", ""]
    assert tok.tokenize_batch(texts) == [tok.tokenize(t) for t in texts]
    assert tok.tokenize("") == []


def test_sentencepiece_training_is_reproducible(corpus, spm_model, tmp_path):
    # The .model file records its output prefix, so compare the pieces and their scores.
    again = tokenization.train_sentencepiece([corpus], str(tmp_path / "spm"), vocab_size=120)
    a = tokenization.load_tokenizer("sentencepiece", spm_model)
    b = tokenization.load_tokenizer("sentencepiece", again)
    assert [(a._sp.id_to_piece(i), a._sp.get_score(i)) for i in range(a.vocab_size)] == \
        [(b._sp.id_to_piece(i), b._sp.get_score(i)) for i in range(b.vocab_size)]


def test_sentencepiece_subword_continuation(spm_model):
    tok = tokenization.load_tokenizer("sentencepiece", spm_model)
    assert not tok.is_subword_continuation("\u2581river")
    assert tok.is_subword_continuation("ing")
    assert not tok.is_subword_continuation("[CLS]")
    assert not tok.is_subword_continuation("[MASK]")


def test_wordpiece_special_ids_and_round_trip(wordpiece_vocab):
    with open(wordpiece_vocab, encoding="utf-8") as f:
        assert [next(f).strip() for _ in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                       "[MASK]"]
    tok = tokenization.load_tokenizer("wordpiece", wordpiece_vocab)
    assert isinstance(tok, tokenization.WordPieceTokenizer)
    assert tok.special_ids == SPECIAL_IDS
    assert tok.tokenizer_type == "wordpiece"
    assert tok.files == [wordpiece_vocab]
    tokens = tok.tokenize("The RIVER flows, slowly.")
    assert tokens == tok.tokenize("the river flows, slowly.")  # lower_case
    assert tokens[:2] == ["the", "river"]
    assert tokens[-1] == "."
    ids = tok.convert_tokens_to_ids(tokens)
    assert tok.convert_ids_to_tokens(ids) == tokens
    # A character the corpus never had makes its word unknown.
    assert tok.tokenize("zxz") == ["[UNK]"]
    assert tok.tokenize_batch(["the river", "", "река"]) == [
        tok.tokenize("the river"), [], tok.tokenize("река")]
    assert tok.is_subword_continuation("##s") and not tok.is_subword_continuation("river")


def test_wordpiece_handles_google_style_vocab(tmp_path):
    # google's vocab.txt: [PAD] at 0, [UNK]/[CLS]/[SEP]/[MASK] at 100..103.
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + [
        "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s", ","]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = tokenization.load_tokenizer("wordpiece", str(path))
    assert tok.special_ids == {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
    assert tok.vocab_size == len(vocab)
    assert tok.tokenize("Hello worlds, planet") == ["hello", "world", "##s", ",", "[UNK]"]


def test_load_errors(spm_model, wordpiece_vocab, tmp_path):
    missing = str(tmp_path / "nope.model")
    for kind in ("sentencepiece", "wordpiece"):
        with pytest.raises(TokenizerError, match="nope.model does not exist"):
            tokenization.load_tokenizer(kind, missing)
    # A vocab.txt is not a SentencePiece model, and the reverse.
    with pytest.raises(TokenizerError, match="not a valid SentencePiece model"):
        tokenization.load_tokenizer("sentencepiece", wordpiece_vocab)
    with pytest.raises(TokenizerError, match="not a UTF-8 text vocabulary"):
        tokenization.load_tokenizer("wordpiece", spm_model)
    no_specials = tmp_path / "vocab.txt"
    no_specials.write_text("[PAD]\n[UNK]\n[CLS]\nhello\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"lacks the special token\(s\) \['\[SEP\]', "
                                             r"'\[MASK\]'\]"):
        tokenization.load_tokenizer("wordpiece", str(no_specials))
    with pytest.raises(TokenizerError, match="--tokenizer_type='bpe'"):
        tokenization.load_tokenizer("bpe", spm_model)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tokenization.load_tokenizer("sentencepiece", spm_model).convert_ids_to_tokens([120])


def test_too_large_vocab_is_a_clear_error(corpus, tmp_path):
    with pytest.raises(TokenizerError, match=r"--vocab_size=100000 is too large.*at most \d+"):
        tokenization.train_sentencepiece([corpus], str(tmp_path / "spm"), vocab_size=100000)
    with pytest.raises(TokenizerError, match="does not exist"):
        tokenization.train_sentencepiece([str(tmp_path / "missing.txt")], str(tmp_path / "x"),
                                         vocab_size=50)


def test_default_filename():
    assert tokenization.default_filename("sentencepiece") == "spm.model"
    assert tokenization.default_filename("wordpiece") == "vocab.txt"
    with pytest.raises(TokenizerError):
        tokenization.default_filename("bpe")


def test_train_tokenizer_cli(corpus, tmp_path):
    out = tmp_path / "vocab"
    result = subprocess.run(
        [sys.executable, "-m", "tfbert.train_tokenizer", "--tokenizer_type=sentencepiece",
         f"--input_files={corpus}", "--vocab_size=100", f"--output_dir={out}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "spm.model" in result.stdout
    tok = tokenization.load_tokenizer("sentencepiece", str(out / "spm.model"))
    assert tok.vocab_size == 100 and tok.special_ids == SPECIAL_IDS
    # The directory also says what it holds.
    assert json.loads((out / "tokenizer_config.json").read_text()) == {
        "tokenizer_type": "sentencepiece"}
    assert tokenization.from_pretrained(str(out)).encode("The river.") == tok.encode("The river.")


def test_create_pretraining_data_cli_takes_a_tokenizer_directory(corpus, small_vocab, tmp_path):
    hf_dir = write_dir(tmp_path / "hf", small_vocab,
                       tokenizer_config__json={"do_lower_case": False})
    # No --tokenizer_type (its default is sentencepiece): the kind comes from the directory.
    # (A conflicting one is refused: test_from_pretrained_tfbert_run_directory.)
    done = subprocess.run(
        [sys.executable, "-m", "tfbert.data.create_pretraining_data", f"--input_files={corpus}",
         f"--vocab_file={hf_dir}", "--max_seq_length=32", "--max_predictions_per_seq=5",
         "--dupe_factor=1", f"--output_dir={tmp_path / 'out'}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metadata = json.loads(next((tmp_path / "out").glob("metadata*.json")).read_text())
    assert metadata["tokenizer_type"] == "wordpiece"
    assert metadata["vocab_size"] == len(_WORDPIECE_VOCAB)


# ----------------------------------------------------------------------------------------------
# WordPiece: exactly HuggingFace's slow BertTokenizer, and google-research/bert's FullTokenizer
# where its semantics agree. A tiny vocabulary: whole words, and single characters (as word
# starts and "##" continuations) so that most words are spelled; "q" and "z" are missing, so a
# word with either is out of the vocabulary.

_LETTERS = ("abcdefghijklmnoprstuvwxy" "ABCDEFGHIJKLMNOPRSTUVWXY" "абвгдежзиклмнопрстуфхцчшыьэюя"
            "АБВГДЕЖЗИКЛМНОПРСТУФХЦЧШЫЬЭЮЯ" "éÉёЁйЙΐσςΣοδΟΔ" "中文字和混合" "²ﬁ2" "0123456789")
_WORDPIECE_VOCAB = list(dict.fromkeys(
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + "hello world the river café cafe résumé resume ёлка елка йогурт иогурт Ёлка".split()
    + "un ##believ ##able ##s ##ing".split()
    + list(_LETTERS) + ["##" + c for c in _LETTERS] + list(".,!?;:'\"()[]-—«»/")))
# Each text probes one of the ways tokenizers differ.
HARD_TEXTS = [
    "Hello, WORLD! The river's café; RÉSUMÉ (resume).",
    "Ёлка и йогурт — «ЁЛКА»!",
    "Е\u0308лка и и\u0306огурт — «Е\u0308ЛКА»!",  # decomposed Ё and й, as NFD writes them
    "tab\there new\nline\r\nend  two  spaces\u00a0nbsp\u3000ideographic\u2028sep",
    "ctrl\x00a\x07b\u200bc\u00add\ufeffe\ufffdf \x0bvt \x85nel",  # dropped, not split
    "中文字和English混合",
    "x² ﬁne 2fi ²ﬁ",                                      # no NFKC: ² and ﬁ stay
    "unbelievable unbelievablez qq",                      # out of the vocabulary
    "a" * 100 + " " + "b" * 101,                          # HF's word limit: 100 characters
    "[CLS] hello [SEP] world[MASK]x [cls] [UNK] [PAD]",   # special tokens in the text
    "[CL\x00S] a[CL\u200bS]",                             # specials once controls are gone
    "ΟΔΟΣ Σ Ϊ\u0301",                                     # final sigma; lower-case then NFC
    "",
    "  \t\n ",
    "...!!!—",
]
# (do_lower_case, strip_accents): uncased, cased, cased with accents stripped, and lower-cased
# keeping accents.
WORDPIECE_OPTIONS = [(True, None), (False, None), (False, True), (True, False)]


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    path = tmp_path_factory.mktemp("small_vocab") / "vocab.txt"
    path.write_text("".join(t + "\n" for t in _WORDPIECE_VOCAB), encoding="utf-8")
    return str(path)


def hf_bert_tokenizer(vocab_file, **options):
    from transformers import BertTokenizer

    return BertTokenizer(vocab_file, **options)


@pytest.mark.parametrize("do_lower_case,strip_accents", WORDPIECE_OPTIONS)
def test_wordpiece_gives_huggingface_pieces_and_ids(small_vocab, do_lower_case, strip_accents):
    hf = hf_bert_tokenizer(small_vocab, do_lower_case=do_lower_case, strip_accents=strip_accents)
    tok = tokenization.WordPieceTokenizer(small_vocab, do_lower_case=do_lower_case,
                                          strip_accents=strip_accents)
    batch = tok.tokenize_batch(HARD_TEXTS)
    for text, pieces in zip(HARD_TEXTS, batch):
        assert pieces == hf.tokenize(text), text
        assert tok.convert_tokens_to_ids(pieces) == hf.convert_tokens_to_ids(pieces), text
        assert tok.encode(text) == hf.encode(text), text
        assert tok.encode(text, add_special_tokens=False) == \
            hf.encode(text, add_special_tokens=False), text
    assert tok.encode(HARD_TEXTS[0], HARD_TEXTS[1]) == hf.encode(HARD_TEXTS[0], HARD_TEXTS[1])
    assert tok.encode(HARD_TEXTS[0], HARD_TEXTS[1], add_special_tokens=False) == \
        hf.encode(HARD_TEXTS[0], HARD_TEXTS[1], add_special_tokens=False)
    # The cases the texts are there for did happen (so the comparison above could fail).
    flat = {t for pieces in batch for t in pieces}
    assert {"[CLS]", "[SEP]", "[MASK]", "[UNK]", "²", "ﬁ"} <= flat
    assert batch[1] == batch[2]  # NFC: composed and decomposed spellings alike
    assert batch[8] == ["a"] + ["##a"] * 99 + ["[UNK]"]
    stripped = do_lower_case if strip_accents is None else strip_accents
    assert ("иогурт" in flat, "йогурт" in flat) == (stripped, not stripped)


def test_wordpiece_special_tokens_are_never_split(small_vocab):
    tok = tokenization.WordPieceTokenizer(small_vocab)
    assert tok.tokenize("[CLS]hello[SEP] [MASK]") == ["[CLS]", "hello", "[SEP]", "[MASK]"]
    # Not lower-cased: "[cls]" is text.
    assert tok.tokenize("[cls]") == ["[", "c", "##l", "##s", "]"]
    cased = tokenization.WordPieceTokenizer(small_vocab, do_lower_case=False)
    assert cased.tokenize("[CL\u200bS] x[CL\x00S]") == ["[CLS]", "x", "[", "C", "##L", "##S",
                                                        "]"]


def test_wordpiece_char_classes_follow_python_unicodedata(small_vocab):
    # Where the tokenizers crate's own tables (BertNormalizer, BertPreTokenizer) disagree with
    # HF: unassigned code points, characters newer than its Unicode tables, CJK extension E.
    texts = ["a\u0378b", "a\u2e43b", "a\u07fdb", "a\U00013430b", "a\U0002b820b", "\u061d"]
    for do_lower_case in (True, False):
        hf = hf_bert_tokenizer(small_vocab, do_lower_case=do_lower_case)
        tok = tokenization.WordPieceTokenizer(small_vocab, do_lower_case=do_lower_case)
        assert tok.tokenize_batch(texts) == [hf.tokenize(t) for t in texts]
    assert tokenization.WordPieceTokenizer(small_vocab).tokenize("a\u0378b") == ["a", "##b"]


def test_wordpiece_without_chinese_char_splitting(small_vocab):
    hf = hf_bert_tokenizer(small_vocab, tokenize_chinese_chars=False)
    tok = tokenization.WordPieceTokenizer(small_vocab, tokenize_chinese_chars=False)
    text = "中文字和English混合 中文"
    assert tok.tokenize(text) == hf.tokenize(text)
    assert tok.tokenize("中文") == ["中", "##文"]
    assert tokenization.WordPieceTokenizer(small_vocab).tokenize("中文") == ["中", "文"]


# Where google's FullTokenizer means the same: no special tokens or 101..200-character words in
# the text, and, cased, no decomposed characters (google has no NFC step).
_GOOGLE_AGREES = [t for i, t in enumerate(HARD_TEXTS) if i not in (8, 9, 10, 11)]


@pytest.mark.parametrize("do_lower_case", [True, False])
def test_wordpiece_gives_google_fulltokenizer_ids(small_vocab, do_lower_case):
    from official.nlp.tools.tokenization import FullTokenizer

    google = FullTokenizer(small_vocab, do_lower_case=do_lower_case)
    tok = tokenization.WordPieceTokenizer(small_vocab, do_lower_case=do_lower_case)
    texts = _GOOGLE_AGREES if do_lower_case else [t for t in _GOOGLE_AGREES
                                                  if t != HARD_TEXTS[2]]
    for text, pieces in zip(texts, tok.tokenize_batch(texts)):
        assert pieces == google.tokenize(text), text
        assert tok.convert_tokens_to_ids(pieces) == google.convert_tokens_to_ids(pieces)


def test_wordpiece_known_differences_from_google(small_vocab):
    """Each documented difference, shown: if one stops holding, the docstring is wrong."""
    from official.nlp.tools.tokenization import FullTokenizer

    google, tok = FullTokenizer(small_vocab), tokenization.WordPieceTokenizer(small_vocab)
    # Special tokens in the text: google splits them.
    assert google.tokenize("[CLS]") == ["[", "c", "##l", "##s", "]"]
    assert tok.tokenize("[CLS]") == ["[CLS]"]
    # Word limit: 200 characters for google, 100 for HF.
    assert google.tokenize("a" * 150) == ["a"] + ["##a"] * 149
    assert tok.tokenize("a" * 150) == ["[UNK]"]
    # Whole-word lower-casing: google's word-final capital sigma becomes "ς".
    assert google.tokenize("ΟΣ") == ["ο", "##ς"] and tok.tokenize("ΟΣ") == ["ο", "##σ"]
    # Cased, no NFC in google: a decomposed "й" stays two characters.
    google_cased = FullTokenizer(small_vocab, do_lower_case=False)
    cased = tokenization.WordPieceTokenizer(small_vocab, do_lower_case=False)
    assert google_cased.tokenize("и\u0306") == ["[UNK]"] and cased.tokenize("и\u0306") == ["й"]


def test_save_pretrained_round_trips_and_huggingface_reads_it(small_vocab, spm_model, tmp_path):
    from transformers import BertTokenizer

    for i, (do_lower_case, strip_accents) in enumerate(WORDPIECE_OPTIONS):
        tok = tokenization.WordPieceTokenizer(small_vocab, do_lower_case=do_lower_case,
                                              strip_accents=strip_accents,
                                              tokenize_chinese_chars=i != 3)
        directory = tmp_path / f"wordpiece{i}"
        assert tok.save_pretrained(str(directory)) == [str(directory / "vocab.txt"),
                                                       str(directory / "tokenizer_config.json")]
        config = json.loads((directory / "tokenizer_config.json").read_text())
        assert config == {"tokenizer_class": "BertTokenizer", "do_lower_case": do_lower_case,
                          "strip_accents": strip_accents, "tokenize_chinese_chars": i != 3,
                          "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                          "cls_token": "[CLS]", "mask_token": "[MASK]"}
        again = tokenization.from_pretrained(str(directory))
        assert again.tokenizer_config() == tok.tokenizer_config()
        hf = BertTokenizer.from_pretrained(str(directory))
        ids = [tok.encode(t) for t in HARD_TEXTS]
        assert [again.encode(t) for t in HARD_TEXTS] == ids
        assert [hf.encode(t) for t in HARD_TEXTS] == ids
    spm = tokenization.load_tokenizer("sentencepiece", spm_model)
    paths = spm.save_pretrained(str(tmp_path / "spm"))
    assert paths == [str(tmp_path / "spm" / "spm.model"),
                     str(tmp_path / "spm" / "tokenizer_config.json")]
    again = tokenization.from_pretrained(str(tmp_path / "spm"))
    assert isinstance(again, tokenization.SentencePieceTokenizer)
    text = "The old man walked along the road."
    assert again.encode(text) == spm.encode(text)
    # Saving onto its own files changes nothing.
    assert again.save_pretrained(str(tmp_path / "spm")) == paths
    assert tokenization.from_pretrained(str(tmp_path / "spm")).encode(text) == spm.encode(text)


def test_sentencepiece_encode_layout(spm_model):
    tok = tokenization.load_tokenizer("sentencepiece", spm_model)
    a, b = "The river.", "Река течёт."
    ids_a = tok.convert_tokens_to_ids(tok.tokenize(a))
    ids_b = tok.convert_tokens_to_ids(tok.tokenize(b))
    cls, sep = tok.special_ids["cls"], tok.special_ids["sep"]
    assert tok.encode(a) == [cls] + ids_a + [sep]
    assert tok.encode(a, b) == [cls] + ids_a + [sep] + ids_b + [sep]
    assert tok.encode(a, b, add_special_tokens=False) == ids_a + ids_b


def write_dir(directory, vocab_file, **files):
    """A model directory: the vocabulary plus JSON files (name -> dict)."""
    directory.mkdir(parents=True)
    shutil.copyfile(vocab_file, directory / "vocab.txt")
    for name, content in files.items():
        (directory / name.replace("__", ".")).write_text(json.dumps(content))
    return str(directory)


def test_from_pretrained_huggingface_and_google_directories(small_vocab, tmp_path):
    from official.nlp.tools.tokenization import FullTokenizer
    from transformers import BertTokenizer

    text = "Hello, Ёлка и йогурт! [SEP] café"
    # HuggingFace, cased with accents stripped; a model config.json beside it.
    hf_dir = write_dir(tmp_path / "hf", small_vocab,
                       tokenizer_config__json={"do_lower_case": False, "strip_accents": True,
                                               "model_max_length": 512},
                       config__json={"model_type": "bert", "vocab_size": len(_WORDPIECE_VOCAB)})
    tok = tokenization.from_pretrained(hf_dir)
    assert (tok.do_lower_case, tok.strip_accents, tok.tokenize_chinese_chars) == (False, True,
                                                                                  True)
    assert tok.encode(text) == BertTokenizer.from_pretrained(hf_dir).encode(text)
    assert tok.files == [os.path.join(hf_dir, "vocab.txt")]
    # HuggingFace without tokenizer_config.json: BertTokenizer's defaults (uncased).
    bare_dir = write_dir(tmp_path / "bare", small_vocab)
    tok = tokenization.from_pretrained(bare_dir)
    assert tok.do_lower_case and tok.strip_accents is None
    assert tok.encode(text) == BertTokenizer.from_pretrained(bare_dir).encode(text)
    # google-research/bert: no casing stored; uncased unless told.
    google_dir = write_dir(tmp_path / "google", small_vocab,
                           bert_config__json={"vocab_size": len(_WORDPIECE_VOCAB)})
    plain = "Hello, Ёлка и йогурт! café"
    for do_lower_case in (None, True, False):
        tok = tokenization.from_pretrained(google_dir, do_lower_case=do_lower_case)
        google = FullTokenizer(os.path.join(google_dir, "vocab.txt"),
                               do_lower_case=do_lower_case is not False)
        assert tok.tokenize(plain) == google.tokenize(plain)
    # A file: a vocab.txt (casing from do_lower_case), a .model by its name.
    tok = tokenization.from_pretrained(small_vocab, do_lower_case=False)
    assert isinstance(tok, tokenization.WordPieceTokenizer) and not tok.do_lower_case


def test_from_pretrained_tfbert_run_directory(small_vocab, spm_model, tmp_path):
    from absl import flags

    from tfbert import run
    from tfbert.training.run_dir import prepare_output_dir

    def build_config(*argv):
        flag_values = flags.FlagValues()
        run.define_flags(flag_values)
        flag_values(["tfbert.run", "--input_files=/data/part-*.tfrecord", *argv])
        return run.build_config(flag_values)

    hf_dir = write_dir(tmp_path / "hf", small_vocab,
                       tokenizer_config__json={"do_lower_case": False})
    # --vocab_file=<directory>: the kind and the casing come from it.
    config, tok = build_config(f"--vocab_file={hf_dir}", f"--output_dir={tmp_path / 'run'}")
    assert config.data.tokenizer_type == "wordpiece" and not tok.do_lower_case
    assert config.data.vocab_file == os.path.join(hf_dir, "vocab.txt")
    assert config.model.vocab_size == len(_WORDPIECE_VOCAB)
    prepare_output_dir(config, tok)
    # The run directory keeps the casing: from_pretrained and --init_checkpoint find it.
    run_dir = str(tmp_path / "run")
    again = tokenization.from_pretrained(run_dir)
    assert again.tokenizer_config() == tok.tokenizer_config()
    assert again.encode(HARD_TEXTS[1]) == tok.encode(HARD_TEXTS[1])
    _, from_run = build_config(f"--init_checkpoint={run_dir}", f"--output_dir={tmp_path / 'b'}")
    assert from_run.tokenizer_config() == tok.tokenizer_config()
    # Conflicts name both sides.
    with pytest.raises(TokenizerError, match=r"--tokenizer_type=sentencepiece was asked, but "
                                             r".*hf holds a wordpiece tokenizer"):
        build_config(f"--vocab_file={hf_dir}", "--tokenizer_type=sentencepiece",
                     "--output_dir=x")
    with pytest.raises(TokenizerError, match=r"--do_lower_case=True was asked, but "
                                             r".*tokenizer_config.json says do_lower_case=False"):
        build_config(f"--vocab_file={hf_dir}", "--do_lower_case", "--output_dir=x")
    # A bare vocab.txt takes --do_lower_case; a .model file is a sentencepiece model.
    _, bare = build_config(f"--vocab_file={small_vocab}", "--nodo_lower_case", "--output_dir=x")
    assert isinstance(bare, tokenization.WordPieceTokenizer) and not bare.do_lower_case
    config, spm = build_config(f"--vocab_file={spm_model}", "--output_dir=x")
    assert config.data.tokenizer_type == "sentencepiece" and spm.vocab_size == 120
    with pytest.raises(TokenizerError, match="--do_lower_case is a wordpiece option"):
        build_config(f"--vocab_file={spm_model}", "--nodo_lower_case", "--output_dir=x")


def test_from_pretrained_sentencepiece_names_and_errors(small_vocab, spm_model, tmp_path):
    for name in tokenization.SENTENCEPIECE_MODELS:
        directory = tmp_path / name
        directory.mkdir()
        shutil.copyfile(spm_model, directory / name)
        tok = tokenization.from_pretrained(str(directory))
        assert isinstance(tok, tokenization.SentencePieceTokenizer)
        assert tok.files == [str(directory / name)]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerError, match=rf"{empty} holds no tokenizer: looked for vocab.txt "
                                             r"\(wordpiece\) and spm.model, spiece.model, "
                                             r"sentencepiece.bpe.model \(sentencepiece\)"):
        tokenization.from_pretrained(str(empty))
    both = write_dir(tmp_path / "both", small_vocab)
    shutil.copyfile(spm_model, os.path.join(both, "spm.model"))
    with pytest.raises(TokenizerError, match="holds both a wordpiece and a sentencepiece"):
        tokenization.from_pretrained(both)
    assert tokenization.from_pretrained(both, tokenizer_type="sentencepiece").vocab_size == 120
    with open(os.path.join(both, "config.json"), "w") as f:  # a tfbert run directory's
        json.dump({"data": {"tokenizer_type": "wordpiece"}}, f)
    assert tokenization.from_pretrained(both).tokenizer_type == "wordpiece"
    stale = write_dir(tmp_path / "stale", small_vocab,
                      config__json={"data": {"tokenizer_type": "sentencepiece"}})
    with pytest.raises(TokenizerError, match="says its tokenizer is 'sentencepiece', but it "
                                             "holds a wordpiece tokenizer"):
        tokenization.from_pretrained(stale)
    unsupported = [({"unk_token": "<unk>"}, "unk_token='<unk>'"),
                   ({"never_split": ["foo"]}, "never_split"),
                   ({"added_tokens_decoder": {"5": {"content": "<new>"}}}, "<new>"),
                   ([], "is not a JSON object")]
    for i, (config, message) in enumerate(unsupported):
        directory = write_dir(tmp_path / f"bad{i}", small_vocab, tokenizer_config__json=config)
        with pytest.raises(TokenizerError, match=message):
            tokenization.from_pretrained(directory)
    with pytest.raises(TokenizerError, match="does not exist"):
        tokenization.from_pretrained(str(tmp_path / "nope.model"))
