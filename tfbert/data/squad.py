"""SQuAD v1.1 / v2.0 question answering: JSON in, windows of features out, answers back.

    {"version": "v2.0", "data": [{"title": ..., "paragraphs": [{"context": "...",
      "qas": [{"id": "q1", "question": "...", "answers": [{"text": "...", "answer_start": 17}],
               "is_impossible": false}]}]}]}

The context is split into words at whitespace and each word tokenised alone, so every token
maps back to a word of the original text. A context longer than the room the question leaves
(`max_seq_length` - question - 3) is covered by windows `doc_stride` tokens apart, each
`[CLS] question [SEP] window [SEP]`. Training labels each window with the answer's first and last
token, or with [CLS] (position 0) when the answer is not inside it or the question has none
(v2.0). Prediction (`best_answers`) scores every start/end pair of each window, keeps spans of
at most `max_answer_length` tokens whose start lies in the window where that token has the
most context, and joins the original words of the best span; in v2.0 the empty answer wins
when its score ([CLS] start + [CLS] end, the lowest over the windows) beats the best span's by
more than `null_score_diff_threshold`. `official.nlp.tools.squad_evaluate_v1_1` / `v2_0` then
compute exact match and F1 as the official scripts do.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from tfbert.data.pretraining_dataset import DataError


@dataclasses.dataclass
class SquadExample:
    """One question. `start_word` / `end_word` index `words` (the first answer's span); -1 for
    an unanswerable question or one without answers (prediction data)."""

    id: str
    question: str
    words: list[str]
    answers: list[str]
    start_word: int = -1
    end_word: int = -1
    is_impossible: bool = False


def _word_spans(context: str) -> tuple[list[str], list[int]]:
    """The context's whitespace-separated words and, for every character, its word's index."""
    words, char_to_word, previous_space = [], [], True
    for char in context:
        if char.isspace():
            previous_space = True
        else:
            if previous_space:
                words.append(char)
            else:
                words[-1] += char
            previous_space = False
        char_to_word.append(max(len(words) - 1, 0))
    return words, char_to_word


def read_squad(path: str, what: str = "--train_file", with_answers: bool = True
               ) -> tuple[list, list[SquadExample], bool]:
    """(the file's "data" list for the official evaluation, the examples, whether it is
    v2.0-style: some question is_impossible)."""
    if not os.path.isfile(path):
        raise DataError(f"{what}={path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)["data"]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{what}={path} is not JSON: {e}") from None
    except (KeyError, TypeError):
        raise DataError(f"{what}={path} has no \"data\" list (SQuAD's layout)") from None
    examples, version_2 = [], False
    for article in data:
        for paragraph in article.get("paragraphs", []):
            words, char_to_word = _word_spans(paragraph.get("context", ""))
            for qa in paragraph.get("qas", []):
                qid = qa.get("id")
                where = f"{path}, question {qid!r}"
                if not qid or not qa.get("question", "").strip():
                    raise DataError(f"{where}: a question needs an \"id\" and a \"question\"")
                if not words:
                    raise DataError(f"{where}: the context is empty")
                impossible = bool(qa.get("is_impossible", False))
                version_2 |= impossible
                answers = qa.get("answers", [])
                example = SquadExample(qid, qa["question"], words,
                                       [a.get("text", "") for a in answers],
                                       is_impossible=impossible)
                if with_answers and not impossible:
                    if not answers:
                        raise DataError(f"{where}: no answers, and not is_impossible")
                    first = answers[0]
                    text, start = first.get("text", ""), first.get("answer_start", -1)
                    context = paragraph["context"]
                    if not text.strip() or context[start:start + len(text)] != text:
                        raise DataError(f"{where}: the answer {text!r} is not at answer_start "
                                        f"{start} of the context")
                    example.start_word = char_to_word[start]
                    example.end_word = char_to_word[start + len(text) - 1]
                examples.append(example)
    if not examples:
        raise DataError(f"{what}={path} holds no questions")
    return data, examples, version_2


def _max_context(windows: list[tuple[int, int]], window: int, position: int) -> bool:
    """Whether doc token `position` has its most context (fewest tokens missing on its
    shorter side) in window `window` of `windows` ((start, length) pairs), as google does."""
    best_score, best = None, None
    for index, (start, length) in enumerate(windows):
        end = start + length - 1
        if not start <= position <= end:
            continue
        score = min(position - start, end - position) + 0.01 * length
        if best_score is None or score > best_score:
            best_score, best = score, index
    return best == window


def squad_features(examples: list[SquadExample], tokenizer, max_seq_length: int,
                   doc_stride: int, max_query_length: int) -> dict[str, np.ndarray]:
    """The windows of every example.

    Returns int32 arrays, one row per window: input_ids, input_mask, segment_ids [W, S];
    start_position, end_position [W] (0: no answer in the window); example_index [W];
    token_to_word [W, S] (the context word of each token, -1 outside the context) and
    max_context [W, S] (1 where the token has its most context in this window).
    """
    special = tokenizer.special_ids
    cls, sep, pad = special["cls"], special["sep"], special["pad"]
    questions = tokenizer.tokenize_batch([e.question for e in examples])
    all_words = [w for e in examples for w in e.words]
    word_pieces = iter(tokenizer.tokenize_batch(all_words))
    rows = {name: [] for name in ("input_ids", "input_mask", "segment_ids", "start_position",
                                  "end_position", "example_index", "token_to_word",
                                  "max_context")}
    for index, example in enumerate(examples):
        query = tokenizer.convert_tokens_to_ids(questions[index])[:max_query_length]
        doc, token_word, word_first = [], [], []
        for word_index in range(len(example.words)):
            word_first.append(len(doc))
            ids = tokenizer.convert_tokens_to_ids(next(word_pieces)) or [special["unk"]]
            doc += ids
            token_word += [word_index] * len(ids)
        room = max_seq_length - len(query) - 3
        if room < 1:
            raise DataError(f"question {example.id!r}: --max_seq_length={max_seq_length} leaves "
                            f"no room for the context after a {len(query)}-token question")
        answer = None
        if example.start_word >= 0:
            last = (word_first[example.end_word + 1] - 1 if example.end_word + 1 < len(word_first)
                    else len(doc) - 1)
            answer = (word_first[example.start_word], last)
        windows, start = [], 0
        while True:
            length = min(len(doc) - start, room)
            windows.append((start, length))
            if start + length >= len(doc):
                break
            start += min(length, doc_stride)
        offset = len(query) + 2  # [CLS] question [SEP]
        for window, (start, length) in enumerate(windows):
            ids = [cls] + query + [sep] + doc[start:start + length] + [sep]
            padding = max_seq_length - len(ids)
            rows["input_ids"].append(ids + [pad] * padding)
            rows["input_mask"].append([1] * len(ids) + [0] * padding)
            rows["segment_ids"].append([0] * offset + [1] * (length + 1) + [0] * padding)
            words = [-1] * offset + token_word[start:start + length] + [-1] * (padding + 1)
            rows["token_to_word"].append(words)
            rows["max_context"].append(
                [0] * offset + [int(_max_context(windows, window, p))
                                for p in range(start, start + length)] + [0] * (padding + 1))
            inside = answer is not None and start <= answer[0] and answer[1] < start + length
            rows["start_position"].append(answer[0] - start + offset if inside else 0)
            rows["end_position"].append(answer[1] - start + offset if inside else 0)
            rows["example_index"].append(index)
    return {name: np.asarray(values, np.int32) for name, values in rows.items()}


def best_answers(examples: list[SquadExample], features: dict[str, np.ndarray],
                 start_logits: np.ndarray, end_logits: np.ndarray, *, n_best: int = 20,
                 max_answer_length: int = 30, version_2: bool = False,
                 null_score_diff_threshold: float = 0.0) -> dict[str, str]:
    """{question id: answer text} from the windows' logits (float [W, S] each)."""
    best = {}  # example index -> (score, start word, end word)
    null = {}  # example index -> lowest [CLS] score over its windows
    for window, example_index in enumerate(features["example_index"]):
        start, end = start_logits[window], end_logits[window]
        words = features["token_to_word"][window]
        max_context = features["max_context"][window]
        null_score = start[0] + end[0]
        null[example_index] = min(null.get(example_index, np.inf), null_score)
        starts = np.argsort(start)[::-1][:n_best]
        ends = np.argsort(end)[::-1][:n_best]
        for s in starts:
            if words[s] < 0 or not max_context[s]:
                continue
            for e in ends:
                if words[e] < 0 or e < s or e - s + 1 > max_answer_length:
                    continue
                score = start[s] + end[e]
                if example_index not in best or score > best[example_index][0]:
                    best[example_index] = (score, words[s], words[e])
    answers = {}
    for index, example in enumerate(examples):
        if index not in best:
            answers[example.id] = ""
            continue
        score, first, last = best[index]
        text = " ".join(example.words[first:last + 1])
        if version_2 and null[index] - score > null_score_diff_threshold:
            text = ""
        answers[example.id] = text
    return answers


def squad_scores(data: list, answers: dict[str, str], version_2: bool) -> dict[str, float]:
    """exact_match and f1 in percent, by the official evaluation scripts."""
    if version_2:
        from official.nlp.tools import squad_evaluate_v2_0

        result = squad_evaluate_v2_0.evaluate(data, answers)
        return dict(exact_match=float(result["exact"]), f1=float(result["f1"]))
    from official.nlp.tools import squad_evaluate_v1_1

    result = squad_evaluate_v1_1.evaluate(data, answers)
    return dict(exact_match=100.0 * result["exact_match"], f1=100.0 * result["final_f1"])
