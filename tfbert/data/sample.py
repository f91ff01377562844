"""The sample corpus shipped with tfbert, turned into pretraining records on first use.

`python -m tfbert.run` with no --input_files trains on it. The tokenizer and the records are
built once and cached under $TFBERT_CACHE_DIR (default ~/.cache/tfbert), keyed by a hash of the
corpus and the settings, so later runs start at once.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

from absl import logging

SAMPLE_CORPUS_DIR = os.path.join(os.path.dirname(__file__), "sample_corpus")
# Small enough for sentencepiece to learn from a few hundred KB of two languages.
SAMPLE_VOCAB_SIZE = 4000
_FORMAT_VERSION = 1


def sample_corpus_files() -> list[str]:
    files = sorted(glob.glob(os.path.join(SAMPLE_CORPUS_DIR, "*.txt")))
    if not files:
        raise FileNotFoundError(f"the sample corpus is missing from {SAMPLE_CORPUS_DIR}")
    return files


def cache_dir() -> str:
    return os.environ.get("TFBERT_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "tfbert"))


def prepare_sample_data(tokenizer_type: str = "sentencepiece", vocab_file: str | None = None,
                        max_seq_length: int = 128, max_predictions_per_seq: int = 20,
                        num_shards: int = 4) -> tuple[list[str], str]:
    """Builds (or finds in the cache) the sample corpus' tokenizer and TFRecords.

    Args:
      tokenizer_type: "sentencepiece" or "wordpiece".
      vocab_file: an existing tokenizer to use; None trains one on the sample corpus.
      max_seq_length, max_predictions_per_seq: record shape.
      num_shards: number of record files (several, so the reader's interleave is exercised).
    Returns: (record file paths, tokenizer file path).
    """
    from tfbert import tokenization
    from tfbert.data.create_pretraining_data import create_pretraining_data

    corpus = sample_corpus_files()
    digest = hashlib.sha256()
    for path in corpus + ([vocab_file] if vocab_file else []):
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(json.dumps([_FORMAT_VERSION, tokenizer_type, max_seq_length,
                              max_predictions_per_seq, num_shards]).encode())
    directory = os.path.join(cache_dir(), f"sample-{digest.hexdigest()[:16]}")
    done_marker = os.path.join(directory, "DONE")
    if vocab_file is None:
        vocab_file = os.path.join(directory, tokenization.default_filename(tokenizer_type))
    if os.path.exists(done_marker):
        files = sorted(glob.glob(os.path.join(directory, "*.tfrecord")))
        return files, vocab_file

    logging.info("Preparing the sample corpus in %s (once)", directory)
    # Built in a temporary directory and renamed, so an interrupted build is never used.
    tmp = f"{directory}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    tmp_vocab = vocab_file if os.path.dirname(vocab_file) != directory else os.path.join(
        tmp, os.path.basename(vocab_file))
    if tmp_vocab != vocab_file:  # train the tokenizer
        if tokenizer_type == "sentencepiece":
            tokenization.train_sentencepiece(corpus, os.path.join(tmp, "spm"), SAMPLE_VOCAB_SIZE)
        else:
            tokenization.train_wordpiece(corpus, tmp_vocab, SAMPLE_VOCAB_SIZE)
    tokenizer = tokenization.load_tokenizer(tokenizer_type, tmp_vocab)
    create_pretraining_data(corpus, tmp, tokenizer, max_seq_length=max_seq_length,
                            max_predictions_per_seq=max_predictions_per_seq, num_shards=num_shards,
                            dupe_factor=5)
    with open(os.path.join(tmp, "DONE"), "w") as f:
        f.write("ok\n")
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    try:
        os.rename(tmp, directory)
    except OSError:  # another process finished first; use its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(glob.glob(os.path.join(directory, "*.tfrecord")))
    return files, vocab_file
