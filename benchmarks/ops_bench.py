"""Each fused op against TensorFlow's composite of the same computation: forward + backward time
and peak memory at BERT shapes, on this machine's device.

    python benchmarks/ops_bench.py                      # batch 8, seq 128/512, hidden 1024/2048
    python benchmarks/ops_bench.py --seqs=128 --hiddens=1024 --repeats=10

Both sides run in one process, one after the other per shape, each as a `tf.function` computing
the op and the gradient of a weighted sum of its output. Time is the median of --repeats runs after
a warm-up; memory is TensorFlow's allocator peak during one run (on the CPU only allocations of
256 KiB and more are counted). Writes a CSV and prints a Markdown table with ratios
(fused / composite: below 1 is better).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import pandas as pd
import tensorflow as tf

from tfbert.ops.loader import load_ops

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS_PER_HIDDEN = {1024: 16, 2048: 32}


def _cases(batch: int, seq: int, hidden: int, dtype: tf.DType):
    """(op name, shape text, fused fn, composite fn, inputs) for the ops that are built."""
    from tfbert.ops import attention_softmax_ops, layer_norm_ops

    library = load_ops()
    x = tf.random.normal([batch, seq, hidden], dtype=tf.float32)
    gamma, beta = tf.random.normal([hidden]), tf.random.normal([hidden])
    cases = [("layer_norm", f"[{batch},{seq},{hidden}]",
              lambda x: layer_norm_ops.fused_layer_norm(x, gamma, beta),
              lambda x: layer_norm_ops.layer_norm_reference(x, gamma, beta),
              tf.cast(x, dtype))]
    heads = HEADS_PER_HIDDEN.get(hidden, hidden // 64)
    scores = tf.cast(tf.random.normal([batch, heads, seq, seq]), dtype)
    mask = tf.cast(tf.zeros([batch, 1, 1, seq]), dtype)
    seed = tf.constant([1, 2], tf.int64)
    for rate in (0.0, 0.1):
        def fused(s, rate=rate):
            return attention_softmax_ops.fused_attention_softmax(s, mask, seed, 0.125, rate)

        def composite(s, rate=rate):
            probs = attention_softmax_ops.attention_softmax_reference(s, mask, 0.125)
            if rate:
                probs = tf.nn.experimental.stateless_dropout(probs, rate, seed)
            return probs

        cases.append((f"attention_softmax(dropout={rate})", f"[{batch},{heads},{seq},{seq}]",
                      fused, composite, scores))
    if hasattr(library, "tf_bert_fused_bias_gelu"):
        from tfbert.ops import gelu_ops

        width = 4 * hidden
        h = tf.cast(tf.random.normal([batch, seq, width]), dtype)
        bias = tf.cast(tf.random.normal([width]), dtype)
        cases.append(("bias_gelu", f"[{batch},{seq},{width}]",
                      lambda h: gelu_ops.fused_bias_gelu(h, bias),
                      lambda h: gelu_ops.bias_gelu_reference(h, bias), h))
        cases.append(("bias_gelu(saved derivative)", f"[{batch},{seq},{width}]",
                      lambda h: gelu_ops.fused_bias_gelu(h, bias, save_derivative=True),
                      lambda h: gelu_ops.bias_gelu_reference(h, bias), h))
        cases.append(("bias_geglu", f"[{batch},{seq},{width}]",
                      lambda h: gelu_ops.fused_bias_geglu(h, bias),
                      lambda h: gelu_ops.bias_geglu_reference(h, bias), h))
    if hasattr(library, "tf_bert_fused_bias_dropout_add"):
        from tfbert.ops import dropout_ops

        # The composite is what --ytf_dropout alone runs: the bias add, the fused dropout and
        # the residual add as three ops.
        out_bias = tf.cast(tf.random.normal([hidden]), dtype)
        residual = tf.cast(tf.random.normal([batch, seq, hidden]), dtype)
        cases.append(("bias_dropout_add(dropout=0.1)", f"[{batch},{seq},{hidden}]",
                      lambda x: dropout_ops.fused_bias_dropout_add(x, out_bias, residual, seed,
                                                                   0.1),
                      lambda x: dropout_ops.fused_dropout(x + out_bias, seed, 0.1) + residual,
                      tf.cast(x, dtype)))
    if hasattr(library, "tf_bert_fused_softmax_cross_entropy"):
        from tfbert.ops import softmax_xent_ops

        # The masked-LM loss of BERT's 30522-token vocabulary over about 15% of the positions
        # (the same for every hidden size). The composite is the path without --fused_xent:
        # the logits cast to float32, the bias add, TensorFlow's cross-entropy and argmax.
        rows, vocab = batch * max(1, round(0.15 * seq)), 30522
        vocab_bias = tf.random.normal([vocab])
        labels = tf.random.uniform([rows], 0, vocab, tf.int32)

        def with_argmax(xent):
            def loss_and_argmax(logits):
                loss, predicted = xent(logits, vocab_bias, labels)
                return loss + 0.0 * tf.cast(predicted, tf.float32)  # keeps the argmax computed
            return loss_and_argmax

        cases.append(("softmax_xent", f"[{rows},{vocab}]",
                      with_argmax(softmax_xent_ops.fused_softmax_cross_entropy),
                      with_argmax(softmax_xent_ops.softmax_cross_entropy_reference),
                      tf.cast(tf.random.normal([rows, vocab]) * 3.0, dtype)))
    return cases


def _measure(fn, inputs, repeats: int) -> tuple[float, int]:
    """Median seconds of forward+backward, and the allocator peak bytes of one run."""

    @tf.function
    def step(inputs):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = fn(inputs)
            loss = tf.reduce_sum(tf.cast(outputs, tf.float32) * 0.5)
        return tape.gradient(loss, inputs)

    step(inputs).numpy()  # trace and warm up
    device = "GPU:0" if tf.config.list_logical_devices("GPU") else "CPU:0"
    tf.config.experimental.reset_memory_stats(device)
    step(inputs).numpy()
    peak = int(tf.config.experimental.get_memory_info(device)["peak"])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(inputs).numpy()
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqs", default="128,512")
    parser.add_argument("--hiddens", default="1024,2048")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--csv", default=os.path.join(REPO_ROOT, "runs", "bench", "ops.csv"))
    args = parser.parse_args()

    rows = []
    for seq in map(int, args.seqs.split(",")):
        for hidden in map(int, args.hiddens.split(",")):
            for op, shape, fused, composite, inputs in _cases(args.batch, seq, hidden,
                                                              tf.as_dtype(args.dtype)):
                fused_s, fused_peak = _measure(fused, inputs, args.repeats)
                composite_s, composite_peak = _measure(composite, inputs, args.repeats)
                rows.append(dict(op=op, shape=shape, dtype=args.dtype,
                                 fused_ms=fused_s * 1e3, composite_ms=composite_s * 1e3,
                                 time_ratio=fused_s / composite_s,
                                 fused_peak_mb=fused_peak / 2 ** 20,
                                 composite_peak_mb=composite_peak / 2 ** 20,
                                 memory_ratio=fused_peak / composite_peak if composite_peak else None))
                print(f"done: {op} {shape}", flush=True)
    table = pd.DataFrame(rows)
    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    table.to_csv(args.csv, index=False)
    print(table.to_markdown(index=False, floatfmt=".3f"))
    print(f"\nCSV: {args.csv}")


if __name__ == "__main__":
    main()
