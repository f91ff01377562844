"""Fine-tuning tables in, batches of features out.

A table is a TSV, CSV or JSON-lines file (by its extension: .tsv/.txt, .csv, .jsonl/.json) read
with pandas, one example per row, with a header naming its columns:

    text      the text (configurable: --text_column)
    text_b    the second text of a sentence pair, when the table has this column (--text_b_column)
    label     a class name (classification; any string or number) or a number (regression)
              (--label_column; a table to predict needs none)

Token classification (NER) reads words and one tag per word: `text` holds the words (a JSON
list, or a string split at whitespace) and `label` the tags (a list, or a string of
space-separated tags). Each word is tokenised alone; its tag goes to its first sub-token, and the
other sub-tokens (and [CLS], [SEP], padding) get the label -1, which the loss and the metrics
skip. Words past `max_seq_length` are cut (and counted in the log).

Texts are tokenised with the model's own tokenizer and laid out as BERT's input, [CLS] a [SEP]
or [CLS] a [SEP] b [SEP], truncated to `max_seq_length` (a pair loses tokens from its longer
text first, as google-research/bert does) and padded. Every problem (a missing file, column or
value, an unknown label, a text that tokenises to nothing) is a `DataError` naming the file and
the row.
"""

from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np
import pandas as pd
import tensorflow as tf
from absl import logging

from tfbert.data.pretraining_dataset import DataError

FORMATS = {".tsv": "tsv", ".txt": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


@dataclasses.dataclass(frozen=True)
class Columns:
    """The names of a table's columns."""

    text: str = "text"
    text_b: str = "text_b"
    label: str = "label"


def read_table(path: str, what: str = "table") -> pd.DataFrame:
    """The rows of a TSV, CSV or JSON-lines file, every value as read (TSV/CSV: strings).

    what: the flag that named the file, for messages ("--train_file").
    """
    if not os.path.isfile(path):
        raise DataError(f"{what}={path} does not exist")
    extension = os.path.splitext(path)[1].lower()
    if extension not in FORMATS:
        raise DataError(f"{what}={path}: unknown table format {extension!r}; tfbert reads "
                        f"{sorted(FORMATS)} (TSV, CSV, JSON lines)")
    fmt = FORMATS[extension]
    try:
        if fmt == "jsonl":
            table = pd.read_json(path, lines=True, dtype=False)
        else:
            # Strings as written: no "NA" turned into NaN, no quoting inside TSV (texts carry
            # quotes; GLUE's TSVs are read the same way).
            table = pd.read_csv(path, sep="\t" if fmt == "tsv" else ",", dtype=str,
                                keep_default_na=False,
                                quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL)
    except pd.errors.EmptyDataError:
        raise DataError(f"{what}={path} is empty") from None
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{what}={path} cannot be read as {fmt.upper()}: {e}") from None
    if len(table) == 0:
        raise DataError(f"{what}={path} has a header but no rows")
    return table


def _row(path: str, index: int) -> str:
    """How a message names a row: its number among the data rows, from 1."""
    return f"{path}, row {index + 1}"


def _texts(table: pd.DataFrame, column: str, path: str, what: str) -> list[str]:
    if column not in table.columns:
        raise DataError(f"{what}={path} has no column {column!r} (its columns: "
                        f"{list(table.columns)}); name the text column with --text_column")
    texts = table[column].tolist()
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{_row(path, index)}: {column!r} is {text!r}, not a text")
    return texts


def label_names(table: pd.DataFrame, path: str, column: str,
                task: str = "classification") -> tuple[str, ...]:
    """The class names (token classification: tags) of a training table, in id order:
    numerically if every label is an integer (so 0/1 keep their ids), else alphabetically."""
    labels = _labels(table, path, column)
    if task == "token_classification":
        values = [tag for i, v in enumerate(labels) for tag in _words(v, path, i, column, "tag")]
    else:
        values = [_label_text(v, path, i, column) for i, v in enumerate(labels)]
    names = sorted(set(values))
    try:
        names = sorted(names, key=int)
    except ValueError:
        pass
    return tuple(names)


def _labels(table: pd.DataFrame, path: str, column: str) -> list:
    if column not in table.columns:
        raise DataError(f"{path} has no label column {column!r} (its columns: "
                        f"{list(table.columns)}); name it with --label_column")
    return table[column].tolist()


def _label_text(value, path: str, index: int, column: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
        raise DataError(f"{_row(path, index)}: the label ({column!r}) is missing")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON 1.0 and 1 are the same class
    return str(value).strip()


def encode_labels(table: pd.DataFrame, path: str, column: str, task: str,
                  names: tuple[str, ...] = ()) -> np.ndarray:
    """Classification: int32 class ids [N] by `names`; regression: float32 targets [N]."""
    values = _labels(table, path, column)
    if task == "regression":
        targets = []
        for index, value in enumerate(values):
            try:
                target = float(_label_text(value, path, index, column))
            except ValueError:
                raise DataError(f"{_row(path, index)}: the label {value!r} is not a number "
                                f"(--task=regression)") from None
            if not np.isfinite(target):
                raise DataError(f"{_row(path, index)}: the label {value!r} is not finite")
            targets.append(target)
        return np.asarray(targets, np.float32)
    ids = {name: i for i, name in enumerate(names)}
    encoded = []
    for index, value in enumerate(values):
        name = _label_text(value, path, index, column)
        if name not in ids:
            raise DataError(f"{_row(path, index)}: label {name!r} is not one of the training "
                            f"table's labels {list(names)}")
        encoded.append(ids[name])
    return np.asarray(encoded, np.int32)


def _words(value, path: str, index: int, column: str, what: str = "word") -> list[str]:
    """A row's words (or tags): a JSON list, or a string split at whitespace."""
    if isinstance(value, (list, tuple)):
        words = [str(w) for w in value]
    elif isinstance(value, str):
        words = value.split()
    else:
        raise DataError(f"{_row(path, index)}: {column!r} is {value!r}, not a list of {what}s")
    if not words or any(not w.strip() for w in words):
        raise DataError(f"{_row(path, index)}: {column!r} has an empty {what}: {value!r}")
    return words


def encode_words(table: pd.DataFrame, path: str, tokenizer, max_seq_length: int,
                 columns: Columns = Columns(), tags: tuple[str, ...] = (), what: str = "table",
                 with_labels: bool = True) -> dict[str, np.ndarray]:
    """Token classification: input_ids, input_mask, segment_ids, "word_start" (1 at each word's
    first sub-token) and (with labels) "label", the tag id of each word's first sub-token and
    -1 elsewhere, all int32 [N, max_seq_length]."""
    if columns.text not in table.columns:
        raise DataError(f"{what}={path} has no column {columns.text!r} (its columns: "
                        f"{list(table.columns)}); name the words' column with --text_column")
    rows = [_words(v, path, i, columns.text) for i, v in enumerate(table[columns.text])]
    tag_rows = None
    if with_labels:
        tag_ids = {name: i for i, name in enumerate(tags)}
        tag_rows = []
        for index, value in enumerate(_labels(table, path, columns.label)):
            row_tags = _words(value, path, index, columns.label, "tag")
            if len(row_tags) != len(rows[index]):
                raise DataError(f"{_row(path, index)}: {len(rows[index])} words but "
                                f"{len(row_tags)} tags")
            unknown = [t for t in row_tags if t not in tag_ids]
            if unknown:
                raise DataError(f"{_row(path, index)}: tag {unknown[0]!r} is not one of the "
                                f"training table's tags {list(tags)}")
            tag_rows.append([tag_ids[t] for t in row_tags])
    special = tokenizer.special_ids
    unk = special["unk"]
    # Every word of the table tokenised in one call.
    pieces = iter(tokenizer.tokenize_batch([word for row in rows for word in row]))
    count = len(rows)
    features = {name: np.full([count, max_seq_length], special["pad"] if name == "input_ids"
                              else -1 if name == "label" else 0, np.int32)
                for name in ("input_ids", "input_mask", "segment_ids", "word_start")
                + (("label",) if with_labels else ())}
    cut = 0
    for index, words in enumerate(rows):
        ids, labels = [special["cls"]], [-1]
        for position, word in enumerate(words):
            # A word that tokenises to nothing (a lone control character) still holds its tag.
            word_ids = tokenizer.convert_tokens_to_ids(next(pieces)) or [unk]
            if len(ids) + len(word_ids) > max_seq_length - 1:
                cut += len(words) - position
                for _ in words[position + 1:]:
                    next(pieces)
                break
            features["word_start"][index, len(ids)] = 1
            ids += word_ids
            if with_labels:
                labels += [tag_rows[index][position]] + [-1] * (len(word_ids) - 1)
        ids.append(special["sep"])
        features["input_ids"][index, :len(ids)] = ids
        features["input_mask"][index, :len(ids)] = 1
        if with_labels:
            features["label"][index, :len(labels)] = labels
    if cut:
        logging.warning("%s: %d words past --max_seq_length=%d were cut (not trained on, not "
                        "scored)", path, cut, max_seq_length)
    return features


def _truncate_pair(a: list[int], b: list[int], max_length: int) -> None:
    """Drops tokens from the end of the longer text until the pair fits (in place)."""
    while len(a) + len(b) > max_length:
        (a if len(a) >= len(b) else b).pop()


def encode_texts(table: pd.DataFrame, path: str, tokenizer, max_seq_length: int,
                 columns: Columns = Columns(), what: str = "table") -> dict[str, np.ndarray]:
    """input_ids, input_mask, segment_ids: int32 [N, max_seq_length]."""
    texts_a = _texts(table, columns.text, path, what)
    texts_b = (_texts(table, columns.text_b, path, what) if columns.text_b in table.columns
               else None)
    special = tokenizer.special_ids
    cls, sep, pad = special["cls"], special["sep"], special["pad"]
    ids_a = [tokenizer.convert_tokens_to_ids(p) for p in tokenizer.tokenize_batch(texts_a)]
    ids_b = ([tokenizer.convert_tokens_to_ids(p) for p in tokenizer.tokenize_batch(texts_b)]
             if texts_b is not None else None)
    count = len(texts_a)
    features = {name: np.full([count, max_seq_length], pad if name == "input_ids" else 0, np.int32)
                for name in ("input_ids", "input_mask", "segment_ids")}
    for index in range(count):
        a = ids_a[index]
        b = ids_b[index] if ids_b is not None else None
        for column, ids in ((columns.text, a), (columns.text_b, b)):
            if ids is not None and not ids:
                raise DataError(f"{_row(path, index)}: {column!r} "
                                f"{table[column].iloc[index]!r} tokenises to nothing")
        if b is None:
            a = a[:max_seq_length - 2]
            tokens, segments = [cls] + a + [sep], [0] * (len(a) + 2)
        else:
            _truncate_pair(a, b, max_seq_length - 3)
            tokens = [cls] + a + [sep] + b + [sep]
            segments = [0] * (len(a) + 2) + [1] * (len(b) + 1)
        features["input_ids"][index, :len(tokens)] = tokens
        features["input_mask"][index, :len(tokens)] = 1
        features["segment_ids"][index, :len(tokens)] = segments
    return features


def load_examples(path: str, tokenizer, max_seq_length: int, task: str,
                  columns: Columns = Columns(), labels: tuple[str, ...] = (),
                  what: str = "table", with_labels: bool = True) -> dict[str, np.ndarray]:
    """A table's features, plus "label" (int32 class ids or float32 targets; token
    classification: tag ids per token) `with_labels`."""
    table = read_table(path, what)
    if task == "token_classification":
        return encode_words(table, path, tokenizer, max_seq_length, columns, labels, what,
                            with_labels)
    features = encode_texts(table, path, tokenizer, max_seq_length, columns, what)
    if with_labels:
        features["label"] = encode_labels(table, path, columns.label, task, labels)
    return features


def finetuning_dataset(features: dict[str, np.ndarray], batch_size: int, seed: int,
                       input_pipeline_id: int = 0, num_input_pipelines: int = 1
                       ) -> tf.data.Dataset:
    """Endless training batches of this rank's share of the examples (examples i with
    i % num_input_pipelines == input_pipeline_id), reshuffled every epoch."""
    dataset = tf.data.Dataset.from_tensor_slices(features)
    dataset = dataset.shard(num_input_pipelines, input_pipeline_id)
    count = (len(features["input_ids"]) - input_pipeline_id + num_input_pipelines - 1) \
        // num_input_pipelines
    if count == 0:
        raise DataError(f"{len(features['input_ids'])} training examples leave none for rank "
                        f"{input_pipeline_id} of {num_input_pipelines}")
    dataset = dataset.shuffle(min(count, 100_000), seed=seed, reshuffle_each_iteration=True)
    return dataset.repeat().batch(batch_size, drop_remainder=True)
