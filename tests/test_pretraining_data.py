"""create_pretraining_data's records and the tf.data reader: layout, sharding, checks,
checkpointing and dynamic masking; streaming, workers and atomic shards; bad records met deep in
a file during training."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_tfbert
from test_tokenization import write_corpus
from tfbert import tokenization
from tfbert.data import create_pretraining_data as cpd
from tfbert.data import pretraining_dataset as pd
from tfbert.data.create_pretraining_data import create_pretraining_data, read_documents

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Odd sizes, so that no length is confused with another.
SEQ, PREDICTIONS, SHARDS, VOCAB = 37, 6, 3, 150
CLS, SEP, PAD, MASK = 2, 3, 0, 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", num_documents=40)


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("spm") / "spm")
    return tokenization.load_tokenizer(
        "sentencepiece", tokenization.train_sentencepiece([corpus], prefix, vocab_size=VOCAB))


@pytest.fixture(scope="module")
def records(corpus, tokenizer, tmp_path_factory):
    """(stats, output_dir) of the corpus turned into 3 shards of length-37 instances."""
    output_dir = str(tmp_path_factory.mktemp("records"))
    stats = create_pretraining_data([corpus], output_dir, tokenizer, max_seq_length=SEQ,
                                    max_predictions_per_seq=PREDICTIONS, dupe_factor=2,
                                    num_shards=SHARDS, random_seed=7)
    return stats, output_dir


def read_examples(files) -> list[dict[str, np.ndarray]]:
    """Every record of `files`, parsed with plain protobuf (independently of the reader)."""
    examples = []
    for raw in tf.data.TFRecordDataset(files):
        feature = tf.train.Example.FromString(raw.numpy()).features.feature
        examples.append({
            name: np.array(feature[name].float_list.value if name == "masked_lm_weights"
                           else feature[name].int64_list.value) for name in feature})
    return examples


def unmasked(input_ids, positions, label_ids, weights) -> np.ndarray:
    """The original sequence: masked_lm_ids put back at masked_lm_positions (weight > 0)."""
    original = np.array(input_ids)
    real = np.asarray(weights) > 0
    original[np.asarray(positions)[real]] = np.asarray(label_ids)[real]
    return original


def check_masking(input_ids, input_mask, positions, label_ids, weights) -> np.ndarray:
    """Asserts the masked-LM invariants of one example; returns its original sequence."""
    weights = np.asarray(weights)
    real = weights > 0
    num = int(real.sum())
    assert 1 <= num <= PREDICTIONS
    assert set(weights.tolist()) <= {0.0, 1.0}
    assert real[:num].all() and not real[num:].any()  # real predictions first
    assert not np.asarray(positions)[~real].any() and not np.asarray(label_ids)[~real].any()
    length = int(np.sum(input_mask))
    masked_positions = np.asarray(positions)[real]
    assert (masked_positions < length).all()  # within the non-pad region
    assert len(set(masked_positions.tolist())) == num
    original = unmasked(input_ids, positions, label_ids, weights)
    assert not np.isin(original[masked_positions], [CLS, SEP, PAD]).any()
    return original


def test_records_layout(records):
    stats, _ = records
    examples = read_examples(stats["files"])
    assert len(examples) == stats["num_instances"] > 20
    labels = collections.Counter()
    for ex in examples:
        assert set(ex) == set(pd.FEATURE_NAMES)
        for name in ("input_ids", "input_mask", "segment_ids"):
            assert ex[name].shape == (SEQ,), name
        for name in ("masked_lm_positions", "masked_lm_ids", "masked_lm_weights"):
            assert ex[name].shape == (PREDICTIONS,), name
        assert ex["masked_lm_weights"].dtype == np.float64  # a float_list
        assert ex["next_sentence_labels"].shape == (1,)
        labels[int(ex["next_sentence_labels"][0])] += 1

        length = int(ex["input_mask"].sum())
        assert (ex["input_mask"] == (np.arange(SEQ) < length)).all()
        assert not ex["input_ids"][length:].any() and not ex["segment_ids"][length:].any()
        original = check_masking(ex["input_ids"], ex["input_mask"], ex["masked_lm_positions"],
                                 ex["masked_lm_ids"], ex["masked_lm_weights"])
        # [CLS] A [SEP] B [SEP], segments 0 then 1.
        assert original[0] == CLS and original[length - 1] == SEP
        seps = np.flatnonzero(original[:length] == SEP)
        assert len(seps) == 2 and 1 < seps[0] < length - 2
        segments = ex["segment_ids"][:length]
        assert (segments[:seps[0] + 1] == 0).all() and (segments[seps[0] + 1:] == 1).all()
    assert set(labels) == {0, 1}  # both real and random next segments


def test_records_stats_metadata_and_determinism(records, corpus, tokenizer, tmp_path):
    stats, output_dir = records
    assert stats["files"] == [os.path.join(output_dir, f"pretrain-0000{i}-of-00003.tfrecord")
                              for i in range(SHARDS)]
    counts = [sum(1 for _ in tf.data.TFRecordDataset(f)) for f in stats["files"]]
    assert sum(counts) == stats["num_instances"] and max(counts) - min(counts) <= 1  # round robin
    with open(os.path.join(output_dir, "metadata.json")) as f:
        metadata = json.load(f)
    assert metadata["max_seq_length"] == SEQ
    assert metadata["max_predictions_per_seq"] == PREDICTIONS
    assert metadata["tokenizer_type"] == "sentencepiece" and metadata["vocab_size"] == VOCAB
    assert metadata["num_instances"] == stats["num_instances"]
    assert metadata["files"] == [os.path.basename(f) for f in stats["files"]]
    # The same input and seed give the same bytes; another seed does not.
    again = create_pretraining_data([corpus], str(tmp_path / "a"), tokenizer, max_seq_length=SEQ,
                                    max_predictions_per_seq=PREDICTIONS, dupe_factor=2,
                                    num_shards=SHARDS, random_seed=7)
    other = create_pretraining_data([corpus], str(tmp_path / "b"), tokenizer, max_seq_length=SEQ,
                                    max_predictions_per_seq=PREDICTIONS, dupe_factor=2,
                                    num_shards=SHARDS, random_seed=8)
    read = lambda path: open(path, "rb").read()  # noqa: E731
    assert [read(f) for f in again["files"]] == [read(f) for f in stats["files"]]
    assert [read(f) for f in other["files"]] != [read(f) for f in stats["files"]]


def test_whole_word_masking(corpus, tokenizer, tmp_path):
    stats = create_pretraining_data([corpus], str(tmp_path), tokenizer, max_seq_length=SEQ,
                                    max_predictions_per_seq=PREDICTIONS, dupe_factor=1,
                                    do_whole_word_mask=True, random_seed=3)
    words = tokenizer.convert_ids_to_tokens(range(tokenizer.vocab_size))
    checked = 0
    for ex in read_examples(stats["files"]):
        original = check_masking(ex["input_ids"], ex["input_mask"], ex["masked_lm_positions"],
                                 ex["masked_lm_ids"], ex["masked_lm_weights"])
        masked = set(ex["masked_lm_positions"][ex["masked_lm_weights"] > 0].tolist())
        for p in masked:
            # A masked continuation piece is masked with the piece before it.
            if tokenizer.is_subword_continuation(words[original[p]]) and \
                    original[p - 1] not in (CLS, SEP):
                assert p - 1 in masked
                checked += 1
    assert checked > 0


def test_create_pretraining_data_errors(corpus, tokenizer, tmp_path):
    with pytest.raises(pd.DataError, match="--max_seq_length=4"):
        create_pretraining_data([corpus], str(tmp_path), tokenizer, max_seq_length=4)
    with pytest.raises(pd.DataError, match="--num_shards=100000"):
        create_pretraining_data([corpus], str(tmp_path), tokenizer, dupe_factor=1,
                                num_shards=100000)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n\n")
    with pytest.raises(pd.DataError, match="no text"):
        create_pretraining_data([str(blank)], str(tmp_path), tokenizer)
    with pytest.raises(pd.DataError, match="--worker_index=2 is not in \\[0, --num_workers=2\\)"):
        create_pretraining_data([corpus], str(tmp_path), tokenizer, worker_index=2,
                                num_workers=2)
    with pytest.raises(pd.DataError, match="--documents_per_chunk=0"):
        create_pretraining_data([corpus], str(tmp_path), tokenizer, documents_per_chunk=0)
    assert sorted(os.listdir(tmp_path)) == ["blank.txt"]  # nothing written by the failures


# ----------------------------------------------------------------------------------------------
# The reader.


def dataset(files, **kwargs):
    kwargs.setdefault("batch_size", 5)
    return pd.pretraining_dataset(files, max_seq_length=SEQ, max_predictions_per_seq=PREDICTIONS,
                                  **kwargs)


def rows(ds) -> list[tuple]:
    """Every example of a finite dataset, as hashable tuples of its input_ids and positions."""
    out = []
    for batch in ds:
        for ids, positions in zip(batch["input_ids"].numpy(),
                                  batch["masked_lm_positions"].numpy()):
            out.append(tuple(ids) + tuple(positions))
    return out


def test_batch_shapes_and_dtypes(records):
    stats, _ = records
    batch = next(iter(dataset(stats["files"], seed=1)))
    assert set(batch) == set(pd.FEATURE_NAMES)
    expected = dict(input_ids=[5, SEQ], input_mask=[5, SEQ], segment_ids=[5, SEQ],
                    masked_lm_positions=[5, PREDICTIONS], masked_lm_ids=[5, PREDICTIONS],
                    masked_lm_weights=[5, PREDICTIONS], next_sentence_labels=[5, 1])
    for name, shape in expected.items():
        assert batch[name].shape.as_list() == shape, name
        assert batch[name].dtype == (tf.float32 if name == "masked_lm_weights" else tf.int32)
    # Static shapes (drop_remainder) for XLA and the model.
    spec = dataset(stats["files"]).element_spec
    assert spec["input_ids"].shape.as_list() == [5, SEQ]


def test_eval_reads_every_record_once(records):
    stats, _ = records
    got = rows(dataset(stats["files"], batch_size=1, is_training=False))
    expected = [tuple(ex["input_ids"]) + tuple(ex["masked_lm_positions"])
                for ex in read_examples(stats["files"])]
    assert sorted(got) == sorted(expected)


@pytest.mark.parametrize("num_files", [SHARDS, 1], ids=["by_file", "by_record"])
def test_sharding_gives_disjoint_data(records, num_files):
    stats, _ = records
    files = stats["files"][:num_files]
    everything = rows(dataset(files, batch_size=1, is_training=False))
    parts = [rows(dataset(files, batch_size=1, is_training=False, input_pipeline_id=i,
                          num_input_pipelines=2)) for i in range(2)]
    assert parts[0] and parts[1]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(everything)


def test_training_pipeline_is_seeded(records):
    stats, _ = records

    def first_batches(seed):
        return np.stack([b["input_ids"].numpy()
                         for b in dataset(stats["files"], seed=seed).take(4)])

    np.testing.assert_array_equal(first_batches(3), first_batches(3))
    assert not np.array_equal(first_batches(3), first_batches(4))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic_masking"])
def test_iterator_checkpoint_resumes_with_the_same_batch(records, tmp_path, dynamic):
    stats, _ = records
    masking = pd.MaskingSpec(vocab_size=VOCAB, mask_id=MASK, cls_id=CLS, sep_id=SEP, pad_id=PAD,
                             max_predictions_per_seq=PREDICTIONS) if dynamic else None
    iterator = iter(dataset(stats["files"], seed=5, shuffle_buffer=50, dynamic_masking=masking))
    for _ in range(3):
        next(iterator)
    checkpoint = tf.train.Checkpoint(iterator=iterator)
    path = checkpoint.save(str(tmp_path / "ckpt"))
    expected = [next(iterator) for _ in range(3)]
    checkpoint.restore(path)
    for want in expected:
        got = next(iterator)
        for name in pd.FEATURE_NAMES:
            np.testing.assert_array_equal(got[name].numpy(), want[name].numpy(), err_msg=name)


def test_dynamic_masking_remasks_and_keeps_the_original_tokens(records):
    stats, _ = records
    originals = {tuple(unmasked(ex["input_ids"], ex["masked_lm_positions"], ex["masked_lm_ids"],
                                ex["masked_lm_weights"]))
                 for ex in read_examples(stats["files"])}
    masking = pd.MaskingSpec(vocab_size=VOCAB, mask_id=MASK, cls_id=CLS, sep_id=SEP, pad_id=PAD,
                             max_predictions_per_seq=PREDICTIONS)
    # Two epochs (repeat() continues the random stream, so the second gets new masks).
    num_batches = 2 * len(originals) // 5 + 2
    seen = collections.defaultdict(set)
    replacements = collections.Counter()
    for batch in dataset(stats["files"], seed=11, dynamic_masking=masking).take(num_batches):
        b = {k: v.numpy() for k, v in batch.items()}
        for i in range(5):
            original = check_masking(b["input_ids"][i], b["input_mask"][i],
                                     b["masked_lm_positions"][i], b["masked_lm_ids"][i],
                                     b["masked_lm_weights"][i])
            assert tuple(original) in originals
            real = b["masked_lm_weights"][i] > 0
            positions = b["masked_lm_positions"][i][real]
            seen[tuple(original)].add(tuple(positions))
            for now, was in zip(b["input_ids"][i][positions], b["masked_lm_ids"][i][real]):
                replacements["mask" if now == MASK else "same" if now == was else "random"] += 1
    assert any(len(masks) > 1 for masks in seen.values())  # re-masked across epochs
    total = sum(replacements.values())
    assert 0.65 < replacements["mask"] / total < 0.92, replacements  # about 80% [MASK]


def test_apply_dynamic_masking_is_a_function_of_the_seed(records):
    stats, _ = records
    batch = next(iter(dataset(stats["files"], batch_size=8, is_training=False)))
    masking = pd.MaskingSpec(vocab_size=VOCAB, mask_id=MASK, cls_id=CLS, sep_id=SEP, pad_id=PAD,
                             masked_lm_prob=0.3, max_predictions_per_seq=PREDICTIONS)
    seed = lambda s: tf.constant([s, 0], tf.int64)  # noqa: E731
    a = pd.apply_dynamic_masking(batch, masking, seed(1))
    b = pd.apply_dynamic_masking(batch, masking, seed(1))
    c = pd.apply_dynamic_masking(batch, masking, seed(2))
    for name in pd.FEATURE_NAMES:
        np.testing.assert_array_equal(a[name].numpy(), b[name].numpy(), err_msg=name)
    assert not np.array_equal(a["masked_lm_positions"].numpy(), c["masked_lm_positions"].numpy())
    for name in ("input_mask", "segment_ids", "next_sentence_labels"):
        np.testing.assert_array_equal(a[name].numpy(), batch[name].numpy())


# ----------------------------------------------------------------------------------------------
# Start-up checks and errors.


def corrupt_copy(src, dst, how) -> str:
    data = bytearray(open(src, "rb").read())
    if how == "flip":  # a byte inside the first record's payload: its CRC no longer matches
        data[20] ^= 0xFF
    elif how == "truncate":  # the first record cut short
        data = data[:30]
    with open(dst, "wb") as f:
        f.write(bytes(data))
    return str(dst)


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_corrupt_first_record_names_the_file(records, tmp_path, how):
    stats, _ = records
    bad = corrupt_copy(stats["files"][1], tmp_path / "bad.tfrecord", how)
    with pytest.raises(pd.DataError, match=f"{bad}.*corrupt or truncated"):
        pd.check_records([stats["files"][0], bad], SEQ, PREDICTIONS)


def test_missing_glob_and_empty_file(records, tmp_path):
    stats, output_dir = records
    assert pd.resolve_input_files(f"{output_dir}/*.tfrecord,{stats['files'][0]}") == stats["files"]
    assert pd.resolve_input_files([stats["files"][2], stats["files"][0]]) == \
        [stats["files"][0], stats["files"][2]]
    with pytest.raises(pd.DataError, match="'/nowhere/\\*.tfrecord' matches no file"):
        pd.resolve_input_files([f"{output_dir}/*.tfrecord", "/nowhere/*.tfrecord"])
    empty = tmp_path / "empty.tfrecord"
    empty.write_bytes(b"")
    with pytest.raises(pd.DataError, match=f"{empty} is empty"):
        pd.resolve_input_files(str(tmp_path / "*.tfrecord"))


def test_wrong_lengths_missing_feature_and_no_records(records, tmp_path):
    stats, _ = records
    files = stats["files"]
    pd.check_records(files, SEQ, PREDICTIONS)  # the right settings pass
    with pytest.raises(pd.DataError, match=f"max_seq_length={SEQ} but --max_seq_length=64"):
        pd.check_records(files, 64, PREDICTIONS)
    with pytest.raises(pd.DataError, match=f"max_predictions_per_seq={PREDICTIONS} but "
                                           f"--max_predictions_per_seq=20"):
        pd.check_records(files, SEQ, 20)
    # A record without masked_lm_weights.
    example = tf.train.Example.FromString(next(iter(tf.data.TFRecordDataset(files[0]))).numpy())
    del example.features.feature["masked_lm_weights"]
    lacking = str(tmp_path / "lacking.tfrecord")
    with tf.io.TFRecordWriter(lacking) as writer:
        writer.write(example.SerializeToString())
    with pytest.raises(pd.DataError, match=f"{lacking}: the first record lacks the feature "
                                           f"'masked_lm_weights'"):
        pd.check_records([lacking], SEQ, PREDICTIONS)
    # A file with a valid header but no records cannot be made; a non-TFRecord can.
    garbage = tmp_path / "garbage.tfrecord"
    garbage.write_bytes(b"not a tfrecord file at all, just text\n")
    with pytest.raises(pd.DataError, match=str(garbage)):
        pd.check_records([str(garbage)], SEQ, PREDICTIONS)


def test_vocab_mismatch(records):
    stats, _ = records
    pd.check_token_ids(stats["files"], VOCAB)
    with pytest.raises(pd.DataError, match="tokenizer/model vocabulary mismatch"):
        pd.check_token_ids(stats["files"], 10)


def test_corrupt_record_deep_in_a_file(records, tmp_path, capsys):
    stats, _ = records
    good = stats["files"][0]
    num_records = sum(1 for _ in tf.data.TFRecordDataset(good))
    bad = str(tmp_path / "deep.tfrecord")
    data = bytearray(open(good, "rb").read())
    data[-10] ^= 0xFF  # inside the last record
    open(bad, "wb").write(bytes(data))
    pd.check_records([bad], SEQ, PREDICTIONS)  # the first record is fine: not seen at start-up
    with pytest.raises(tf.errors.DataLossError) as info:
        for _ in dataset([bad], batch_size=1, is_training=False):
            pass
    message = pd.describe_data_error(info.value, [good, bad])
    assert f"{bad}, record {num_records - 1} (counting from 0): corrupt or truncated" in message
    assert "--check_all=" in message and "python -m" in message
    # The scan finds it.
    assert pd.scan_file(good) == pd.ScanResult(good, num_records)
    assert pd.scan_file(bad) == pd.ScanResult(bad, num_records - 1, num_records - 1,
                                              pd.scan_file(bad).reason, "corrupt")
    assert pd.check_all(f"{good},{bad}") == 1
    out = capsys.readouterr().out
    assert f"ok   {good}: {num_records} records" in out
    assert f"BAD  {bad}: record {num_records - 1}: corrupt or truncated" in out


# A file whose first 49 records are fine and whose 50th is not (index 49, counting from 0).
BAD_INDEX = 49


def bad_record(serialized: bytes, defect: str) -> bytes:
    """A copy of a record with a defect: "longer" (made with max_seq_length SEQ + 8, as in a
    shard of other settings) or "missing_feature" (no masked_lm_weights)."""
    example = tf.train.Example.FromString(serialized)
    feature = example.features.feature
    if defect == "longer":
        for name in ("input_ids", "input_mask", "segment_ids"):
            feature[name].int64_list.value.extend([0] * 8)
    else:
        del feature["masked_lm_weights"]
    return example.SerializeToString()


def write_with_bad_records(path, files, defect, num_bad=1, num_records=60) -> str:
    """Writes good records of `files` (cycled), with records BAD_INDEX .. BAD_INDEX + num_bad - 1
    made bad (see `bad_record`)."""
    good = [r.numpy() for r in tf.data.TFRecordDataset(files)]
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i in range(num_records):
            record = good[i % len(good)]
            if BAD_INDEX <= i < BAD_INDEX + num_bad:
                record = bad_record(record, defect)
            writer.write(record)
    return str(path)


@pytest.mark.parametrize("is_training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("defect", ["longer", "missing_feature"])
def test_bad_record_deep_in_a_file_is_named(records, tmp_path, defect, is_training):
    stats, _ = records
    bad = write_with_bad_records(tmp_path / "mixed.tfrecord", stats["files"], defect)
    pd.check_records([bad], SEQ, PREDICTIONS)  # the first record is fine: not seen at start-up
    # What the trainer catches around next(iterator).
    with pytest.raises((tf.errors.DataLossError, tf.errors.InvalidArgumentError)) as info:
        for _ in dataset([bad], is_training=is_training, seed=1, shuffle_buffer=10).take(100):
            pass
    # The trainer passes --input_files: patterns, and good files that are scanned first.
    message = pd.describe_data_error(info.value, [stats["files"][0],
                                                  str(tmp_path / "*.tfrecord")])
    assert f"{bad}, record {BAD_INDEX} (counting from 0): " in message
    if defect == "longer":
        assert (f"feature 'input_ids' has {SEQ + 8} values, expected {SEQ} "
                f"(max_seq_length={SEQ})") in message
        assert "--max_seq_length" in message
    else:
        assert "lacks the feature 'masked_lm_weights'" in message
    assert f"--check_all={stats['files'][0]},{tmp_path}/*.tfrecord" in message.replace("'", "")


def test_check_all_and_the_scanner_find_the_first_bad_record(records, tmp_path, capsys):
    stats, _ = records
    good = stats["files"][0]
    longer = write_with_bad_records(tmp_path / "longer.tfrecord", stats["files"], "longer",
                                    num_bad=3)
    result = pd.scan_file(longer, pd.RecordShape(SEQ, PREDICTIONS), batch_size=16)
    assert (result.num_good, result.bad_index, result.kind) == (BAD_INDEX, BAD_INDEX,
                                                                "wrong_length")
    # Without lengths, the file's first record sets them.
    assert pd.scan_file(longer, batch_size=7) == result
    assert pd.find_bad_record([good, longer]) == result
    assert pd.find_bad_record([good]) is None
    assert pd.check_all(f"{good},{longer}") == 1
    out = capsys.readouterr().out
    assert f"expecting max_seq_length={SEQ}, max_predictions_per_seq={PREDICTIONS}" in out
    assert f"BAD  {longer}: record {BAD_INDEX}: feature 'input_ids' has {SEQ + 8} values" in out
    # Lengths given (the CLI's --max_seq_length / --max_predictions_per_seq): all bad.
    assert pd.check_all(good, pd.RecordShape(SEQ + 1, PREDICTIONS)) == 1
    assert f"BAD  {good}: record 0: feature 'input_ids' has {SEQ} values" in \
        capsys.readouterr().out


def test_run_stops_with_a_clear_error_on_a_bad_record_deep_in_a_file(records, tokenizer,
                                                                     tmp_path):
    """Needs the trainer's `_next_batch` to catch (tf.errors.DataLossError,
    tf.errors.InvalidArgumentError) and raise DataError(describe_data_error(e, input_files))."""
    stats, _ = records
    # As if a shard of --max_seq_length=SEQ + 8 had been appended to one of SEQ.
    mixed = write_with_bad_records(tmp_path / "mixed.tfrecord", stats["files"], "longer",
                                   num_bad=20, num_records=BAD_INDEX + 20)
    # Records in file order (one reader, no shuffling): step 13 reaches record 49.
    result = run_tfbert(f"--output_dir={tmp_path / 'out'}", f"--input_files={mixed}",
                        f"--vocab_file={tokenizer.files[0]}", f"--max_seq_length={SEQ}",
                        f"--max_predictions_per_seq={PREDICTIONS}", "--train_batch_size=4",
                        "--num_readers=1", "--shuffle_buffer=1", "--num_train_steps=30",
                        "--log_every_n_steps=1")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "tfbert: error:" in result.stderr
    assert f"{mixed}, record {BAD_INDEX} (counting from 0): feature 'input_ids' has " \
           f"{SEQ + 8} values, expected {SEQ}" in result.stderr


def test_create_pretraining_data_cli(corpus, tokenizer, tmp_path):
    command = [sys.executable, "-m", "tfbert.data.create_pretraining_data",
               f"--vocab_file={tokenizer.files[0]}", "--tokenizer_type=sentencepiece",
               f"--output_dir={tmp_path / 'out'}", f"--max_seq_length={SEQ}",
               f"--max_predictions_per_seq={PREDICTIONS}", "--num_shards=2", "--dupe_factor=1"]
    missing = subprocess.run(command + [f"--input_files={corpus},/nowhere/*.txt"],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "'/nowhere/*.txt' matches no file" in missing.stderr
    done = subprocess.run(command + [f"--input_files={os.path.dirname(corpus)}/*.txt",
                                     "--num_workers=2", "--worker_index=1",
                                     "--documents_per_chunk=9"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "worker 1 of 2:" in done.stdout
    files = pd.resolve_input_files(str(tmp_path / "out" / "*.tfrecord"))
    assert [os.path.basename(f) for f in files] == [
        f"pretrain-w00001-of-00002-0000{i}-of-00002.tfrecord" for i in range(2)]
    with open(tmp_path / "out" / "metadata-w00001-of-00002.json") as f:
        metadata = json.load(f)
    assert (metadata["worker_index"], metadata["num_workers"]) == (1, 2)
    assert metadata["documents_per_chunk"] == 9
    pd.check_records(files, SEQ, PREDICTIONS)
    shutil.rmtree(tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# Streaming, workers and atomic shards.


def create(files, output_dir, tokenizer, **kwargs):
    """Small, quick records: one pass, no short sequences."""
    kwargs = dict(dict(max_seq_length=SEQ, max_predictions_per_seq=PREDICTIONS, dupe_factor=1,
                       short_seq_prob=0.0, random_seed=5), **kwargs)
    return create_pretraining_data(files, str(output_dir), tokenizer, **kwargs)


def segment_a_sources(files, documents, tokenizer) -> list[set[int]]:
    """For each record of `files`, the indices of the `documents` its segment A (unmasked)
    is a contiguous piece of. Segment A always comes from the document being turned into
    instances (only B may come from another), so this tells where a record came from."""
    texts = [",".join(map(str, tokenizer.convert_tokens_to_ids(
        [token for sentence in document for token in sentence]))) for document in documents]
    sources = []
    for ex in read_examples(files):
        original = unmasked(ex["input_ids"], ex["masked_lm_positions"], ex["masked_lm_ids"],
                            ex["masked_lm_weights"])
        first_sep = int(np.flatnonzero(original == SEP)[0])
        segment_a = ",".join(map(str, original[1:first_sep]))
        sources.append({i for i, text in enumerate(texts) if f",{segment_a}," in f",{text},"})
    return sources


def document_keys(documents) -> list[tuple]:
    return [tuple(tuple(sentence) for sentence in document) for document in documents]


@pytest.mark.parametrize("num_files", [1, 4], ids=["by_document", "by_file"])
def test_workers_take_disjoint_shares_that_cover_the_corpus(corpus, tokenizer, tmp_path,
                                                            num_files):
    if num_files == 1:  # fewer files than workers: documents 0, 2, 4, ... and 1, 3, 5, ...
        files = [corpus]
    else:  # files 0 and 2, files 1 and 3
        files = [write_corpus(tmp_path / f"part{i}.txt", num_documents=7, seed=i)
                 for i in range(num_files)]
    one = create(files, tmp_path / "one", tokenizer, documents_per_chunk=6)
    parts = [create(files, tmp_path / "two", tokenizer, documents_per_chunk=6, worker_index=i,
                    num_workers=2) for i in range(2)]

    # Documents: disjoint shares which, together, hold every document once.
    everything = document_keys(read_documents(files, tokenizer))
    shares = [list(read_documents(files, tokenizer, i, 2)) for i in range(2)]
    assert shares[0] and shares[1]
    assert not set(document_keys(shares[0])) & set(document_keys(shares[1]))
    assert sorted(document_keys(shares[0]) + document_keys(shares[1])) == sorted(everything)
    for key in ("num_documents", "num_sentences", "num_tokens"):
        assert parts[0][key] + parts[1][key] == one[key], key

    # Records: each worker's come from its own documents, and use every one of them.
    for share, stats in zip(shares, parts):
        sources = segment_a_sources(stats["files"], share, tokenizer)
        assert len(sources) == stats["num_instances"] and all(sources)
        assert set().union(*sources) == set(range(len(share)))

    # Files: per-worker names and metadata, no temporary file; one glob reads the union.
    listing = sorted(os.listdir(tmp_path / "two"))
    assert listing == sorted([os.path.basename(f) for stats in parts for f in stats["files"]] +
                             ["metadata-w00000-of-00002.json", "metadata-w00001-of-00002.json"])
    seeds = set()
    for i, stats in enumerate(parts):
        with open(stats["metadata_file"]) as f:
            metadata = json.load(f)
        assert (metadata["worker_index"], metadata["num_workers"]) == (i, 2)
        assert metadata["num_instances"] == stats["num_instances"]
        assert metadata["files"] == [os.path.basename(f) for f in stats["files"]]
        seeds.add(metadata["worker_seed"])
    assert len(seeds) == 2
    union = pd.resolve_input_files(str(tmp_path / "two" / "*.tfrecord"))
    pd.check_records(union, SEQ, PREDICTIONS)
    assert len(rows(dataset(union, batch_size=1, is_training=False))) == \
        parts[0]["num_instances"] + parts[1]["num_instances"]


def test_streaming_in_chunks_uses_every_document(corpus, tokenizer, tmp_path, monkeypatch):
    # Tokenize a few lines at a time, and record how much was read when each chunk is used.
    monkeypatch.setattr(cpd, "_TOKENIZE_CHUNK", 10)
    tokenized, chunk_sizes, read_so_far = [0], [], []
    real_tokenize, real_create_instances = cpd._tokenize, cpd.create_instances

    def tokenize(documents, tokenizer):
        out = real_tokenize(documents, tokenizer)
        tokenized[0] += len(out)
        return out

    def create_instances(documents, *args, **kwargs):
        chunk_sizes.append(len(documents))
        read_so_far.append(tokenized[0])
        return real_create_instances(documents, *args, **kwargs)

    monkeypatch.setattr(cpd, "_tokenize", tokenize)
    monkeypatch.setattr(cpd, "create_instances", create_instances)
    stats = create([corpus], tmp_path, tokenizer, documents_per_chunk=7, num_shards=2)
    documents = list(read_documents([corpus], tokenizer))
    assert len(documents) == stats["num_documents"] == 40
    assert chunk_sizes == [7] * 5 + [5]
    # A stream: the first chunk was turned into instances before most of the corpus was read.
    assert read_so_far[0] < 20 and read_so_far[-1] == 40
    sources = segment_a_sources(stats["files"], documents, tokenizer)
    assert len(sources) == stats["num_instances"] and all(sources)
    assert set().union(*sources) == set(range(40))  # every document was used


def test_failed_write_leaves_no_shard_and_stale_temp_files_are_skipped(corpus, tokenizer,
                                                                       tmp_path, monkeypatch):
    real_writer = tf.io.TFRecordWriter
    written = [0]

    class FailingWriter:
        """A TFRecordWriter whose disk fills up after 10 records."""

        def __init__(self, path):
            self._writer = real_writer(path)

        def write(self, record):
            written[0] += 1
            if written[0] > 10:
                raise OSError("No space left on device (simulated)")
            self._writer.write(record)

        def close(self):
            self._writer.close()

    out = tmp_path / "out"
    monkeypatch.setattr(tf.io, "TFRecordWriter", FailingWriter)
    with pytest.raises(OSError, match="simulated"):
        create([corpus], out, tokenizer, num_shards=2)
    assert os.listdir(out) == []  # neither a shard of its final name nor a temporary file
    monkeypatch.undo()

    stats = create([corpus], out, tokenizer, num_shards=2)
    assert sorted(os.listdir(out)) == sorted(
        [os.path.basename(f) for f in stats["files"]] + ["metadata.json"])
    # What a killed job leaves: a partial shard under its temporary name. Training skips it.
    stale = f"{stats['files'][0]}.tmp-4242"
    with open(stale, "wb") as f:
        f.write(open(stats["files"][0], "rb").read()[:100])
    assert pd.resolve_input_files(str(out / "*.tfrecord")) == stats["files"]
    assert pd.resolve_input_files(str(out / "pretrain-*")) == stats["files"]
