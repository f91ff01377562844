"""Tokenizers: training, special ids, round trips, and the errors for bad files."""

from __future__ import annotations

import os
import random
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
