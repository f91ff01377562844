"""create_pretraining_data's records and the tf.data reader: layout, sharding, checks,
checkpointing and dynamic masking."""

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

from test_tokenization import write_corpus
from tfbert import tokenization
from tfbert.data import pretraining_dataset as pd
from tfbert.data.create_pretraining_data import create_pretraining_data

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
    with pytest.raises(pd.DataError, match=f"{lacking}: records lack the feature "
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
    bad = str(tmp_path / "deep.tfrecord")
    data = bytearray(open(good, "rb").read())
    data[-10] ^= 0xFF  # inside the last record
    open(bad, "wb").write(bytes(data))
    pd.check_records([bad], SEQ, PREDICTIONS)  # the first record is fine: not seen at start-up
    with pytest.raises(tf.errors.DataLossError) as info:
        for _ in dataset([bad], batch_size=1, is_training=False):
            pass
    message = pd.describe_data_error(info.value, [good, bad])
    assert bad in message and "--check_all=" in message and "python -m" in message
    # The scan finds it.
    assert pd.scan_records(good)[1] is None and pd.scan_records(good)[0] > 0
    assert pd.check_all(f"{good},{bad}") == 1
    out = capsys.readouterr().out
    assert f"ok   {good}" in out and f"BAD  {bad}" in out


def test_create_pretraining_data_cli(corpus, tokenizer, tmp_path):
    command = [sys.executable, "-m", "tfbert.data.create_pretraining_data",
               f"--vocab_file={tokenizer.files[0]}", "--tokenizer_type=sentencepiece",
               f"--output_dir={tmp_path / 'out'}", f"--max_seq_length={SEQ}",
               f"--max_predictions_per_seq={PREDICTIONS}", "--num_shards=2", "--dupe_factor=1"]
    missing = subprocess.run(command + [f"--input_files={corpus},/nowhere/*.txt"],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "'/nowhere/*.txt' matches no file" in missing.stderr
    done = subprocess.run(command + [f"--input_files={os.path.dirname(corpus)}/*.txt"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    files = pd.resolve_input_files(str(tmp_path / "out" / "*.tfrecord"))
    assert len(files) == 2
    pd.check_records(files, SEQ, PREDICTIONS)
    shutil.rmtree(tmp_path / "out")
