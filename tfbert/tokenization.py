"""Tokenizers behind one small interface, and how to train them.

Two kinds, chosen by `--tokenizer_type`:

- `sentencepiece`: a SentencePiece model file (`spm.model`), run by the `sentencepiece` library.
  Word starts carry the "▁" prefix.
- `wordpiece`: google-research/bert's `vocab.txt` (one token per line, the line number is the
  id), run by `tensorflow_text.BertTokenizer`. Word continuations carry the "##" prefix.

Both know the special tokens by the same names, [PAD] [UNK] [CLS] [SEP] [MASK]; the ones this
module trains put them at ids 0..4.

This module never reads flags: the entry point (`tfbert.train_tokenizer`) does.
"""

from __future__ import annotations

import importlib
import os
import random
import re

TOKENIZER_TYPES = ("sentencepiece", "wordpiece")
# Key -> token, in id order for the vocabularies trained here ([PAD] = 0 ... [MASK] = 4).
SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
_SENTENCEPIECE_WORD_START = "\u2581"  # "▁"


class TokenizerError(ValueError):
    """A tokenizer file is missing or invalid, or training one failed."""


def default_filename(tokenizer_type: str) -> str:
    """The file name a trained tokenizer of this kind gets in a directory."""
    _check_type(tokenizer_type)
    return "spm.model" if tokenizer_type == "sentencepiece" else "vocab.txt"


def import_tensorflow_text():
    """Imports and returns `tensorflow_text` (lazily: it is heavy, and only WordPiece and dynamic
    masking need it). It imports tensorflow_hub, which needs `pkg_resources`: setup.cfg pins a
    setuptools that still ships it."""
    return importlib.import_module("tensorflow_text")


# ----------------------------------------------------------------------------------------------
# The common interface.


class Tokenizer:
    """What the rest of tfbert needs from a tokenizer; subclasses implement `tokenize_batch` and
    `is_subword_continuation`.

    Attributes:
      tokenizer_type: "sentencepiece" or "wordpiece".
      files: the files that define the tokenizer (copied into run directories).
    """

    tokenizer_type: str = ""

    def __init__(self, vocab: list[str], files: list[str], source: str):
        """vocab: token of each id, in id order; source: the file it came from (for errors)."""
        self._vocab = vocab
        self._ids = {token: i for i, token in enumerate(vocab)}
        missing = [t for t in SPECIAL_TOKENS.values() if t not in self._ids]
        if missing:
            raise TokenizerError(
                f"{source}: the vocabulary lacks the special token(s) {missing}; tfbert needs "
                f"{list(SPECIAL_TOKENS.values())} (tfbert.train_tokenizer adds them)")
        if len(self._ids) != len(vocab):
            seen = set()
            twice = next(t for t in vocab if t in seen or seen.add(t))
            raise TokenizerError(f"{source}: token {twice!r} appears more than once; its id "
                                 f"would be ambiguous")
        self.files = list(files)
        self._special_ids = {key: self._ids[token] for key, token in SPECIAL_TOKENS.items()}
        self._special_tokens = frozenset(SPECIAL_TOKENS.values())

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def special_ids(self) -> dict[str, int]:
        """{"pad", "unk", "cls", "sep", "mask"} -> id."""
        return dict(self._special_ids)

    def tokenize(self, text: str) -> list[str]:
        """Splits one text into pieces (strings)."""
        return self.tokenize_batch([text])[0]

    def tokenize_batch(self, texts: list[str]) -> list[list[str]]:
        """Splits many texts at once (the fast path: one library call for the whole list)."""
        raise NotImplementedError

    def is_subword_continuation(self, token: str) -> bool:
        """Whether `token` continues the word of the token before it (for whole-word masking)."""
        raise NotImplementedError

    def convert_tokens_to_ids(self, tokens) -> list[int]:
        """Unknown tokens get the [UNK] id."""
        unk = self._special_ids["unk"]
        return [self._ids.get(t, unk) for t in tokens]

    def convert_ids_to_tokens(self, ids) -> list[str]:
        tokens = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self._vocab):
                raise TokenizerError(f"token id {i} is outside the vocabulary "
                                     f"[0, {len(self._vocab)})")
            tokens.append(self._vocab[i])
        return tokens

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.files[0]!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (`.model` file)."""

    tokenizer_type = "sentencepiece"

    def __init__(self, model_file: str):
        import sentencepiece as spm

        _check_file_exists(model_file, "SentencePiece model")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_file)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{model_file} is not a valid SentencePiece model ({e}); for "
                                 f"a wordpiece vocab.txt use --tokenizer_type=wordpiece") from None
        vocab = [self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())]
        super().__init__(vocab, [model_file], model_file)

    def tokenize_batch(self, texts: list[str]) -> list[list[str]]:
        return self._sp.encode(list(texts), out_type=str)

    def is_subword_continuation(self, token: str) -> bool:
        return not token.startswith(_SENTENCEPIECE_WORD_START) and token not in self._special_tokens


class WordPieceTokenizer(Tokenizer):
    """A BERT WordPiece vocabulary (`vocab.txt`), run by `tensorflow_text.BertTokenizer`.

    lower_case: lower-case and strip accents first (BERT "uncased"); must match how the
    vocabulary was made.
    """

    tokenizer_type = "wordpiece"

    def __init__(self, vocab_file: str, lower_case: bool = True):
        _check_file_exists(vocab_file, "WordPiece vocabulary")
        try:
            with open(vocab_file, encoding="utf-8") as f:
                # As google-research/bert's load_vocab: one token per line, surrounding whitespace
                # dropped; the line number is the id.
                vocab = [line.strip() for line in f]
        except UnicodeDecodeError:
            raise TokenizerError(f"{vocab_file} is not a UTF-8 text vocabulary (one token per "
                                 f"line); for a SentencePiece model use "
                                 f"--tokenizer_type=sentencepiece") from None
        while vocab and not vocab[-1]:  # a trailing empty line is not a token
            vocab.pop()
        if not vocab:
            raise TokenizerError(f"{vocab_file} is empty")
        super().__init__(vocab, [vocab_file], vocab_file)
        self.lower_case = lower_case

        import tensorflow as tf

        text = import_tensorflow_text()
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(vocab),
                                                tf.range(len(vocab), dtype=tf.int64)),
            default_value=self._special_ids["unk"])
        self._tokenizer = text.BertTokenizer(table, lower_case=lower_case,
                                             token_out_type=tf.int64, unknown_token="[UNK]")

    def tokenize_batch(self, texts: list[str]) -> list[list[str]]:
        if not texts:
            return []
        import tensorflow as tf

        # [batch, (words), (pieces)] -> [batch, (pieces)]
        ids = self._tokenizer.tokenize(tf.constant(list(texts), tf.string)).merge_dims(1, -1)
        vocab = self._vocab
        return [[vocab[i] for i in row] for row in ids.to_list()]

    def is_subword_continuation(self, token: str) -> bool:
        return token.startswith("##")


def load_tokenizer(tokenizer_type: str, vocab_file: str, lower_case: bool = True) -> Tokenizer:
    """Opens a tokenizer file.

    Args:
      tokenizer_type: "sentencepiece" (a `.model` file) or "wordpiece" (a `vocab.txt`).
      vocab_file: path of the file.
      lower_case: wordpiece only: lower-case the text first (BERT "uncased").
    Raises:
      TokenizerError: unknown type, missing or invalid file, or missing special tokens.
    """
    _check_type(tokenizer_type)
    if tokenizer_type == "sentencepiece":
        return SentencePieceTokenizer(vocab_file)
    return WordPieceTokenizer(vocab_file, lower_case=lower_case)


# ----------------------------------------------------------------------------------------------
# Training.


def train_sentencepiece(input_files: list[str], output_prefix: str, vocab_size: int, *,
                        model_type: str = "unigram", character_coverage: float = 0.9995,
                        input_sentence_size: int = 1_000_000, num_threads: int = 4,
                        seed: int = 12345) -> str:
    """Trains a SentencePiece model with tfbert's special tokens at ids 0..4.

    The same input files and arguments give the same model: sentencepiece's own sentence
    sampling is not seedable, so lines are sampled here (seeded reservoir sampling) and handed
    to it; its training itself is deterministic for a fixed `num_threads`.

    Args:
      input_files: raw text files (one sentence per line; blank lines are skipped).
      output_prefix: writes `<output_prefix>.model` and `<output_prefix>.vocab`.
      vocab_size: number of pieces, special tokens included.
      model_type: "unigram" (default), "bpe", "char" or "word".
      character_coverage: fraction of characters covered by the vocabulary; the rarest
        characters beyond it become [UNK].
      input_sentence_size: at most this many lines are sampled from the input.
      num_threads: training threads (part of what makes the result reproducible).
      seed: seed of the line sampling.
    Returns:
      The path of the `.model` file.
    Raises:
      TokenizerError: a missing input file, no text, or a `vocab_size` too large for the text.
    """
    import sentencepiece as spm

    for path in input_files:
        _check_file_exists(path, "input text")
    lines = _sample_lines(input_files, input_sentence_size, seed)
    if not lines:
        raise TokenizerError(f"the input files {input_files} hold no text")
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=output_prefix, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage,
            pad_id=0, pad_piece=SPECIAL_TOKENS["pad"], unk_id=1, unk_piece=SPECIAL_TOKENS["unk"],
            bos_id=-1, eos_id=-1,  # BERT adds [CLS]/[SEP] itself
            user_defined_symbols=[SPECIAL_TOKENS[k] for k in ("cls", "sep", "mask")],
            num_threads=num_threads, input_sentence_size=0,  # already sampled above
            minloglevel=1)
    except RuntimeError as e:
        limit = re.search(r"value <= (\d+)", str(e))
        if limit:
            raise TokenizerError(
                f"--vocab_size={vocab_size} is too large for this text: sentencepiece can make at "
                f"most {limit.group(1)} pieces from {input_files}; use a smaller --vocab_size or "
                f"more text") from None
        raise TokenizerError(f"sentencepiece training on {input_files} failed: {e}") from None
    return output_prefix + ".model"


def train_wordpiece(input_files: list[str], output_file: str, vocab_size: int,
                    lower_case: bool = True) -> str:
    """Learns a BERT WordPiece vocabulary with tensorflow_text's `bert_vocab_from_dataset`.

    The special tokens come first ([PAD] = 0, [UNK], [CLS], [SEP], [MASK]). The learner aims at
    `vocab_size` but may return fewer tokens (it stops when no more pieces are frequent enough);
    the size is logged.

    Args:
      input_files: raw text files (one sentence per line; blank lines are skipped).
      output_file: the `vocab.txt` to write.
      vocab_size: the target number of tokens, special tokens included.
      lower_case: lower-case and strip accents first (BERT "uncased").
    Returns:
      `output_file`.
    """
    import tensorflow as tf
    from absl import logging

    import_tensorflow_text()
    from tensorflow_text.tools.wordpiece_vocab import bert_vocab_from_dataset as bert_vocab

    for path in input_files:
        _check_file_exists(path, "input text")
    lines = (tf.data.TextLineDataset(list(input_files))
             .filter(lambda line: tf.strings.length(tf.strings.strip(line)) > 0)
             .batch(1024).prefetch(tf.data.AUTOTUNE))
    vocab = bert_vocab.bert_vocab_from_dataset(
        lines, vocab_size=vocab_size, reserved_tokens=list(SPECIAL_TOKENS.values()),
        bert_tokenizer_params=dict(lower_case=lower_case),
        # The learner's default lowest count threshold (10) caps the vocabulary of a small
        # corpus far below vocab_size; its binary search finds the threshold from 1 up.
        learn_params=dict(lower_thresh=1))
    if len(vocab) <= len(SPECIAL_TOKENS):
        raise TokenizerError(f"no wordpiece vocabulary could be learned from {input_files} "
                             f"(no text?)")
    directory = os.path.dirname(os.path.abspath(output_file))
    os.makedirs(directory, exist_ok=True)
    with open(output_file, "w", encoding="utf-8") as f:
        f.write("".join(token + "\n" for token in vocab))
    logging.info("Wrote %s: %d tokens (asked for %d)", output_file, len(vocab), vocab_size)
    return output_file


# ----------------------------------------------------------------------------------------------


def _check_type(tokenizer_type: str) -> None:
    if tokenizer_type not in TOKENIZER_TYPES:
        raise TokenizerError(f"--tokenizer_type={tokenizer_type!r} is not one of "
                             f"{TOKENIZER_TYPES}")


def _check_file_exists(path: str, what: str) -> None:
    if not path:
        raise TokenizerError(f"no {what} file given")
    if not os.path.isfile(path):
        raise TokenizerError(f"{what} file {path} does not exist")


def _sample_lines(files: list[str], max_lines: int, seed: int) -> list[str]:
    """The non-blank lines of `files`, or a seeded uniform sample of `max_lines` of them
    (reservoir sampling: one pass, memory for `max_lines` lines only)."""
    rng = random.Random(seed)
    sample, seen = [], 0
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                seen += 1
                if len(sample) < max_lines:
                    sample.append(line)
                else:
                    j = rng.randrange(seen)
                    if j < max_lines:
                        sample[j] = line
    return sample
