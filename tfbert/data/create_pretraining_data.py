"""Raw text -> masked-LM / next-sentence TFRecords, google-research/bert's algorithm.

    python -m tfbert.data.create_pretraining_data --input_files='corpus/*.txt' \
        --output_dir=records/ --tokenizer_type=sentencepiece --vocab_file=vocab/spm.model \
        --max_seq_length=128 --max_predictions_per_seq=20 --num_shards=64

Input: one sentence (or line) per line, a blank line between documents; each file also starts a
new document. With `--label_columns=cls_label,teacher_score` (either or both, in the order the
columns appear) a line is `text<TAB>value<TAB>...`: the document's labels for multi-task
pretraining (an integer class, a float score), given on its first line (later lines may repeat
them, not change them). Every instance of a document carries its labels as the record features
`cls_label` / `teacher_score`. For every document, `dupe_factor` times (each time with new
masks):

- sentences are gathered into a chunk until it reaches a target length (max_seq_length - 3
  tokens, or with probability `short_seq_prob` a random shorter one, so the model also sees
  short inputs);
- the chunk is split at a random sentence boundary into A and B; half of the time (and always
  when the chunk has one sentence) B is replaced by text from a random other document
  (next_sentence_labels = 1), and the sentences it displaced are used for the next instance;
- the pair is trimmed to fit, one token at a time from the longer side, at its front or back at
  random; the sequence is [CLS] A [SEP] B [SEP];
- about `masked_lm_prob` of the tokens (at most `max_predictions_per_seq`), never [CLS]/[SEP],
  are chosen for prediction; each becomes [MASK] 80% of the time, a random vocabulary token 10%,
  and stays 10%. With whole-word masking, a word's pieces are chosen together.

Streaming. google's script holds the whole corpus and all its instances in memory; corpora of
hundreds of GB do not fit. Here the text is read as a stream and cut into chunks of
`documents_per_chunk` documents; each chunk is shuffled and turned into instances as above, the
random "next" documents being drawn from the same chunk, and its instances are shuffled and
written before the next chunk is read. Peak memory is bounded by one chunk (its tokens and
instances; a single document is held whole), not by the corpus. The trade-offs: random next
segments and the written order are mixed within a chunk only (with thousands of documents per
chunk the model cannot exploit that, and training shuffles across files again), and a corpus
of at most `documents_per_chunk` documents gives the same records as holding it all.

Workers. `num_workers` independent processes (one machine or many) can share a corpus; worker
`worker_index` takes:

- with at least `num_workers` input files: the files worker_index, worker_index + num_workers,
  ... of the (sorted) input list;
- with fewer files: every file, keeping the documents whose index (counting the non-blank
  documents through the files in order) is worker_index modulo num_workers.

Its random seed is derived from `random_seed` and `worker_index`, and its files carry its index
(`<prefix>-w<i>-of-<n>-<shard>-of-<num_shards>.tfrecord`, `metadata-w<i>-of-<n>.json`), so
workers never collide and training reads the union with one glob (`records/*.tfrecord`). One
worker writes `<prefix>-<shard>-of-<num_shards>.tfrecord` and `metadata.json`.

Atomic output: shards are written as `<name>.tmp-<pid>` in the output directory and renamed to
their names when all are complete (then the metadata file is written, the same way), so a killed
job leaves no complete-looking partial shard; `*.tfrecord` globs do not match the temporary
names, and `--input_files` wildcards skip them.

The records have google's feature layout (see `tfbert.data.pretraining_dataset`).
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import random
import sys
from collections.abc import Iterable, Iterator

import tensorflow as tf
from absl import app, flags, logging

from tfbert.data.pretraining_dataset import LABEL_FEATURES, DataError, resolve_input_files

# Lines tokenized per tokenize_batch call: large enough to amortize the call, small enough to
# keep memory flat.
_TOKENIZE_CHUNK = 8192
# Bytes read from an input file at a time.
_READ_BLOCK = 16 * 1024 * 1024

Instance = collections.namedtuple(
    "Instance", ["tokens", "segment_ids", "is_random_next", "masked_lm_positions",
                 "masked_lm_labels", "labels"], defaults=[None])


class Document(list):
    """A document: a list of sentences, with its multi-task labels ({name: value}) if any."""

    def __init__(self, sentences=(), labels: dict | None = None):
        super().__init__(sentences)
        self.labels = labels or {}


def _line_labels(line: str, label_columns: tuple[str, ...], where: str):
    """(text, {label: value}) of an input line with `label_columns` after its text."""
    if not label_columns:
        return line, {}
    text, *values = line.split("\t")
    if not values:
        return text.strip(), {}
    if len(values) != len(label_columns):
        raise DataError(f"{where}: {len(values)} value(s) after the text, --label_columns names "
                        f"{len(label_columns)} ({', '.join(label_columns)})")
    labels = {}
    for name, value in zip(label_columns, values):
        try:
            labels[name] = int(value) if name == "cls_label" else float(value)
        except ValueError:
            kind = "an integer class" if name == "cls_label" else "a number"
            raise DataError(f"{where}: {name} {value.strip()!r} is not {kind}") from None
    return text.strip(), labels


def _read_lines(path: str) -> Iterator[str]:
    """The stripped lines of a text file, read in blocks (never the whole file at once)."""
    with tf.io.gfile.GFile(path, "rb") as f:
        rest = b""
        while True:
            block = f.read(_READ_BLOCK)
            if not block:
                break
            # Split the bytes: b"\n" never occurs inside a UTF-8 multi-byte character.
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            for line in lines:
                # Undecodable bytes become U+FFFD rather than stopping the run (google drops
                # them).
                yield line.decode("utf-8", "replace").strip()
        if rest:
            yield rest.decode("utf-8", "replace").strip()


def _raw_documents(input_files: list[str], label_columns: tuple[str, ...] = ()
                   ) -> Iterator[Document]:
    """The documents of the files in order, each a list of its non-blank lines (their text);
    a blank line or a new file ends a document. With `label_columns`, each document carries
    the labels of its first line, and a document without them is an error."""
    for path in input_files:
        document, start = Document(), 0
        for number, line in enumerate(_read_lines(path), start=1):
            if not line:
                if document:
                    yield _checked(document, label_columns, path, start)
                    document = Document()
                continue
            where = f"{path}:{number}"
            text, labels = _line_labels(line, label_columns, where)
            if not document:
                document.labels, start = labels, number
            elif labels and labels != document.labels:
                raise DataError(f"{where}: labels {labels} differ from the document's "
                                f"{document.labels} (line {start}); a document has one set")
            document.append(text)
        if document:
            yield _checked(document, label_columns, path, start)


def _checked(document: Document, label_columns: tuple[str, ...], path: str,
             start: int) -> Document:
    if label_columns and not document.labels:
        raise DataError(f"{path}:{start}: a document without its labels (--label_columns="
                        f"{','.join(label_columns)}: its first line ends with them, after a tab)")
    return document


def worker_share(input_files: list[str], worker_index: int = 0,
                 num_workers: int = 1) -> tuple[list[str], int]:
    """What worker `worker_index` of `num_workers` reads (see the module docstring).

    Returns:
      (files to read, document stride): with at least `num_workers` files, every
      num_workers-th file and stride 1 (all their documents); otherwise all files and stride
      `num_workers` (the worker keeps documents worker_index, worker_index + num_workers, ...).
    """
    if not 0 <= worker_index < num_workers:
        raise DataError(f"--worker_index={worker_index} is not in [0, --num_workers="
                        f"{num_workers})")
    if len(input_files) >= num_workers:
        return list(input_files)[worker_index::num_workers], 1
    return list(input_files), num_workers


def _tokenize(documents: list[Document], tokenizer) -> list[Document]:
    """Tokenizes the lines of many documents in one call; drops empty sentences and documents."""
    tokenized = iter(tokenizer.tokenize_batch([line for d in documents for line in d]))
    out = []
    for document in documents:
        sentences = [tokens for tokens in itertools.islice(tokenized, len(document)) if tokens]
        if sentences:
            out.append(Document(sentences, document.labels))
    return out


def read_documents(input_files: list[str], tokenizer, worker_index: int = 0,
                   num_workers: int = 1, label_columns: tuple[str, ...] = ()
                   ) -> Iterator[Document]:
    """Reads and tokenizes raw text as a stream: yields documents (lists of sentences, each a
    non-empty list of tokens), those of worker `worker_index` only (see `worker_share`). Memory
    holds up to about `_TOKENIZE_CHUNK` lines at a time."""
    files, stride = worker_share(input_files, worker_index, num_workers)
    pending, pending_lines = [], 0
    for index, document in enumerate(_raw_documents(files, tuple(label_columns))):
        if index % stride != worker_index % stride:
            continue  # another worker's: not even tokenized
        pending.append(document)
        pending_lines += len(document)
        if pending_lines >= _TOKENIZE_CHUNK:
            yield from _tokenize(pending, tokenizer)
            pending, pending_lines = [], 0
    yield from _tokenize(pending, tokenizer)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def create_instances(documents: list[list[list[str]]], vocab_words: list[str], *,
                     max_seq_length: int, max_predictions_per_seq: int, masked_lm_prob: float,
                     dupe_factor: int, short_seq_prob: float, do_whole_word_mask: bool,
                     is_subword_continuation, rng: random.Random) -> list[Instance]:
    """All training instances of `documents` (one chunk of the corpus: random next segments
    come from these documents), shuffled; the same rng calls, in the same order, as google's."""
    documents = list(documents)
    rng.shuffle(documents)
    instances = []
    for _ in range(dupe_factor):
        for index in range(len(documents)):
            instances.extend(_instances_from_document(
                documents, index, max_seq_length, short_seq_prob, masked_lm_prob,
                max_predictions_per_seq, vocab_words, do_whole_word_mask,
                is_subword_continuation, rng))
    rng.shuffle(instances)
    return instances


def _instances_from_document(documents, document_index, max_seq_length, short_seq_prob,
                             masked_lm_prob, max_predictions_per_seq, vocab_words,
                             do_whole_word_mask, is_subword_continuation, rng):
    document = documents[document_index]
    max_num_tokens = max_seq_length - 3  # room for [CLS], [SEP], [SEP]
    # Mostly full sequences (no padding wasted); sometimes shorter ones, so that pretraining
    # also sees the short inputs of fine-tuning.
    target_length = max_num_tokens
    if rng.random() < short_seq_prob:
        target_length = rng.randint(2, max_num_tokens)

    instances = []
    chunk, chunk_length = [], 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        chunk_length += len(document[i])
        if i == len(document) - 1 or chunk_length >= target_length:
            # A takes the first a_end sentences of the chunk (at least one).
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            tokens_a = [t for sentence in chunk[:a_end] for t in sentence]
            tokens_b = []
            if len(chunk) == 1 or rng.random() < 0.5:
                is_random_next = True
                target_b_length = target_length - len(tokens_a)
                # A random other document (a corpus of one document has no other: after 10
                # tries, the same one is used, as google does).
                for _ in range(10):
                    random_index = rng.randint(0, len(documents) - 1)
                    if random_index != document_index:
                        break
                random_document = documents[random_index]
                for sentence in random_document[rng.randint(0, len(random_document) - 1):]:
                    tokens_b.extend(sentence)
                    if len(tokens_b) >= target_b_length:
                        break
                # The chunk's unused sentences are not wasted: step back to start there.
                i -= len(chunk) - a_end
            else:
                is_random_next = False
                tokens_b = [t for sentence in chunk[a_end:] for t in sentence]
            _truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)

            tokens = ["[CLS]"] + tokens_a + ["[SEP]"] + tokens_b + ["[SEP]"]
            segment_ids = [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1)
            tokens, positions, labels = _create_masked_lm_predictions(
                tokens, masked_lm_prob, max_predictions_per_seq, vocab_words,
                do_whole_word_mask, is_subword_continuation, rng)
            instances.append(Instance(tokens, segment_ids, is_random_next, positions, labels,
                                      getattr(document, "labels", None)))
            chunk, chunk_length = [], 0
        i += 1
    return instances


def _truncate_seq_pair(tokens_a: list, tokens_b: list, max_num_tokens: int,
                       rng: random.Random) -> None:
    """Trims the longer side, one token at a time, from its front or back at random (in place):
    always cutting the end would bias the model towards sentence ends being absent."""
    while len(tokens_a) + len(tokens_b) > max_num_tokens:
        longer = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def _create_masked_lm_predictions(tokens, masked_lm_prob, max_predictions_per_seq, vocab_words,
                                  do_whole_word_mask, is_subword_continuation, rng):
    """Returns (masked tokens, sorted masked positions, original tokens at those positions)."""
    # Candidate groups: single tokens, or whole words (a piece and its continuations).
    candidates = []
    for i, token in enumerate(tokens):
        if token in ("[CLS]", "[SEP]"):
            continue
        if do_whole_word_mask and candidates and is_subword_continuation(token):
            candidates[-1].append(i)
        else:
            candidates.append([i])
    rng.shuffle(candidates)

    output = list(tokens)
    num_to_predict = min(max_predictions_per_seq,
                         max(1, int(round(len(tokens) * masked_lm_prob))))
    masked = []  # (position, original token)
    covered = set()
    for group in candidates:
        if len(masked) >= num_to_predict:
            break
        # A whole word that would overshoot the budget is skipped, not cut.
        if len(masked) + len(group) > num_to_predict:
            continue
        if any(i in covered for i in group):
            continue
        for i in group:
            covered.add(i)
            if rng.random() < 0.8:
                replacement = "[MASK]"
            elif rng.random() < 0.5:
                replacement = tokens[i]  # kept: the model cannot tell masked from clean input
            else:
                replacement = vocab_words[rng.randint(0, len(vocab_words) - 1)]
            output[i] = replacement
            masked.append((i, tokens[i]))
    masked.sort()
    return output, [i for i, _ in masked], [t for _, t in masked]


def _to_example(instance: Instance, tokenizer, max_seq_length: int,
                 max_predictions_per_seq: int):
    """google-research/bert's tf.train.Example layout; ids and positions zero-padded."""
    input_ids = tokenizer.convert_tokens_to_ids(instance.tokens)
    padding = max_seq_length - len(input_ids)
    # Zero padding (not the [PAD] id) as google writes it; input_mask marks the real tokens.
    input_mask = [1] * len(input_ids) + [0] * padding
    segment_ids = list(instance.segment_ids) + [0] * padding
    input_ids = input_ids + [0] * padding
    num_masked = len(instance.masked_lm_positions)
    unused = max_predictions_per_seq - num_masked
    positions = list(instance.masked_lm_positions) + [0] * unused
    label_ids = tokenizer.convert_tokens_to_ids(instance.masked_lm_labels) + [0] * unused
    weights = [1.0] * num_masked + [0.0] * unused

    def ints(values):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))

    feature = {
        "input_ids": ints(input_ids),
        "input_mask": ints(input_mask),
        "segment_ids": ints(segment_ids),
        "masked_lm_positions": ints(positions),
        "masked_lm_ids": ints(label_ids),
        "masked_lm_weights": tf.train.Feature(float_list=tf.train.FloatList(value=weights)),
        "next_sentence_labels": ints([1 if instance.is_random_next else 0]),
    }
    # Multi-task labels: those of the document segment A comes from.
    for name, value in (instance.labels or {}).items():
        feature[name] = (ints([value]) if name == "cls_label" else
                         tf.train.Feature(float_list=tf.train.FloatList(value=[value])))
    return tf.train.Example(features=tf.train.Features(feature=feature))


class _AtomicShards:
    """`num_shards` TFRecord files written under temporary names (`<path>.tmp-<pid>`, in the
    same directory, so that the rename is a rename and not a copy) and renamed to `paths` by
    `commit()`; `abort()` deletes them. Records are spread round-robin; a shard's file is opened
    with its first record."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self._temp_paths = [f"{path}.tmp-{os.getpid()}" for path in paths]
        self._writers = [None] * len(paths)
        self.num_records = 0

    def write(self, record: bytes) -> None:
        shard = self.num_records % len(self.paths)
        if self._writers[shard] is None:
            self._writers[shard] = tf.io.TFRecordWriter(self._temp_paths[shard])
        self._writers[shard].write(record)
        self.num_records += 1

    def commit(self) -> None:
        """Closes and renames every shard; each must have a record (no 0-byte files)."""
        assert self.num_records >= len(self.paths)
        for writer in self._writers:
            writer.close()
        for temp, path in zip(self._temp_paths, self.paths):
            tf.io.gfile.rename(temp, path, overwrite=True)

    def abort(self) -> None:
        for writer, temp in zip(self._writers, self._temp_paths):
            if writer is None:  # never opened
                continue
            try:
                writer.close()
            except Exception:  # noqa: BLE001  (already failing: clean up what can be)
                pass
            if tf.io.gfile.exists(temp):
                tf.io.gfile.remove(temp)


def _write_atomically(path: str, text: str) -> None:
    temp = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(temp, "w") as f:
        f.write(text)
    tf.io.gfile.rename(temp, path, overwrite=True)


def output_names(output_prefix: str, num_shards: int, worker_index: int = 0,
                 num_workers: int = 1) -> tuple[list[str], str]:
    """(shard file names, metadata file name) of one worker; see the module docstring."""
    if num_workers == 1:
        return ([f"{output_prefix}-{i:05d}-of-{num_shards:05d}.tfrecord"
                 for i in range(num_shards)], "metadata.json")
    worker = f"w{worker_index:05d}-of-{num_workers:05d}"
    return ([f"{output_prefix}-{worker}-{i:05d}-of-{num_shards:05d}.tfrecord"
             for i in range(num_shards)], f"metadata-{worker}.json")


def worker_seed(random_seed: int, worker_index: int) -> int:
    """The seed of worker `worker_index`: worker 0 keeps `random_seed` (one worker gives the
    records it always gave); the others are spread out by a large prime, so that workers of runs
    with nearby seeds do not share one."""
    return random_seed + 1_000_003 * worker_index


def create_pretraining_data(input_files: list[str], output_dir: str, tokenizer, *,
                            max_seq_length: int = 128, max_predictions_per_seq: int = 20,
                            masked_lm_prob: float = 0.15, dupe_factor: int = 5,
                            short_seq_prob: float = 0.1, do_whole_word_mask: bool = False,
                            num_shards: int = 1, random_seed: int = 12345,
                            output_prefix: str = "pretrain", documents_per_chunk: int = 10000,
                            worker_index: int = 0, num_workers: int = 1,
                            label_columns: tuple[str, ...] = ()) -> dict:
    """Writes pretraining TFRecords made from raw text, streaming (see the module docstring).

    Args:
      input_files: raw text files (one sentence per line, blank line between documents); every
        worker must get the same list in the same order (the command line sorts it).
      output_dir: receives the shards and the metadata file (see `output_names`).
      tokenizer: a `tfbert.tokenization.Tokenizer`.
      max_seq_length: tokens per instance, [CLS]/[SEP] included (>= 5).
      max_predictions_per_seq: most masked positions per instance.
      masked_lm_prob: fraction of tokens masked.
      dupe_factor: passes over each chunk, each with different masks and pairings.
      short_seq_prob: probability of a shorter target length.
      do_whole_word_mask: mask all pieces of a word together.
      num_shards: output files of this worker; instances are spread round-robin.
      random_seed: seed of every random choice (same inputs and seed, same records); worker i
        uses `worker_seed(random_seed, i)`.
      documents_per_chunk: documents held in memory at once; random next segments are drawn
        from the same chunk.
      worker_index, num_workers: this worker's share of the input (see `worker_share`).
      label_columns: multi-task labels after each document's text (module docstring), of
        "cls_label" and "teacher_score".
    Returns:
      Statistics of this worker: num_documents, num_sentences, num_tokens, num_instances,
      num_random_next, files (the TFRecord paths), metadata_file.
    Raises:
      DataError: bad settings, no text, or fewer instances than shards. No output file is left
      behind then (nor when writing fails).
    """
    _check_settings(max_seq_length, max_predictions_per_seq, masked_lm_prob, dupe_factor,
                    short_seq_prob, num_shards, documents_per_chunk)
    input_files = list(input_files)
    worker_share(input_files, worker_index, num_workers)  # checks the worker settings
    label_columns = tuple(label_columns)
    unknown = [name for name in label_columns if name not in LABEL_FEATURES]
    if unknown or len(set(label_columns)) != len(label_columns):
        raise DataError(f"--label_columns={','.join(label_columns)}: each of {LABEL_FEATURES} "
                        f"at most once")
    seed = worker_seed(random_seed, worker_index)
    rng = random.Random(seed)
    vocab_words = tokenizer.convert_ids_to_tokens(range(tokenizer.vocab_size))
    names, metadata_name = output_names(output_prefix, num_shards, worker_index, num_workers)
    files = [os.path.join(output_dir, name) for name in names]
    worker = f" (worker {worker_index} of {num_workers})" if num_workers > 1 else ""

    tf.io.gfile.makedirs(output_dir)
    shards = _AtomicShards(files)
    num_documents = num_sentences = num_tokens = num_random_next = 0
    try:
        documents = read_documents(input_files, tokenizer, worker_index, num_workers,
                                   label_columns)
        for chunk in _chunks(documents, documents_per_chunk):
            num_documents += len(chunk)
            num_sentences += sum(len(d) for d in chunk)
            num_tokens += sum(len(s) for d in chunk for s in d)
            instances = create_instances(
                chunk, vocab_words, max_seq_length=max_seq_length,
                max_predictions_per_seq=max_predictions_per_seq, masked_lm_prob=masked_lm_prob,
                dupe_factor=dupe_factor, short_seq_prob=short_seq_prob,
                do_whole_word_mask=do_whole_word_mask,
                is_subword_continuation=tokenizer.is_subword_continuation, rng=rng)
            for instance in instances:
                example = _to_example(instance, tokenizer, max_seq_length,
                                      max_predictions_per_seq)
                shards.write(example.SerializeToString())
                num_random_next += instance.is_random_next
            logging.info("%d documents read, %d instances written%s", num_documents,
                         shards.num_records, worker)
        if not num_documents:
            raise DataError(f"no text in the input files{worker} {input_files}")
        if shards.num_records < num_shards:
            # A shard without records would be a 0-byte file, which the reader refuses.
            raise DataError(f"only {shards.num_records} instances{worker} for --num_shards="
                            f"{num_shards}: use fewer shards or more text")
        shards.commit()
    except BaseException:  # KeyboardInterrupt too: no partial shard is left behind
        shards.abort()
        raise

    metadata = dict(
        max_seq_length=max_seq_length, max_predictions_per_seq=max_predictions_per_seq,
        tokenizer_type=tokenizer.tokenizer_type, vocab_size=tokenizer.vocab_size,
        num_instances=shards.num_records, files=names, num_documents=num_documents,
        masked_lm_prob=masked_lm_prob, dupe_factor=dupe_factor, short_seq_prob=short_seq_prob,
        do_whole_word_mask=do_whole_word_mask, random_seed=random_seed,
        input_files=input_files, documents_per_chunk=documents_per_chunk,
        worker_index=worker_index, num_workers=num_workers, worker_seed=seed,
        label_columns=list(label_columns))
    metadata_file = os.path.join(output_dir, metadata_name)
    _write_atomically(metadata_file, json.dumps(metadata, indent=2) + "\n")
    logging.info("Wrote %d instances (%d with a random next segment) to %d files in %s%s",
                 shards.num_records, num_random_next, num_shards, output_dir, worker)
    return dict(num_documents=num_documents, num_sentences=num_sentences,
                num_tokens=num_tokens, num_instances=shards.num_records,
                num_random_next=num_random_next, files=files, metadata_file=metadata_file)


def _check_settings(max_seq_length, max_predictions_per_seq, masked_lm_prob, dupe_factor,
                    short_seq_prob, num_shards, documents_per_chunk) -> None:
    if max_seq_length < 5:
        raise DataError(f"--max_seq_length={max_seq_length} must be >= 5 ([CLS] A [SEP] B [SEP] "
                        f"with at least one token on each side)")
    if max_predictions_per_seq < 1:
        raise DataError(f"--max_predictions_per_seq={max_predictions_per_seq} must be >= 1")
    if not 0.0 < masked_lm_prob <= 1.0:
        raise DataError(f"--masked_lm_prob={masked_lm_prob} must be in (0, 1]")
    if dupe_factor < 1:
        raise DataError(f"--dupe_factor={dupe_factor} must be >= 1")
    if not 0.0 <= short_seq_prob <= 1.0:
        raise DataError(f"--short_seq_prob={short_seq_prob} must be in [0, 1]")
    if num_shards < 1:
        raise DataError(f"--num_shards={num_shards} must be >= 1")
    if documents_per_chunk < 1:
        raise DataError(f"--documents_per_chunk={documents_per_chunk} must be >= 1")


# ----------------------------------------------------------------------------------------------
# Entry point.


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    fv = dict(flag_values=flag_values)
    flags.DEFINE_list("input_files", [], "Comma-separated globs of raw text files: one sentence "
                                         "per line, a blank line between documents.", **fv)
    flags.DEFINE_string("output_dir", "", "Directory for the TFRecord shards and the metadata "
                                          "file; workers may share one.", **fv)
    flags.DEFINE_enum("tokenizer_type", "sentencepiece", ["sentencepiece", "wordpiece"],
                      "Kind of --vocab_file. Unset: the kind --vocab_file holds (a .model file "
                      "is sentencepiece, another file wordpiece); set, it must agree.", **fv)
    flags.DEFINE_string("vocab_file", "", "Tokenizer: a SentencePiece .model, a WordPiece "
                                          "vocab.txt, or a directory holding one (HuggingFace, "
                                          "google-research/bert, tfbert run or "
                                          "train_tokenizer output).", **fv)
    flags.DEFINE_boolean("do_lower_case", True, "WordPiece: lower-case and strip accents (must "
                                                "match the vocabulary). For a bare vocab.txt; a "
                                                "directory's tokenizer_config.json says it, and "
                                                "a different value given here is an error.", **fv)
    flags.DEFINE_alias("lower_case", "do_lower_case", **fv)  # its former name
    flags.DEFINE_integer("max_seq_length", 128, "Tokens per instance.", **fv)
    flags.DEFINE_integer("max_predictions_per_seq", 20, "Most masked positions per instance.",
                         **fv)
    flags.DEFINE_float("masked_lm_prob", 0.15, "Fraction of tokens masked.", **fv)
    flags.DEFINE_integer("dupe_factor", 5, "Passes over the text, each with different masks.",
                         **fv)
    flags.DEFINE_float("short_seq_prob", 0.1, "Probability of a shorter instance.", **fv)
    flags.DEFINE_boolean("do_whole_word_mask", False, "Mask whole words, not single pieces.",
                         **fv)
    flags.DEFINE_integer("num_shards", 1, "Output TFRecord files (of each worker).", **fv)
    flags.DEFINE_integer("random_seed", 12345, "Seed of every random choice (each worker derives "
                                               "its own from it).", **fv)
    flags.DEFINE_string("output_prefix", "pretrain", "File name prefix of the shards.", **fv)
    flags.DEFINE_integer("documents_per_chunk", 10000, "Documents held in memory at once: each "
                         "chunk is shuffled and turned into instances, random next segments "
                         "coming from the same chunk. Peak memory grows with it.", **fv)
    flags.DEFINE_integer("worker_index", 0, "This worker's index, in [0, --num_workers).", **fv)
    flags.DEFINE_integer("num_workers", 1, "Independent workers sharing the input: with at least "
                         "as many files as workers, worker i takes files i, i+N, ...; otherwise "
                         "documents i, i+N, ... Each writes its own shards and metadata file.",
                         **fv)
    flags.DEFINE_list("label_columns", [], "Multi-task pretraining: cls_label and/or "
                                           "teacher_score, the values after each document's "
                                           "text (tab-separated), written as record features.",
                      **fv)


def main(argv) -> int:
    from tfbert.tokenization import TokenizerError, from_pretrained

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    fv = flags.FLAGS
    try:
        if not fv.output_dir:
            raise DataError("--output_dir is required")
        if not fv.vocab_file:
            raise TokenizerError("--vocab_file is required (train one with "
                                 "python -m tfbert.train_tokenizer)")
        input_files = resolve_input_files(fv.input_files)
        # Unset flags defer to what --vocab_file records.
        tokenizer = from_pretrained(
            fv.vocab_file,
            tokenizer_type=fv.tokenizer_type if fv["tokenizer_type"].present else None,
            do_lower_case=fv.do_lower_case if fv["do_lower_case"].present else None)
        stats = create_pretraining_data(
            input_files, fv.output_dir, tokenizer, max_seq_length=fv.max_seq_length,
            max_predictions_per_seq=fv.max_predictions_per_seq,
            masked_lm_prob=fv.masked_lm_prob, dupe_factor=fv.dupe_factor,
            short_seq_prob=fv.short_seq_prob, do_whole_word_mask=fv.do_whole_word_mask,
            num_shards=fv.num_shards, random_seed=fv.random_seed,
            output_prefix=fv.output_prefix, documents_per_chunk=fv.documents_per_chunk,
            worker_index=fv.worker_index, num_workers=fv.num_workers,
            label_columns=tuple(fv.label_columns))
    except (DataError, TokenizerError) as e:
        print(f"create_pretraining_data: error: {e}", file=sys.stderr, flush=True)
        return 2
    worker = f"worker {fv.worker_index} of {fv.num_workers}: " if fv.num_workers > 1 else ""
    print(f"create_pretraining_data: {worker}{stats['num_instances']} instances from "
          f"{stats['num_documents']} documents in {len(stats['files'])} files under "
          f"{fv.output_dir}", flush=True)
    return 0


def run() -> None:
    """Console-script entry point."""
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
