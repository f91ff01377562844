"""Initialising BERT's word-embedding table from FastText / word2vec vectors.

Pretraining from pre-trained word vectors instead of a random table: every vocabulary token that
a word of the vector file covers starts from that word's vector, brought to the hidden size and
to the scale of the model's own initialisation; the rest keep the model's random rows.

Stated method (`embedding_init_from_vectors`), for vocabulary size V, vector dimension d and
hidden size H:

1. Words are read in file order (FastText and word2vec files list the most frequent words
   first), `max_words` at most, and tokenised by the model's tokenizer in batches.
2. Direct hit: a word whose tokenisation is one word-initial piece t (not special, not [UNK])
   covers t with its own vector. The tokenizer defines "is the same word": WordPiece gives the
   token equal to the word (lower-cased and accent-stripped first for an uncased vocabulary),
   SentencePiece gives "▁word" for "word" (after its NFKC normalisation). Case variants map to
   the same token in an uncased vocabulary; the first word (the most frequent) wins.
3. Pieces: every word read, direct hit or not, adds its vector to each distinct piece of its
   tokenisation. A token with no direct hit that some word contains gets the unweighted mean of
   the vectors of the words that contain it (each word counts once; the file has no counts to
   weight by).
4. Special tokens ([PAD] [UNK] [CLS] [SEP] [MASK]) and tokens no word covers keep their row of
   `initial_table`.
5. The covered rows (n of them, an n x d matrix X) are centred, if n >= 2: their mean over the
   covered tokens is subtracted (FastText vectors share a common direction that says nothing about a
   token; a random table has mean zero). Then, by d:
     - d > H: PCA, projection of the centred X onto its top H principal directions (numpy SVD of
       the d x d scatter matrix X^T X, which has the same right singular vectors as X and needs
       d x d memory instead of n x d; each direction's sign is fixed so that its largest
       loading is positive, so the result does not depend on the LAPACK build);
     - d = H: X as is;
     - d < H: X fills the first d columns; columns d..H-1 of the covered rows keep their
       `initial_table` values (the model's initialisation).
   (With fewer covered tokens than H, only n principal directions exist; the remaining columns
   keep `initial_table` too, as for d < H.)
6. Scale: the vector columns of the covered rows are multiplied by one scalar so that their
   standard deviation over all their entries equals `initializer_range` (computed as the root
   mean square: the same for centred rows, and still defined for a lone covered row). FastText
   vectors have entries of order 0.1 to 1, a BERT table initialised with stddev 0.02 is ~10-50x
   smaller; one scalar keeps the vectors' geometry (cosines, relative distances) unchanged.

Same file, tokenizer and arguments -> the same table (file order decides ties, sums are in
float64 in a fixed order, PCA signs are fixed).
"""

from __future__ import annotations

import gzip
import importlib
import os
import warnings
from typing import Iterator

import numpy as np

# Words tokenised per `tokenize_batch` call: large enough that the per-call overhead of the
# tokenizer (one library call per batch) is small, small enough for memory (batch x d).
_TOKENIZE_BATCH = 8192
# Lines parsed per `np.fromstring` call when reading a text file.
_PARSE_BATCH = 4096


class VectorFileError(ValueError):
    """A word-vector file is missing, malformed, or needs a library that is not installed."""


# ----------------------------------------------------------------------------------------------
# Reading vector files.


def read_word_vectors(path: str, max_words: int | None = None
                      ) -> Iterator[tuple[str, np.ndarray]]:
    """Streams (word, vector) pairs from a word-vector file, in file order.

    Formats, by file name:
      - `.bin`: FastText's binary model, through `gensim` (`load_facebook_vectors`) or else the
        `fasttext` package, whichever is importable (neither is a tfbert dependency). The library
        loads the whole model first; only text files are streamed.
      - anything else (`.vec`, `.txt`, optionally `.gz`-compressed): word2vec/FastText text, UTF-8.
        An optional header line "count dim", then one "word v1 ... vd" line per word, values
        separated by spaces. Trailing whitespace, repeated spaces between values and blank lines
        are tolerated; a line with a number of values other than d, a value that is not a finite
        number, or bytes that are not UTF-8 raise `VectorFileError` naming the file and line.
        d comes from the header, or else from the first line; the header's count is not checked
        against the lines (files cut to their first words often keep the original header).

    Args:
      path: the vector file.
      max_words: read at most this many words (the first ones: the most frequent); None: all.
    Returns:
      An iterator of (word: str, vector: float32 numpy array of shape [d]). A text file is
      parsed 4096 lines at a time and only those are held (a 2M x 300 `.vec` is 2.4 GB as
      float32).
    Raises:
      VectorFileError: a missing file, or a `.bin` file with neither library installed (at the
        call); a malformed line (while iterating).
    """
    if not os.path.isfile(path):
        raise VectorFileError(f"word-vector file {path} does not exist")
    if max_words is not None and max_words < 1:
        raise VectorFileError(f"max_words={max_words} must be positive (or None for all words)")
    if path.endswith(".bin"):
        return _read_fasttext_binary(path, max_words)
    return _read_text_vectors(path, max_words)


def _read_text_vectors(path: str, max_words: int | None) -> Iterator[tuple[str, np.ndarray]]:
    opener = gzip.open if path.endswith(".gz") else open
    dim = None
    words = 0
    batch = []  # (line number, word, the values' text) of the lines not yet parsed
    # Binary mode, decoded line by line, so that an encoding error can name its line.
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if max_words is not None and words >= max_words:
                break
            try:
                line = raw.decode("utf-8").rstrip()
            except UnicodeDecodeError as e:
                raise VectorFileError(f"{path}:{lineno}: not UTF-8 text ({e})") from None
            if not line:
                continue
            # Words never contain spaces in these formats (FastText splits on them), so the
            # first field is the word and the rest are values (repeated spaces tolerated).
            word, _, rest = line.partition(" ")
            num_values = len(rest.split())
            if dim is None:
                if _is_header(word, rest):
                    dim = int(rest)
                    if int(word) < 0 or dim < 1:
                        raise VectorFileError(f"{path}:{lineno}: header {line!r} must be "
                                              f"'count dim' with dim >= 1")
                    continue
                dim = num_values
                if dim == 0:
                    raise VectorFileError(f"{path}:{lineno}: the line has a word and no values; "
                                          f"expected 'word v1 ... vd'")
            if num_values != dim:
                raise VectorFileError(f"{path}:{lineno}: {num_values} values after the word "
                                      f"{word!r}, expected {dim} (the dimension of this file)")
            batch.append((lineno, word, rest))
            words += 1
            if len(batch) == _PARSE_BATCH:
                yield from zip((w for _, w, _ in batch), _parse_values(path, batch, dim))
                batch = []
    if batch:
        yield from zip((w for _, w, _ in batch), _parse_values(path, batch, dim))


def _parse_values(path: str, batch: list[tuple[int, str, str]], dim: int) -> np.ndarray:
    """The vectors of a batch of lines, float32 [len(batch), dim], whose value counts are known
    to be right.

    Fast path: one `np.fromstring` over the whole batch (C parsing; Python's float() on each of
    a 2M x 300 file's 600M values would take many minutes). It stops at the first value that
    is not a number, so a wrong value makes the total count fall short; the reference path,
    float() line by line, then names the line."""
    text = "\n".join(rest for _, _, rest in batch)
    with warnings.catch_warnings():
        # NumPy 1.x warns (2.x raises) when the text is not read to its end.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            values = np.fromstring(text, dtype=np.float64, sep=" ")
        except ValueError:
            values = np.empty(0)
    if values.size == len(batch) * dim:
        vectors = values.reshape(len(batch), dim)
        if np.isfinite(vectors).all():
            return vectors.astype(np.float32)
    for lineno, word, rest in batch:  # the reference path, to name the line
        try:
            vector = np.array([float(v) for v in rest.split()])
        except ValueError:
            bad = next(v for v in rest.split() if not _is_number(v))
            raise VectorFileError(f"{path}:{lineno}: {bad!r} (after the word {word!r}) is not "
                                  f"a number") from None
        if not np.isfinite(vector).all():
            raise VectorFileError(f"{path}:{lineno}: the vector of {word!r} has a non-finite "
                                  f"value (nan or inf)")
    # Not reached for well-formed numbers; kept so that a parser disagreement cannot pass
    # silently.
    raise VectorFileError(f"{path}: lines {batch[0][0]}..{batch[-1][0]} could not be parsed "
                          f"as {dim} numbers each")


def _is_header(first: str, rest: str) -> bool:
    """word2vec's header "count dim": two integers. (A 1-dimensional vector of a word that is an
    integer would read the same; such a file cannot be told apart, and does not occur.)"""
    return _is_int(first) and _is_int(rest)


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _read_fasttext_binary(path: str, max_words: int | None) -> Iterator[tuple[str, np.ndarray]]:
    """FastText `.bin` through gensim or the `fasttext` package (checked at the call, loaded on
    the first `next`). Both give, for a vocabulary word, the same vector as FastText's `.vec`
    (the word's own vector averaged with its character n-grams), in the model's frequency order."""
    for name in ("gensim", "fasttext"):
        try:
            module = importlib.import_module(name)
            break
        except ImportError:
            continue
    else:
        raise VectorFileError(
            f"{path} is a FastText binary model; reading it needs gensim or fasttext, neither of "
            f"which is installed: `pip install gensim` (or `pip install fasttext`), or use the "
            f"`.vec` text file FastText publishes beside the `.bin`")

    def generate():
        count = 0
        if module.__name__ == "gensim":
            from gensim.models.fasttext import load_facebook_vectors

            kv = load_facebook_vectors(path)
            items = ((kv.index_to_key[i], kv.vectors[i]) for i in range(len(kv.index_to_key)))
        else:
            model = module.load_model(path)
            items = ((w, model.get_word_vector(w)) for w in model.get_words())
        for word, vector in items:
            if max_words is not None and count >= max_words:
                return
            count += 1
            yield word, np.asarray(vector, dtype=np.float32)

    return generate()


# ----------------------------------------------------------------------------------------------
# The embedding table.


def embedding_init_from_vectors(path: str, tokenizer, hidden_size: int,
                                initial_table, initializer_range: float, *,
                                max_words: int | None = None, seed: int = 0
                                ) -> tuple[np.ndarray, dict]:
    """A word-embedding table whose covered rows come from a word-vector file.

    The method is stated in this module's docstring; in short: a token that is itself a word of
    the file gets that word's vector (the first, most frequent, case variant wins); otherwise a
    token that is a piece of some words gets the mean of their vectors; the covered rows are
    centred, brought to `hidden_size` (PCA when the file's dimension d is larger; the extra
    columns keep `initial_table` when it is smaller), and scaled by one scalar to a standard
    deviation of `initializer_range` (FastText vectors are on a scale ~10-50x larger than a BERT
    table initialised with stddev 0.02). Special tokens and tokens no word covers keep their
    `initial_table` row.

    Args:
      path: a `.vec`/`.txt` (optionally `.gz`) or FastText `.bin` file (see `read_word_vectors`).
      tokenizer: a `tfbert.tokenization.Tokenizer` (WordPiece or SentencePiece); only its
        `tokenize_batch`, `convert_tokens_to_ids`, `is_subword_continuation`, `special_ids` and
        `vocab_size` are used.
      hidden_size: H, the width of the table.
      initial_table: float array of shape [vocab_size, H]: the model's own initialisation (e.g.
        `model.get_weights()` of the word embeddings), kept for uncovered and special rows. None:
        drawn here like BERT's initialiser, a normal of stddev `initializer_range` truncated at
        two standard deviations, from `seed`. Not modified.
      initializer_range: the standard deviation the covered rows are scaled to (BERT: 0.02).
      max_words: read at most this many words, the most frequent (None: the whole file; a
        2M-word FastText file then takes minutes to read and tokenise).
      seed: seed of the initial table when `initial_table` is None; unused otherwise.
    Returns:
      (table, report): table is a float32 numpy array of shape [vocab_size, H]; report is a dict
      with vocab_size, special_tokens, covered_direct, covered_by_pieces, not_covered (non-special
      tokens without a vector), their fractions of vocab_size, words_read, vector_dim,
      hidden_size, projection ("none", "pca", or "pad"), vector_columns (how many leading
      columns of the covered rows come from the vectors), explained_variance (the fraction of the
      covered vectors' variance the kept directions hold; 1.0 without PCA), scale (the scalar
      applied), initializer_range and path. `format_report(report)` makes it a log line.
    Raises:
      VectorFileError: a missing or malformed file, or an empty one.
      ValueError: `initial_table` of the wrong shape, or a non-positive size.
    """
    vocab_size = tokenizer.vocab_size
    if hidden_size < 1:
        raise ValueError(f"hidden_size={hidden_size} must be positive")
    if initializer_range <= 0:
        raise ValueError(f"initializer_range={initializer_range} must be positive")
    if initial_table is None:
        table = _truncated_normal([vocab_size, hidden_size], initializer_range, seed)
    else:
        table = np.array(initial_table, dtype=np.float32)  # a copy: the caller's stays as is
        if table.shape != (vocab_size, hidden_size):
            raise ValueError(f"initial_table has shape {table.shape}; the tokenizer and "
                             f"hidden_size need [vocab_size, hidden_size] = "
                             f"[{vocab_size}, {hidden_size}]")

    direct, has_direct, sums, counts, words_read = _accumulate(
        read_word_vectors(path, max_words), tokenizer)
    if words_read == 0:
        raise VectorFileError(f"{path} holds no word vectors")
    dim = sums.shape[1]

    by_pieces = ~has_direct & (counts > 0)
    covered = np.flatnonzero(has_direct | by_pieces)
    vectors = np.where(has_direct[:, None], direct,
                       sums / np.maximum(counts, 1)[:, None])[covered]  # [n, d] float64

    projected, projection, explained = _project(vectors, hidden_size)  # [n, k], k <= H
    # The rows are centred, so the root mean square is their standard deviation; it also gives
    # a scale to a lone covered row, which has no spread (and centring it would zero it).
    rms = float(np.sqrt(np.mean(projected ** 2))) if projected.size else 0.0
    scale = initializer_range / rms if rms > 0 else 1.0  # all zero: nothing to scale
    k = projected.shape[1]
    table[covered, :k] = (projected * scale).astype(np.float32)

    num_special = len(set(tokenizer.special_ids.values()))
    report = dict(
        path=str(path), vocab_size=vocab_size, special_tokens=num_special,
        covered_direct=int(has_direct.sum()), covered_by_pieces=int(by_pieces.sum()),
        not_covered=int(vocab_size - num_special - len(covered)),
        words_read=words_read, vector_dim=dim, hidden_size=hidden_size,
        projection=projection, vector_columns=k, explained_variance=explained, scale=scale,
        initializer_range=initializer_range)
    for key in ("covered_direct", "covered_by_pieces", "not_covered"):
        report[key + "_fraction"] = report[key] / vocab_size
    return table, report


def _accumulate(items: Iterator[tuple[str, np.ndarray]], tokenizer):
    """One pass over the words: direct-hit vectors [V, d] and which tokens have one [V] (bool),
    piece sums [V, d] and counts [V] (float64 sums, in file order), the number of words read."""
    vocab_size = tokenizer.vocab_size
    special = np.zeros(vocab_size, bool)
    special[list(tokenizer.special_ids.values())] = True
    direct = sums = counts = None
    has_direct = np.zeros(vocab_size, bool)
    words_read = 0
    for words, vectors in _batches(items, _TOKENIZE_BATCH):
        if direct is None:  # d is known from the first vector
            dim = vectors.shape[1]
            direct = np.zeros([vocab_size, dim])
            sums = np.zeros([vocab_size, dim])
            counts = np.zeros(vocab_size, np.int64)
        words_read += len(words)
        pieces = tokenizer.tokenize_batch(words)
        flat = [p for word_pieces in pieces for p in word_pieces]
        flat_ids = tokenizer.convert_tokens_to_ids(flat)
        piece_ids, word_index, start = [], [], 0
        for w, word_pieces in enumerate(pieces):
            ids = flat_ids[start:start + len(word_pieces)]
            start += len(word_pieces)
            if (len(ids) == 1 and not special[ids[0]]
                    and not tokenizer.is_subword_continuation(word_pieces[0])
                    and not has_direct[ids[0]]):
                direct[ids[0]] = vectors[w]  # the first (most frequent) word wins
                has_direct[ids[0]] = True
            # Each word counts once per distinct piece; dict keeps the order (determinism).
            for i in dict.fromkeys(ids):
                if not special[i]:
                    piece_ids.append(i)
                    word_index.append(w)
        if piece_ids:
            _add_rows(sums, counts, np.array(piece_ids), vectors[np.array(word_index)])
    if direct is None:
        return None, has_direct, np.zeros([vocab_size, 0]), np.zeros(vocab_size, np.int64), 0
    return direct, has_direct, sums, counts, words_read


def _add_rows(sums: np.ndarray, counts: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> None:
    """sums[ids[j]] += rows[j], counts[ids[j]] += 1, vectorised: rows grouped by id (stable
    sort, so the order of addition is fixed) and each group summed with one reduceat."""
    order = np.argsort(ids, kind="stable")
    ids, rows = ids[order], rows[order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    sums[ids[starts]] += np.add.reduceat(rows, starts, axis=0)
    counts[ids[starts]] += np.diff(np.r_[starts, len(ids)])


def _batches(items: Iterator[tuple[str, np.ndarray]], size: int):
    """(words: list[str], vectors: float32 [batch, d]) groups of `size`."""
    words, vectors = [], []
    for word, vector in items:
        words.append(word)
        vectors.append(vector)
        if len(words) == size:
            yield words, np.stack(vectors)
            words, vectors = [], []
    if words:
        yield words, np.stack(vectors)


def _project(vectors: np.ndarray, hidden_size: int) -> tuple[np.ndarray, str, float]:
    """Centred covered vectors [n, d] -> [n, k], k = min(d, H, n); the projection's name and the
    fraction of variance kept."""
    n, dim = vectors.shape
    if n == 0:
        return vectors[:, :0], "none", 1.0
    if n >= 2:  # one vector has no mean to remove: centring would leave zeros
        vectors = vectors - vectors.mean(axis=0)
    if dim < hidden_size:
        return vectors, "pad", 1.0
    if dim == hidden_size:
        return vectors, "none", 1.0
    # PCA. The right singular vectors of X are the singular vectors of the d x d scatter X^T X
    # (its singular values are X's squared): d x d memory instead of X's n x d left vectors.
    _, variances, vt = np.linalg.svd(vectors.T @ vectors)
    k = min(hidden_size, n)
    components = vt[:k]  # [k, d], by decreasing variance
    # An eigenvector's sign is arbitrary (LAPACK-dependent): make its largest loading positive.
    largest = components[np.arange(k), np.argmax(np.abs(components), axis=1)]
    components = components * np.where(largest < 0, -1.0, 1.0)[:, None]
    total = float(variances.sum())
    explained = float(variances[:k].sum()) / total if total > 0 else 1.0
    return vectors @ components.T, "pca", explained


def _truncated_normal(shape: list[int], stddev: float, seed: int) -> np.ndarray:
    """Normal(0, stddev) redrawn outside two standard deviations, as BERT's initialiser."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape)
    outside = np.abs(values) > 2
    while outside.any():
        values[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(values) > 2
    return (values * stddev).astype(np.float32)


def format_report(report: dict) -> str:
    """The report of `embedding_init_from_vectors` as one log line."""
    r = report
    if r["projection"] == "pca":
        projection = (f"PCA {r['vector_dim']} -> {r['vector_columns']} (keeps "
                      f"{r['explained_variance']:.1%} of the variance)")
        if r["vector_columns"] < r["hidden_size"]:  # fewer covered tokens than hidden_size
            projection += (f", columns {r['vector_columns']}..{r['hidden_size'] - 1} kept from "
                           f"the initial table")
    elif r["projection"] == "pad":
        projection = (f"{r['vector_dim']} vector columns, columns {r['vector_dim']}.."
                      f"{r['hidden_size'] - 1} kept from the initial table")
    elif r["vector_columns"] == 0:
        projection = "none (no token covered: the table is the initial table)"
    else:
        projection = f"none ({r['vector_dim']} = hidden size)"
    return (f"Embedding init from {r['path']}: {r['words_read']} words of dimension "
            f"{r['vector_dim']} read; of {r['vocab_size']} tokens, {r['covered_direct']} "
            f"({r['covered_direct_fraction']:.1%}) covered directly, {r['covered_by_pieces']} "
            f"({r['covered_by_pieces_fraction']:.1%}) by pieces of words, {r['not_covered']} "
            f"({r['not_covered_fraction']:.1%}) not covered and {r['special_tokens']} special, "
            f"both kept at their initial values; projection: {projection}; covered vectors "
            f"centred and scaled by {r['scale']:.4g} to std {r['initializer_range']}.")
