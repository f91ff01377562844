"""Raw text -> masked-LM / next-sentence TFRecords, google-research/bert's algorithm.

    python -m tfbert.data.create_pretraining_data --input_files='corpus/*.txt' \
        --output_dir=records/ --tokenizer_type=sentencepiece --vocab_file=vocab/spm.model \
        --max_seq_length=128 --max_predictions_per_seq=20 --num_shards=64

Input: one sentence (or line) per line, a blank line between documents; each file also starts a
new document. For every document, `dupe_factor` times (each time with new masks):

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

Instances are shuffled and written round-robin to `num_shards` TFRecord files with google's
feature layout (see `tfbert.data.pretraining_dataset`), plus `metadata.json`.
"""

from __future__ import annotations

import collections
import json
import os
import random
import sys

import tensorflow as tf
from absl import app, flags, logging

from tfbert.data.pretraining_dataset import DataError, resolve_input_files

# Lines tokenized per tokenize_batch call: large enough to amortize the call, small enough to
# keep memory flat.
_TOKENIZE_CHUNK = 8192

Instance = collections.namedtuple(
    "Instance", ["tokens", "segment_ids", "is_random_next", "masked_lm_positions",
                 "masked_lm_labels"])


def read_documents(input_files: list[str], tokenizer) -> list[list[list[str]]]:
    """Reads and tokenizes raw text. Returns documents -> sentences -> tokens (non-empty)."""
    documents = []
    for path in input_files:
        with tf.io.gfile.GFile(path, "rb") as f:
            # Undecodable bytes become U+FFFD rather than stopping the run (google drops them).
            lines = [line.strip() for line in f.read().decode("utf-8", "replace").split("\n")]
        documents.append([])  # a new file starts a new document
        for start in range(0, len(lines), _TOKENIZE_CHUNK):
            chunk = lines[start:start + _TOKENIZE_CHUNK]
            # Blank lines are document breaks; only the others need tokenizing.
            texts = [line for line in chunk if line]
            tokenized = iter(tokenizer.tokenize_batch(texts))
            for line in chunk:
                if not line:
                    documents.append([])
                    continue
                tokens = next(tokenized)
                if tokens:
                    documents[-1].append(tokens)
    return [d for d in documents if d]


def create_instances(documents: list[list[list[str]]], vocab_words: list[str], *,
                     max_seq_length: int, max_predictions_per_seq: int, masked_lm_prob: float,
                     dupe_factor: int, short_seq_prob: float, do_whole_word_mask: bool,
                     is_subword_continuation, rng: random.Random) -> list[Instance]:
    """All training instances, shuffled (the same rng calls, in the same order, as google's)."""
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
            instances.append(Instance(tokens, segment_ids, is_random_next, positions, labels))
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
    return tf.train.Example(features=tf.train.Features(feature=feature))


def create_pretraining_data(input_files: list[str], output_dir: str, tokenizer, *,
                            max_seq_length: int = 128, max_predictions_per_seq: int = 20,
                            masked_lm_prob: float = 0.15, dupe_factor: int = 5,
                            short_seq_prob: float = 0.1, do_whole_word_mask: bool = False,
                            num_shards: int = 1, random_seed: int = 12345,
                            output_prefix: str = "pretrain") -> dict:
    """Writes pretraining TFRecords made from raw text.

    Args:
      input_files: raw text files (one sentence per line, blank line between documents).
      output_dir: receives `<output_prefix>-<i>-of-<num_shards>.tfrecord` and `metadata.json`.
      tokenizer: a `tfbert.tokenization.Tokenizer`.
      max_seq_length: tokens per instance, [CLS]/[SEP] included (>= 5).
      max_predictions_per_seq: most masked positions per instance.
      masked_lm_prob: fraction of tokens masked.
      dupe_factor: passes over the data, each with different masks and pairings.
      short_seq_prob: probability of a shorter target length.
      do_whole_word_mask: mask all pieces of a word together.
      num_shards: output files; instances are spread round-robin.
      random_seed: seed of every random choice (same inputs and seed, same records).
    Returns:
      Statistics: num_documents, num_sentences, num_tokens, num_instances,
      num_random_next, files (the TFRecord paths), metadata_file.
    Raises:
      DataError: bad settings, no text, or fewer instances than shards.
    """
    _check_settings(max_seq_length, max_predictions_per_seq, masked_lm_prob, dupe_factor,
                    short_seq_prob, num_shards)
    documents = read_documents(list(input_files), tokenizer)
    if not documents:
        raise DataError(f"no text in the input files {list(input_files)}")
    num_sentences = sum(len(d) for d in documents)
    num_tokens = sum(len(s) for d in documents for s in d)
    logging.info("Read %d documents, %d sentences, %d tokens", len(documents), num_sentences,
                 num_tokens)

    rng = random.Random(random_seed)
    vocab_words = tokenizer.convert_ids_to_tokens(range(tokenizer.vocab_size))
    instances = create_instances(
        documents, vocab_words, max_seq_length=max_seq_length,
        max_predictions_per_seq=max_predictions_per_seq, masked_lm_prob=masked_lm_prob,
        dupe_factor=dupe_factor, short_seq_prob=short_seq_prob,
        do_whole_word_mask=do_whole_word_mask,
        is_subword_continuation=tokenizer.is_subword_continuation, rng=rng)
    if len(instances) < num_shards:
        # A shard without records would be a 0-byte file, which the reader refuses.
        raise DataError(f"only {len(instances)} instances for --num_shards={num_shards}: use "
                        f"fewer shards or more text")

    tf.io.gfile.makedirs(output_dir)
    files = [os.path.join(output_dir, f"{output_prefix}-{i:05d}-of-{num_shards:05d}.tfrecord")
             for i in range(num_shards)]
    writers = [tf.io.TFRecordWriter(path) for path in files]
    try:
        for i, instance in enumerate(instances):
            example = _to_example(instance, tokenizer, max_seq_length, max_predictions_per_seq)
            writers[i % num_shards].write(example.SerializeToString())
    finally:
        for writer in writers:
            writer.close()

    num_random_next = sum(instance.is_random_next for instance in instances)
    metadata = dict(
        max_seq_length=max_seq_length, max_predictions_per_seq=max_predictions_per_seq,
        tokenizer_type=tokenizer.tokenizer_type, vocab_size=tokenizer.vocab_size,
        num_instances=len(instances), files=[os.path.basename(f) for f in files],
        num_documents=len(documents), masked_lm_prob=masked_lm_prob, dupe_factor=dupe_factor,
        short_seq_prob=short_seq_prob, do_whole_word_mask=do_whole_word_mask,
        random_seed=random_seed, input_files=list(input_files))
    metadata_file = os.path.join(output_dir, "metadata.json")
    with tf.io.gfile.GFile(metadata_file, "w") as f:
        f.write(json.dumps(metadata, indent=2) + "\n")
    logging.info("Wrote %d instances (%d with a random next segment) to %d files in %s",
                 len(instances), num_random_next, num_shards, output_dir)
    return dict(num_documents=len(documents), num_sentences=num_sentences,
                num_tokens=num_tokens, num_instances=len(instances),
                num_random_next=num_random_next, files=files, metadata_file=metadata_file)


def _check_settings(max_seq_length, max_predictions_per_seq, masked_lm_prob, dupe_factor,
                    short_seq_prob, num_shards) -> None:
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


# ----------------------------------------------------------------------------------------------
# Entry point.


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    fv = dict(flag_values=flag_values)
    flags.DEFINE_list("input_files", [], "Comma-separated globs of raw text files: one sentence "
                                         "per line, a blank line between documents.", **fv)
    flags.DEFINE_string("output_dir", "", "Directory for the TFRecord shards and metadata.json.",
                        **fv)
    flags.DEFINE_enum("tokenizer_type", "sentencepiece", ["sentencepiece", "wordpiece"],
                      "Kind of --vocab_file.", **fv)
    flags.DEFINE_string("vocab_file", "", "SentencePiece .model or WordPiece vocab.txt.", **fv)
    flags.DEFINE_boolean("lower_case", True, "WordPiece: lower-case and strip accents (must match "
                                             "the vocabulary).", **fv)
    flags.DEFINE_integer("max_seq_length", 128, "Tokens per instance.", **fv)
    flags.DEFINE_integer("max_predictions_per_seq", 20, "Most masked positions per instance.",
                         **fv)
    flags.DEFINE_float("masked_lm_prob", 0.15, "Fraction of tokens masked.", **fv)
    flags.DEFINE_integer("dupe_factor", 5, "Passes over the text, each with different masks.",
                         **fv)
    flags.DEFINE_float("short_seq_prob", 0.1, "Probability of a shorter instance.", **fv)
    flags.DEFINE_boolean("do_whole_word_mask", False, "Mask whole words, not single pieces.",
                         **fv)
    flags.DEFINE_integer("num_shards", 1, "Output TFRecord files.", **fv)
    flags.DEFINE_integer("random_seed", 12345, "Seed of every random choice.", **fv)
    flags.DEFINE_string("output_prefix", "pretrain", "File name prefix of the shards.", **fv)


def main(argv) -> int:
    from tfbert.tokenization import TokenizerError, load_tokenizer

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
        tokenizer = load_tokenizer(fv.tokenizer_type, fv.vocab_file, lower_case=fv.lower_case)
        stats = create_pretraining_data(
            input_files, fv.output_dir, tokenizer, max_seq_length=fv.max_seq_length,
            max_predictions_per_seq=fv.max_predictions_per_seq,
            masked_lm_prob=fv.masked_lm_prob, dupe_factor=fv.dupe_factor,
            short_seq_prob=fv.short_seq_prob, do_whole_word_mask=fv.do_whole_word_mask,
            num_shards=fv.num_shards, random_seed=fv.random_seed,
            output_prefix=fv.output_prefix)
    except (DataError, TokenizerError) as e:
        print(f"create_pretraining_data: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"create_pretraining_data: {stats['num_instances']} instances from "
          f"{stats['num_documents']} documents in {len(stats['files'])} files under "
          f"{fv.output_dir}", flush=True)
    return 0


def run() -> None:
    """Console-script entry point."""
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
