"""Embedding init from word vectors: which rows get which vectors, projections, scale, reports,
and the errors for bad files. Tiny vector files written here; expected rows computed by hand."""

from __future__ import annotations

import gzip
import itertools
import os
import sys

import numpy as np
import pytest

import tfbert
from tfbert import tokenization
from tfbert.training import embedding_init as ei
from tfbert.training.embedding_init import VectorFileError

IR = 0.02  # initializer_range
SAMPLE_CORPUS = os.path.join(os.path.dirname(tfbert.__file__), "data", "sample_corpus")

# A WordPiece vocabulary whose splits are known: ids 5.. are the tokens below.
WP_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
            "the", "river", "##s", "run", "##ning", "stone", "rain", "##fall", "zebra", "##x"]
# (word, vector) in file order. Splits: rivers = river ##s, runs = run ##s,
# running = run ##ning, runsss = run ##s ##s ##s, rainfall = rain ##fall; qq and Café are [UNK].
WP_WORDS = [
    ("the", [1, 0, 0, 0]),
    ("The", [9, 9, 9, 9]),  # uncased: a later case variant of "the", so it loses
    ("river", [0, 1, 0, 0]),
    ("rivers", [0, 2, 0, 0]),
    ("runs", [0, 0, 1, 0]),
    ("running", [0, 0, 0, 1]),
    ("runsss", [0, 0, 3, 0]),  # run ##s ##s ##s: counts once for ##s
    ("rainfall", [1, 1, 0, 0]),
    ("Rain", [2, 2, 2, 2]),  # uncased: the direct hit of "rain"; cased: [UNK]
    ("STONE", [3, 0, 0, 3]),  # uncased: "stone"; cased: [UNK]
    ("qq", [5, 5, 5, 5]),
    ("Café", [7, 7, 7, 7]),
]


def ids_of(tokens):
    return [WP_VOCAB.index(t) for t in tokens]


def write_vec(path, words, header=True, trailing=""):
    """A word2vec text file: "count dim" header (optional), then "word v1 ... vd" lines."""
    dim = len(words[0][1])
    lines = [f"{len(words)} {dim}"] if header else []
    lines += [word + " " + " ".join(repr(float(v)) for v in vec) + trailing
              for word, vec in words]
    text = "\n".join(lines) + "\n"
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return str(path)


def initial(vocab_size, hidden, seed=1):
    return (np.random.default_rng(seed).standard_normal([vocab_size, hidden]) * IR
            ).astype(np.float32)


def expected_table(initial_table, raw_rows: dict[int, list[float]]):
    """The stated method by hand for d == hidden: covered rows centred over the covered tokens,
    scaled by one scalar to std IR; all other rows stay as initial_table."""
    ids = sorted(raw_rows)
    x = np.array([raw_rows[i] for i in ids], np.float64)
    x = x - x.mean(axis=0)
    table = initial_table.copy()
    table[ids] = x * (IR / x.std())
    return table


@pytest.fixture(scope="module")
def wp_vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("wordpiece") / "vocab.txt"
    path.write_text("\n".join(WP_VOCAB) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def wp_uncased(wp_vocab_file):
    return tokenization.load_tokenizer("wordpiece", wp_vocab_file)


@pytest.fixture(scope="module")
def wp_cased(wp_vocab_file):
    return tokenization.load_tokenizer("wordpiece", wp_vocab_file, lower_case=False)


@pytest.fixture(scope="module")
def wp_vec(tmp_path_factory):
    return write_vec(tmp_path_factory.mktemp("vec") / "words.vec", WP_WORDS)


# ----------------------------------------------------------------------------------------------
# Which rows get which vectors.


def test_wordpiece_uncased_rows(wp_uncased, wp_vec):
    init = initial(len(WP_VOCAB), 4)
    table, report = ei.embedding_init_from_vectors(wp_vec, wp_uncased, 4, init, IR)
    the, river, s, run, ning, stone, rain, fall = ids_of(
        ["the", "river", "##s", "run", "##ning", "stone", "rain", "##fall"])
    raw = {
        the: [1, 0, 0, 0],  # direct; "The" [9,9,9,9] comes later and loses
        river: [0, 1, 0, 0],  # direct
        stone: [3, 0, 0, 3],  # direct: "STONE" lower-cased
        rain: [2, 2, 2, 2],  # direct: "Rain" lower-cased (rainfall only adds to pieces)
        s: [0, 2 / 3, 4 / 3, 0],  # mean of rivers [0,2,0,0], runs [0,0,1,0], runsss [0,0,3,0]
        run: [0, 0, 4 / 3, 1 / 3],  # mean of runs, running [0,0,0,1] and runsss
        ning: [0, 0, 0, 1],  # running
        fall: [1, 1, 0, 0],  # rainfall
    }
    assert table.dtype == np.float32 and table.shape == (len(WP_VOCAB), 4)
    np.testing.assert_allclose(table, expected_table(init, raw), rtol=1e-5, atol=1e-7)
    # Special tokens, zebra and ##x are untouched, bit for bit; the caller's table is not modified.
    untouched = [0, 1, 2, 3, 4] + ids_of(["zebra", "##x"])
    np.testing.assert_array_equal(table[untouched], init[untouched])
    assert np.std(table[sorted(raw)]) == pytest.approx(IR, rel=1e-5)
    assert report["covered_direct"] == 4 and report["covered_by_pieces"] == 4
    assert report["not_covered"] == 2 and report["special_tokens"] == 5
    assert report["vocab_size"] == 15 and report["words_read"] == len(WP_WORDS)
    assert report["not_covered_fraction"] == pytest.approx(2 / 15)
    assert report["projection"] == "none" and report["vector_dim"] == 4


def test_wordpiece_cased_rows(wp_cased, wp_vec):
    init = initial(len(WP_VOCAB), 4)
    table, report = ei.embedding_init_from_vectors(wp_vec, wp_cased, 4, init, IR)
    the, river, s, run, ning, rain, fall = ids_of(
        ["the", "river", "##s", "run", "##ning", "rain", "##fall"])
    raw = {
        the: [1, 0, 0, 0], river: [0, 1, 0, 0],  # direct
        s: [0, 2 / 3, 4 / 3, 0], run: [0, 0, 4 / 3, 1 / 3], ning: [0, 0, 0, 1],
        rain: [1, 1, 0, 0],  # cased: "Rain" is [UNK], so rain comes from rainfall's pieces
        fall: [1, 1, 0, 0],
    }
    np.testing.assert_allclose(table, expected_table(init, raw), rtol=1e-5, atol=1e-7)
    assert (report["covered_direct"], report["covered_by_pieces"], report["not_covered"]) == (
        2, 5, 3)  # stone (only "STONE" in the file), zebra, ##x


def test_sentencepiece_rows(tmp_path):
    with open(os.path.join(SAMPLE_CORPUS, "en_essays.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()[:60]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    model = tokenization.train_sentencepiece([str(tmp_path / "corpus.txt")],
                                             str(tmp_path / "spm"), vocab_size=150)
    tok = tokenization.load_tokenizer("sentencepiece", model)
    assert tok.tokenize("the") == ["\u2581the"] and tok.tokenize("river") == ["\u2581river"]
    words = ["the", "river", "rivers", "water", "Water", "waters", "stone", "the", "qq", "\u2603"]
    rng = np.random.default_rng(0)
    vecs = [rng.standard_normal(6).round(3) for _ in words]
    path = write_vec(tmp_path / "sp.vec", list(zip(words, vecs)))
    init = initial(tok.vocab_size, 6)
    table, report = ei.embedding_init_from_vectors(path, tok, 6, init, IR)

    # Reference: direct = a word that is one "▁" piece (the first such word wins); pieces =
    # the mean over the words containing the piece; special ids never take a vector.
    special = set(tok.special_ids.values())
    direct, contained = {}, {}
    for word, vec in zip(words, vecs):
        pieces = tok.tokenize(word)
        ids = tok.convert_tokens_to_ids(pieces)
        if len(ids) == 1 and pieces[0].startswith("\u2581") and ids[0] not in special:
            direct.setdefault(ids[0], vec)
        for i in set(ids) - special:
            contained.setdefault(i, []).append(vec)
    raw = {i: np.mean(v, axis=0) for i, v in contained.items()}
    raw.update(direct)
    np.testing.assert_allclose(table, expected_table(init, raw), rtol=1e-5, atol=1e-7)
    # By name: "▁the" has the first "the"'s vector (not the repeat's), "▁river" river's.
    [the, river] = tok.convert_tokens_to_ids(["\u2581the", "\u2581river"])
    assert the in direct and river in direct
    np.testing.assert_array_equal(direct[the], vecs[0])
    np.testing.assert_array_equal(direct[river], vecs[1])
    assert report["covered_direct"] == len(direct) >= 3
    assert report["covered_by_pieces"] == len(set(contained) - set(direct)) > 0
    covered = len(set(contained) | set(direct))
    assert report["not_covered"] == tok.vocab_size - 5 - covered
    np.testing.assert_array_equal(table[sorted(special)], init[sorted(special)])


# ----------------------------------------------------------------------------------------------
# Projection and scale.


def _letter_vocab(tmp_path, n):
    """A WordPiece vocabulary of the specials and n two-letter words (one piece each)."""
    words = ["".join(p) for p in itertools.product("bcdfg", "aeiou")][:n]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(WP_VOCAB[:5] + words) + "\n", encoding="utf-8")
    return words, tokenization.load_tokenizer("wordpiece", str(path))


def test_pca_when_vectors_are_wider(tmp_path):
    words, tok = _letter_vocab(tmp_path, 20)
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal([12, 4]))[0].T  # 4 orthonormal rows in R^12
    x = rng.standard_normal([20, 4]) @ basis * 0.5 + 3.0  # rank-4 data, far from the origin
    path = write_vec(tmp_path / "wide.vec", list(zip(words, x)))
    init = initial(tok.vocab_size, 4)
    table, report = ei.embedding_init_from_vectors(path, tok, 4, init, IR)
    assert table.shape == (25, 4) and report["projection"] == "pca"
    assert report["explained_variance"] == pytest.approx(1.0)  # the data has rank 4
    rows = table[5:].astype(np.float64)
    assert rows.std() == pytest.approx(IR, rel=1e-5)
    np.testing.assert_allclose(rows.mean(axis=0), 0, atol=1e-7)  # centred
    # Rank-4 data onto its 4 principal directions: distances kept, times the one scale.
    def distances(a):
        return np.linalg.norm(a[:, None] - a[None], axis=-1)
    np.testing.assert_allclose(distances(rows), distances(x) * report["scale"], rtol=1e-4,
                               atol=1e-7)
    # Against the reference PCA (SVD of the centred data), up to each component's sign.
    xc = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    reference = u[:, :4] * s[:4] * report["scale"]
    np.testing.assert_allclose(np.abs(rows), np.abs(reference), rtol=1e-4, atol=1e-7)
    # The stated sign convention: each principal direction's largest loading is positive
    # (directions recovered from rows = xc @ components.T * scale; minimum-norm least squares
    # finds them exactly, as they lie in the data's row space).
    components = np.linalg.lstsq(xc, rows / report["scale"], rcond=None)[0].T  # [4, 12]
    largest = components[np.arange(4), np.abs(components).argmax(axis=1)]
    assert (largest > 0).all(), largest
    np.testing.assert_array_equal(table[:5], init[:5])
    assert "PCA 12 -> 4" in ei.format_report(report)


def test_extra_columns_from_initial_table_when_vectors_are_narrower(tmp_path):
    words, tok = _letter_vocab(tmp_path, 10)
    x = np.random.default_rng(0).standard_normal([8, 4])  # the last 2 words are not in the file
    path = write_vec(tmp_path / "narrow.vec", list(zip(words, x)))
    init = initial(tok.vocab_size, 7)
    table, report = ei.embedding_init_from_vectors(path, tok, 7, init, IR)
    assert table.shape == (15, 7) and report["projection"] == "pad"
    covered = np.arange(5, 13)
    np.testing.assert_array_equal(table[covered, 4:], init[covered, 4:])
    xc = x - x.mean(axis=0)
    np.testing.assert_allclose(table[covered, :4], xc * (IR / xc.std()), rtol=1e-5, atol=1e-7)
    assert table[covered, :4].std() == pytest.approx(IR, rel=1e-5)
    np.testing.assert_array_equal(table[[0, 1, 2, 3, 4, 13, 14]], init[[0, 1, 2, 3, 4, 13, 14]])
    assert (report["covered_direct"], report["not_covered"]) == (8, 2)


def test_one_or_no_covered_token(tmp_path, wp_uncased):
    init = initial(len(WP_VOCAB), 2)
    # One covered token: nothing to centre; scaled to a root mean square of IR (PCA 3 -> 1).
    path = write_vec(tmp_path / "one.vec", [("the", [1, 2, 2]), ("qq", [5, 5, 5])])
    table, report = ei.embedding_init_from_vectors(path, wp_uncased, 2, init, IR)
    the = WP_VOCAB.index("the")
    np.testing.assert_allclose(table[the], [IR, init[the, 1]], rtol=1e-5)  # |(1,2,2)| = 3
    assert report["vector_columns"] == 1 and "columns 1..1 kept" in ei.format_report(report)
    # No covered token: the initial table, and a report that says so.
    path = write_vec(tmp_path / "none.vec", [("qq", [5, 5, 5])])
    table, report = ei.embedding_init_from_vectors(path, wp_uncased, 2, init, IR)
    np.testing.assert_array_equal(table, init)
    assert report["not_covered"] == 10 and "no token covered" in ei.format_report(report)


# ----------------------------------------------------------------------------------------------
# File formats, determinism, report.


def test_header_trailing_spaces_and_gzip_read_the_same(tmp_path, wp_uncased, wp_vec):
    init = initial(len(WP_VOCAB), 4)
    reference, _ = ei.embedding_init_from_vectors(wp_vec, wp_uncased, 4, init, IR)
    for name, header, trailing in [("a.vec", False, ""), ("b.txt", False, "  "),
                                   ("c.vec.gz", True, " ")]:
        path = write_vec(tmp_path / name, WP_WORDS, header=header, trailing=trailing)
        assert [w for w, _ in ei.read_word_vectors(path)] == [w for w, _ in WP_WORDS]
        table, report = ei.embedding_init_from_vectors(path, wp_uncased, 4, init, IR)
        np.testing.assert_array_equal(table, reference)
        assert report["words_read"] == len(WP_WORDS)
    word, vector = next(ei.read_word_vectors(wp_vec))
    assert word == "the" and vector.dtype == np.float32 and vector.tolist() == [1, 0, 0, 0]


def test_max_words_reads_only_the_first_words(wp_uncased, wp_vec):
    assert [w for w, _ in ei.read_word_vectors(wp_vec, max_words=3)] == ["the", "The", "river"]
    table, report = ei.embedding_init_from_vectors(wp_vec, wp_uncased, 4, None, IR, max_words=3)
    assert report["words_read"] == 3
    assert (report["covered_direct"], report["covered_by_pieces"]) == (2, 0)


def test_deterministic(wp_uncased, wp_vec):
    a, _ = ei.embedding_init_from_vectors(wp_vec, wp_uncased, 4, None, IR, seed=3)
    b, _ = ei.embedding_init_from_vectors(wp_vec, wp_uncased, 4, None, IR, seed=3)
    c, _ = ei.embedding_init_from_vectors(wp_vec, wp_uncased, 4, None, IR, seed=4)
    np.testing.assert_array_equal(a, b)
    covered = ids_of(["the", "river", "##s", "run", "##ning", "stone", "rain", "##fall"])
    np.testing.assert_array_equal(a[covered], c[covered])  # the seed only draws the rest
    assert not np.array_equal(a[0], c[0])
    assert np.abs(a[0]).max() <= 2 * IR  # truncated at two standard deviations


def test_format_report(wp_uncased, wp_vec):
    _, report = ei.embedding_init_from_vectors(wp_vec, wp_uncased, 4, None, IR)
    line = ei.format_report(report)
    assert "\n" not in line
    for part in ("12 words of dimension 4", "of 15 tokens", "4 (26.7%) covered directly",
                 "4 (26.7%) by pieces", "2 (13.3%) not covered", "5 special",
                 "projection: none", f"to std {IR}"):
        assert part in line, (part, line)


# ----------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("lines, message", [
    (["2 3", "a 1 2 3", "b 1 2"], r"bad\.vec:3: 2 values after the word 'b', expected 3"),
    (["a 1 2 3", "b 1 x 3"], r"bad\.vec:2: 'x' \(after the word 'b'\) is not a number"),
    (["2 3", "a 1 2 3 4"], r"bad\.vec:2: 4 values .* expected 3"),
    (["a 1 2", "b nan 2"], r"bad\.vec:2: .*non-finite"),
])
def test_malformed_line_names_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.vec"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(VectorFileError, match=message):
        list(ei.read_word_vectors(str(path)))


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.vec"
    path.write_bytes(b"a 1 2\n\xff\xfe 1 2\n")
    with pytest.raises(VectorFileError, match=r"bad\.vec:2: not UTF-8"):
        list(ei.read_word_vectors(str(path)))


def test_bin_without_library_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "cc.en.300.bin"
    path.write_bytes(b"\x00" * 16)
    monkeypatch.setitem(sys.modules, "gensim", None)  # makes `import gensim` raise ImportError
    monkeypatch.setitem(sys.modules, "fasttext", None)
    with pytest.raises(VectorFileError, match=r"pip install gensim.*fasttext.*\.vec"):
        ei.read_word_vectors(str(path))


def test_bad_arguments(wp_uncased, wp_vec, tmp_path):
    with pytest.raises(ValueError, match=r"initial_table has shape \(15, 3\).*\[15, 4\]"):
        ei.embedding_init_from_vectors(wp_vec, wp_uncased, 4, np.zeros([15, 3]), IR)
    with pytest.raises(VectorFileError, match="does not exist"):
        ei.read_word_vectors(str(tmp_path / "missing.vec"))
    (tmp_path / "empty.vec").write_text("0 4\n", encoding="utf-8")
    with pytest.raises(VectorFileError, match="no word vectors"):
        ei.embedding_init_from_vectors(str(tmp_path / "empty.vec"), wp_uncased, 4, None, IR)
