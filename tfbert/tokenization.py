"""Tokenizers behind one small interface, how to open a model's tokenizer, and how to train them.

Two kinds, chosen by `--tokenizer_type`:

- `sentencepiece`: a SentencePiece model file (`spm.model`), run by the `sentencepiece` library.
  Word starts carry the "▁" prefix.
- `wordpiece`: google-research/bert's `vocab.txt` (one token per line, the line number is the
  id). Gives exactly the pieces and ids of HuggingFace's `BertTokenizer` (the slow Python one)
  with the same options, run by HuggingFace's `tokenizers` library. Word continuations carry
  the "##" prefix.

Both know the special tokens by the same names, [PAD] [UNK] [CLS] [SEP] [MASK]; the ones this
module trains put them at ids 0..4.

`from_pretrained(path)` opens the tokenizer of a HuggingFace, google-research/bert or tfbert run
directory (or a tokenizer file); `Tokenizer.save_pretrained(directory)` writes one that both
`from_pretrained` and HuggingFace's `BertTokenizer.from_pretrained` read back.

This module never reads flags: the entry points (`tfbert.train_tokenizer`, `tfbert.run`,
`tfbert.data.create_pretraining_data`) do.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import json
import os
import random
import re
import sys
import unicodedata

TOKENIZER_TYPES = ("sentencepiece", "wordpiece")
# Key -> token, in id order for the vocabularies trained here ([PAD] = 0 ... [MASK] = 4).
SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
_SENTENCEPIECE_WORD_START = "\u2581"  # "▁"
# What from_pretrained looks for in a directory.
WORDPIECE_VOCAB = "vocab.txt"
SENTENCEPIECE_MODELS = ("spm.model", "spiece.model", "sentencepiece.bpe.model")
TOKENIZER_CONFIG = "tokenizer_config.json"
# HuggingFace's WordpieceTokenizer default; google-research/bert's is 200 (see WordPieceTokenizer).
MAX_CHARS_PER_WORD = 100


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

    def encode(self, text: str, text_b: str | None = None,
               add_special_tokens: bool = True) -> list[int]:
        """The ids of one text, or of a pair, laid out as BERT's input and as HuggingFace's
        `encode`: [CLS] a [SEP], or [CLS] a [SEP] b [SEP]; without special tokens, a then b.
        Nothing is truncated."""
        ids_a = self.convert_tokens_to_ids(self.tokenize(text))
        ids_b = [] if text_b is None else self.convert_tokens_to_ids(self.tokenize(text_b))
        if not add_special_tokens:
            return ids_a + ids_b
        cls, sep = self._special_ids["cls"], self._special_ids["sep"]
        return [cls] + ids_a + [sep] + ([] if text_b is None else ids_b + [sep])

    def tokenizer_config(self) -> dict:
        """What `save_pretrained` writes to tokenizer_config.json."""
        raise NotImplementedError

    def save_pretrained(self, directory: str) -> list[str]:
        """Writes the tokenizer to `directory` under its standard file name (`spm.model` or
        `vocab.txt`) with a `tokenizer_config.json` of its options, so that `from_pretrained`
        of the directory gives the same ids (and, for WordPiece, HuggingFace's
        `BertTokenizer.from_pretrained` too). Each file is written whole or not at all.

        Returns:
          The paths written: [tokenizer file, tokenizer_config.json].
        """
        os.makedirs(directory, exist_ok=True)
        target = os.path.join(directory, default_filename(self.tokenizer_type))
        tmp = f"{target}.tmp-{os.getpid()}"
        self._write_tokenizer_file(tmp)
        os.replace(tmp, target)
        config_path = os.path.join(directory, TOKENIZER_CONFIG)
        tmp = f"{config_path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.tokenizer_config(), f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, config_path)
        return [target, config_path]

    def _write_tokenizer_file(self, path: str) -> None:
        raise NotImplementedError

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

    def tokenizer_config(self) -> dict:
        # The model file holds everything else (its normalization included).
        return {"tokenizer_type": self.tokenizer_type}

    def _write_tokenizer_file(self, path: str) -> None:
        # From memory, not by copying files[0]: that may be the very file being replaced.
        with open(path, "wb") as f:
            f.write(self._sp.serialized_model_proto())


class WordPieceTokenizer(Tokenizer):
    """A BERT WordPiece vocabulary (`vocab.txt`) that gives exactly the pieces and ids of
    HuggingFace's `BertTokenizer` (the slow Python one, transformers 4.x) built with the same
    vocabulary and options, special tokens written in the text included.

    The fast path is HuggingFace's `tokenizers` library (Rust; one call per batch). Its
    ready-made BertNormalizer and BertPreTokenizer are not used: they differ from the Python
    tokenizer in ways that change ids (see `_bert_char_classes`): they skip the NFC step and use
    older Unicode tables. The same steps are assembled from the library's generic parts instead,
    in HF's order:
      1. special tokens ([CLS] ...) in the text are kept whole (HF never splits them);
      2. NUL, U+FFFD and control/format/unassigned characters (category C*) are dropped, except
         tab, newline and carriage return, which like every space separator become a space;
      3. do_lower_case: lower-case, character by character as HF (a final "Σ" becomes "σ");
      4. NFC: "и" + U+0306 becomes "й", so both spellings give the same ids (lower-casing,
         HF lower-cases again after it);
      5. strip_accents: NFD, then every nonspacing mark (Mn) is dropped ("й" -> "и", "ё" -> "е");
      6. words split at spaces; each punctuation character (Unicode P*, and all ASCII symbols)
         and, with tokenize_chinese_chars, each CJK ideograph is a word of its own; but a word
         that is a special token once control characters are gone ("[CL\\x00S]" in text that
         is not lower-cased) stays whole, as HF's never_split list keeps it;
      7. greedy longest-match WordPiece; a word of more than 100 characters, or one the
         vocabulary cannot spell, becomes [UNK] (the whole word).
    Compatibility characters are not folded (no NFKC): "²" and "ﬁ" stay themselves.

    Known remaining difference from HF, rare: the crate's NFC/NFD tables are older than
    Python's (over all code points, only U+11938 DIVES AKURU VOWEL SIGN O and the ordering of
    U+1DF6 COMBINING KAVYKA ABOVE RIGHT differ).

    google-research/bert's `FullTokenizer` gives the same ids except where its semantics
    differ: it strips accents if and only if it lower-cases (no strip_accents option), has no
    NFC step (matters for a cased vocabulary only), lower-cases whole words (a word-final "Σ"
    becomes "ς"), splits special tokens in the text like any other text, and allows words of
    up to 200 characters.

    Args:
      vocab_file: one token per line; the line number is the id (as HF's `load_vocab`, only
        the line break is removed).
      do_lower_case: lower-case the text (BERT "uncased"); default True, as HF. Must match how
        the vocabulary was made.
      strip_accents: remove accents; None (default) follows do_lower_case, as HF.
      tokenize_chinese_chars: make each CJK ideograph a word of its own (default True, as HF).
    """

    tokenizer_type = "wordpiece"

    def __init__(self, vocab_file: str, do_lower_case: bool = True,
                 strip_accents: bool | None = None, tokenize_chinese_chars: bool = True):
        _check_file_exists(vocab_file, "WordPiece vocabulary")
        try:
            with open(vocab_file, encoding="utf-8") as f:
                # As HF's load_vocab: only the line break goes (google's strips all surrounding
                # whitespace; no real vocabulary has tokens that differ by it).
                vocab = [line.rstrip("\n") for line in f]
        except UnicodeDecodeError:
            raise TokenizerError(f"{vocab_file} is not a UTF-8 text vocabulary (one token per "
                                 f"line); for a SentencePiece model use "
                                 f"--tokenizer_type=sentencepiece") from None
        while vocab and not vocab[-1]:  # a trailing empty line is not a token
            vocab.pop()
        if not vocab:
            raise TokenizerError(f"{vocab_file} is empty")
        super().__init__(vocab, [vocab_file], vocab_file)
        self.do_lower_case = bool(do_lower_case)
        self.strip_accents = None if strip_accents is None else bool(strip_accents)
        self.tokenize_chinese_chars = bool(tokenize_chinese_chars)

        from tokenizers import AddedToken
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers.models import WordPiece

        self._tokenizer = RustTokenizer(WordPiece(
            dict(self._ids), unk_token=SPECIAL_TOKENS["unk"],
            max_input_chars_per_word=MAX_CHARS_PER_WORD))
        self._tokenizer.normalizer = bert_normalizer(self.do_lower_case, self.strip_accents)
        self._tokenizer.pre_tokenizer = bert_pre_tokenizer(self.tokenize_chinese_chars,
                                                           never_split=SPECIAL_TOKENS.values())
        # Matched in the raw text, before normalization, as HF's slow tokenizer does: "[CLS]"
        # is one token, "[cls]" is text.
        self._tokenizer.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS.values()])

    def tokenize_batch(self, texts: list[str]) -> list[list[str]]:
        if not texts:
            return []
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [e.tokens for e in encodings]

    def is_subword_continuation(self, token: str) -> bool:
        return token.startswith("##")

    def tokenizer_config(self) -> dict:
        # What HF's BertTokenizer.from_pretrained reads (and tfbert's from_pretrained).
        return {"tokenizer_class": "BertTokenizer", "do_lower_case": self.do_lower_case,
                "strip_accents": self.strip_accents,
                "tokenize_chinese_chars": self.tokenize_chinese_chars,
                **{f"{key}_token": SPECIAL_TOKENS[key]
                   for key in ("unk", "sep", "pad", "cls", "mask")}}

    def _write_tokenizer_file(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(token + "\n" for token in self._vocab))

    def __repr__(self) -> str:
        return (f"WordPieceTokenizer({self.files[0]!r}, vocab_size={self.vocab_size}, "
                f"do_lower_case={self.do_lower_case}, strip_accents={self.strip_accents}, "
                f"tokenize_chinese_chars={self.tokenize_chinese_chars})")


# HF's _is_chinese_char: the CJK Unified Ideographs blocks and their extensions A-E, and the
# compatibility ideographs. (The tokenizers crate's copy starts extension E at U+2B920.)
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


@functools.lru_cache(maxsize=None)
def _bert_char_classes() -> dict[str, str]:
    r"""Regex character classes of HF BertTokenizer's character tests, built from this Python's
    `unicodedata`: the tables HF's Python tokenizer itself reads.

    The tokenizers crate's BertNormalizer/BertPreTokenizer carry their own, older tables (about
    Unicode 8): there, unassigned code points are not dropped, and characters assigned since
    (e.g. U+2E43 DASH WITH LEFT UPTURN, U+07FD NKO DANTAYALAN, the Egyptian format controls
    U+13430..) are neither punctuation, accents nor controls. A table walk over the code points
    once per process (under a second) makes the classes agree with HF character for
    character.

    Returns:
      {"removed": dropped characters, "space": characters that become a space,
       "accent": nonspacing marks, "punctuation": punctuation, "cjk": CJK ideographs}, each a
      regex class such as "[\x{0}-\x{8}...]".
    """
    categories = list(map(unicodedata.category, map(chr, range(sys.maxunicode + 1))))
    # HF's _clean_text drops NUL, U+FFFD and what _is_control says (category C*, but not tab,
    # newline or carriage return).
    removed = [cat[0] == "C" for cat in categories]
    removed[0] = removed[0xFFFD] = True
    for char in "\t\n\r":
        removed[ord(char)] = False
    # HF's _is_whitespace (" ", tab, newline, carriage return, Zs) becomes a space; str.split()
    # then also splits at what str.isspace() says (U+2028, U+2029).
    space = [not gone and (cat == "Zs" or (cat[0] in "CZ" and chr(cp).isspace()))
             for cp, (cat, gone) in enumerate(zip(categories, removed))]
    # HF's _is_punctuation: category P*, and every non-alphanumeric ASCII character.
    punctuation = [cat[0] == "P" for cat in categories]
    for cp in itertools.chain(range(33, 48), range(58, 65), range(91, 97), range(123, 127)):
        punctuation[cp] = True
    accent = [cat == "Mn" for cat in categories]
    cjk = [False] * len(categories)
    for lo, hi in _CJK_RANGES:
        cjk[lo:hi + 1] = [True] * (hi + 1 - lo)

    def char_class(mask: list[bool]) -> str:
        mask = bytearray(mask)
        mask[0xD800:0xE000] = bytes(0xE000 - 0xD800)  # surrogates: a Rust string has none
        runs = (m.span() for m in re.finditer(b"\x01+", mask))  # [start, end) of each run
        return "[" + "".join(f"\\x{{{a:X}}}" if b == a + 1 else f"\\x{{{a:X}}}-\\x{{{b - 1:X}}}"
                             for a, b in runs) + "]"

    return {"removed": char_class(removed), "space": char_class(space),
            "accent": char_class(accent), "punctuation": char_class(punctuation),
            "cjk": char_class(cjk)}


def bert_normalizer(do_lower_case: bool = True, strip_accents: bool | None = None):
    """HF BasicTokenizer's text normalization as a `tokenizers` normalizer (see
    `WordPieceTokenizer` for the steps)."""
    from tokenizers import Regex, normalizers

    classes = _bert_char_classes()
    steps = [normalizers.Replace(Regex(classes["removed"]), ""),
             normalizers.Replace(Regex(classes["space"]), " ")]
    if do_lower_case:
        # HF lower-cases twice: the whole text before the special tokens are split off, and
        # each word after NFC. Both matter: "Ϊ" + U+0301 has no composed form, "ϊ" + U+0301
        # composes into "ΐ".
        steps += [normalizers.Lowercase(), normalizers.NFC(), normalizers.Lowercase()]
    else:
        steps.append(normalizers.NFC())
    if do_lower_case if strip_accents is None else strip_accents:
        steps += [normalizers.NFD(), normalizers.Replace(Regex(classes["accent"]), "")]
    return normalizers.Sequence(steps)


def bert_pre_tokenizer(tokenize_chinese_chars: bool = True, never_split=()):
    """HF BasicTokenizer's word splitting as a `tokenizers` pre-tokenizer: at spaces, and
    around each punctuation character (and CJK ideograph), except in a word that is one of
    `never_split`."""
    from tokenizers import Regex, pre_tokenizers

    classes = _bert_char_classes()
    # Split runs on each word left by WhitespaceSplit: \A and \z are the word's ends.
    whole = "|".join("".join(c if c.isalnum() else "\\" + c for c in token)
                     for token in never_split)
    isolated = classes["punctuation"] if not whole else \
        f"\\A(?:{whole})\\z|{classes['punctuation']}"
    if tokenize_chinese_chars:
        # Isolated after NFC where HF isolates before it: NFC maps the compatibility
        # ideographs onto unified ones, CJK either way.
        isolated = f"{isolated}|{classes['cjk']}"
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                    pre_tokenizers.Split(Regex(isolated), behavior="isolated")])


def load_tokenizer(tokenizer_type: str, vocab_file: str, do_lower_case: bool | None = None,
                   *, lower_case: bool | None = None) -> Tokenizer:
    """Opens a tokenizer file of a known kind (a directory is handed to `from_pretrained`).

    Args:
      tokenizer_type: "sentencepiece" (a `.model` file) or "wordpiece" (a `vocab.txt`).
      vocab_file: path of the file.
      do_lower_case: wordpiece only: lower-case (and strip accents from) the text first (BERT
        "uncased"); None: True, as HF.
      lower_case: the former name of do_lower_case.
    Raises:
      TokenizerError: unknown type, missing or invalid file, or missing special tokens.
    """
    _check_type(tokenizer_type)
    if lower_case is not None:
        if do_lower_case is not None and do_lower_case != lower_case:
            raise TokenizerError(f"do_lower_case={do_lower_case} and lower_case={lower_case} "
                                 f"disagree")
        do_lower_case = lower_case
    if vocab_file and os.path.isdir(vocab_file):
        return from_pretrained(vocab_file, tokenizer_type=tokenizer_type,
                               do_lower_case=do_lower_case)
    if tokenizer_type == "sentencepiece":
        _check_no_casing(do_lower_case, vocab_file)
        return SentencePieceTokenizer(vocab_file)
    return WordPieceTokenizer(vocab_file, do_lower_case=True if do_lower_case is None else
                              do_lower_case)


def from_pretrained(path: str, *, tokenizer_type: str | None = None,
                    do_lower_case: bool | None = None) -> Tokenizer:
    """Opens the tokenizer of a model directory, or a tokenizer file.

    `path` may be:
      - a HuggingFace BERT directory: `vocab.txt` and, optionally, `tokenizer_config.json`
        (do_lower_case, strip_accents, tokenize_chinese_chars); what it lacks takes
        BertTokenizer's defaults (True, None = follow do_lower_case, True);
      - a google-research/bert directory: `vocab.txt` + `bert_config.json`. Google stores no
        casing (its scripts take --do_lower_case, the model's name says "uncased" or "cased"):
        do_lower_case defaults to True, as HF; pass do_lower_case=False for a cased model;
      - a tfbert run directory: `spm.model` or `vocab.txt`, `config.json` (whose "data" section
        names the tokenizer_type) and the `tokenizer_config.json` of `save_pretrained`;
      - any directory with a SentencePiece model: `spm.model`, `spiece.model` or
        `sentencepiece.bpe.model`;
      - a tokenizer file: a `.model` file is a SentencePiece model, anything else a `vocab.txt`
        (whose casing is `do_lower_case`, default True).

    Args:
      path: the directory or file.
      tokenizer_type: the kind expected; None: the kind found.
      do_lower_case: wordpiece casing where `path` records none (default True); where it
        records one, a different value is an error.
    Raises:
      TokenizerError: nothing to open, an ambiguous directory, a kind or casing other than the
        one asked for, or an invalid tokenizer.
    """
    if tokenizer_type is not None:
        _check_type(tokenizer_type)
    if not path:
        raise TokenizerError("no tokenizer path given")
    if not os.path.isdir(path):
        if tokenizer_type is None:
            tokenizer_type = "sentencepiece" if path.endswith(".model") else "wordpiece"
        return load_tokenizer(tokenizer_type, path, do_lower_case)

    found = tokenizer_files(path)
    config_path = os.path.join(path, TOKENIZER_CONFIG)
    config = _read_json(config_path) if os.path.isfile(config_path) else {}
    hint = config.get("tokenizer_type") or _run_dir_tokenizer_type(path)
    if not found:
        raise TokenizerError(
            f"{path} holds no tokenizer: looked for {WORDPIECE_VOCAB} (wordpiece) and "
            f"{', '.join(SENTENCEPIECE_MODELS)} (sentencepiece)")
    if len(found) > 1:
        kind = tokenizer_type or hint
        if kind not in found:
            raise TokenizerError(f"{path} holds both a wordpiece and a sentencepiece tokenizer "
                                 f"({', '.join(found.values())}); say which with "
                                 f"--tokenizer_type")
    else:
        (kind,) = found
    if hint is not None and hint != kind and len(found) == 1:
        raise TokenizerError(f"{path} says its tokenizer is {hint!r}, but it holds a {kind} "
                             f"tokenizer ({found[kind]})")
    if tokenizer_type is not None and tokenizer_type != kind:
        raise TokenizerError(f"--tokenizer_type={tokenizer_type} was asked, but {path} holds a "
                             f"{kind} tokenizer ({found[kind]})")
    if kind == "sentencepiece":
        _check_no_casing(do_lower_case, path)
        return SentencePieceTokenizer(found[kind])
    options = _wordpiece_options(config, config_path)
    if do_lower_case is not None:
        if options.get("do_lower_case", do_lower_case) != do_lower_case:
            raise TokenizerError(f"--do_lower_case={do_lower_case} was asked, but {config_path} "
                                 f"says do_lower_case={options['do_lower_case']}")
        options["do_lower_case"] = do_lower_case
    return WordPieceTokenizer(found[kind], **options)


def tokenizer_files(directory: str) -> dict[str, str]:
    """The tokenizer files in `directory`: {"wordpiece": vocab.txt path, "sentencepiece":
    model path}, each key present only when its file is."""
    found = {}
    if os.path.isfile(os.path.join(directory, WORDPIECE_VOCAB)):
        found["wordpiece"] = os.path.join(directory, WORDPIECE_VOCAB)
    for name in SENTENCEPIECE_MODELS:
        if os.path.isfile(os.path.join(directory, name)):
            found["sentencepiece"] = os.path.join(directory, name)
            break
    return found


def _wordpiece_options(config: dict, config_path: str) -> dict:
    """WordPieceTokenizer's keyword arguments from a HuggingFace tokenizer_config.json; refuses
    what would make HF tokenize differently from WordPieceTokenizer."""
    options = {key: config[key] for key in ("do_lower_case", "strip_accents",
                                            "tokenize_chinese_chars") if key in config}
    if "do_lower_case" in options:
        options["do_lower_case"] = bool(options["do_lower_case"])
    unsupported = []
    for key, token in SPECIAL_TOKENS.items():
        value = config.get(f"{key}_token", token)
        value = value.get("content") if isinstance(value, dict) else value
        if value != token:
            unsupported.append(f"{key}_token={value!r} (tfbert's is {token!r})")
    if config.get("do_basic_tokenize", True) is not True:
        unsupported.append("do_basic_tokenize=false")
    if config.get("never_split"):
        unsupported.append(f"never_split={config['never_split']}")
    if config.get("additional_special_tokens"):
        unsupported.append(f"additional_special_tokens={config['additional_special_tokens']}")
    added = config.get("added_tokens_decoder") or {}
    extra = sorted(str(t.get("content")) for t in added.values()
                   if t.get("content") not in SPECIAL_TOKENS.values())
    if extra:
        unsupported.append(f"added tokens {extra}")
    if unsupported:
        raise TokenizerError(f"{config_path}: {'; '.join(unsupported)}: not supported by "
                             f"tfbert's WordPieceTokenizer")
    return options


def _run_dir_tokenizer_type(directory: str) -> str | None:
    """The tokenizer_type a tfbert run directory's config.json records, if it is one (a
    HuggingFace config.json has no "data" section)."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return None
    data = _read_json(path).get("data")
    return data.get("tokenizer_type") if isinstance(data, dict) else None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} is not a JSON object")
    return value


def _check_no_casing(do_lower_case: bool | None, source: str) -> None:
    if do_lower_case is not None:
        raise TokenizerError(f"--do_lower_case is a wordpiece option, but {source} is a "
                             f"sentencepiece tokenizer: its normalization is part of the model")


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
                    do_lower_case: bool = True) -> str:
    """Learns a BERT WordPiece vocabulary with tensorflow_text's `bert_vocab_from_dataset`.

    The text is normalized and split into words by `WordPieceTokenizer`'s own steps (not
    tensorflow_text's, which fold compatibility characters and case, e.g. "²" -> "2",
    "ß" -> "ss"), so the vocabulary spells what the tokenizer will see. The special tokens come
    first ([PAD] = 0, [UNK], [CLS], [SEP], [MASK]). The learner aims at `vocab_size` but may
    return fewer tokens (it stops when no more pieces are frequent enough); the size is logged.

    Args:
      input_files: raw text files (one sentence per line; blank lines are skipped).
      output_file: the `vocab.txt` to write.
      vocab_size: the target number of tokens, special tokens included.
      do_lower_case: lower-case and strip accents first (BERT "uncased"); the tokenizer that
        uses the vocabulary must do the same.
    Returns:
      `output_file`.
    """
    import tensorflow as tf
    from absl import logging

    import_tensorflow_text()
    from tensorflow_text.tools.wordpiece_vocab import bert_vocab_from_dataset as bert_vocab

    for path in input_files:
        _check_file_exists(path, "input text")
    normalizer, pre_tokenizer = bert_normalizer(do_lower_case), bert_pre_tokenizer()

    def words():  # each line as its words, joined by single spaces
        for path in input_files:
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    split = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line))
                    if split:
                        yield " ".join(word for word, _ in split)

    lines = (tf.data.Dataset.from_generator(words, output_signature=tf.TensorSpec([], tf.string))
             .batch(1024).prefetch(tf.data.AUTOTUNE))
    vocab = bert_vocab.bert_vocab_from_dataset(
        lines, vocab_size=vocab_size, reserved_tokens=list(SPECIAL_TOKENS.values()),
        # Already normalized and split: its own splitting finds nothing more to do.
        bert_tokenizer_params=dict(lower_case=False),
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
