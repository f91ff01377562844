"""tfbert's training step against tf-models-official's BertPretrainer, side by side.

    python benchmarks/compare_reference.py                      # tiny model, CPU defaults
    python benchmarks/compare_reference.py --model=mini --precision=bf16 --steps=50

Both run the same model size, batch, sequence length, dropouts, optimizer (LAMB from
tensorflow-addons with the same schedule, clipping and weight-decay exclusions), loss and input
pipeline (the sample corpus through tfbert's reader), each in its own process:

- tfbert: `python -m tfbert.run` (the real training loop, checkpoints and logging included);
- reference: `official.nlp.modeling.networks.BertEncoder` + `models.BertPretrainer` in a plain
  `tf.function` step written here.

Figures: examples/s over --steps steps after the first (compiling) one, and the TensorFlow
allocator's peak memory. Writes a CSV and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import pandas as pd

from jobs import REPO_ROOT, run_job


def reference_worker(args) -> dict:
    """Trains official's BertPretrainer for 1 + args.steps steps; returns the figures."""
    sys.path.insert(0, REPO_ROOT)
    import tensorflow as tf
    from official.nlp.modeling import models, networks

    from tfbert import config as cfg
    from tfbert.data.pretraining_dataset import pretraining_dataset
    from tfbert.data.sample import prepare_sample_data
    from tfbert.modeling.losses import pretraining_losses
    from tfbert.tokenization import load_tokenizer
    from tfbert.training.memory import PeakMemory
    from tfbert.training.optimization import WarmupPolynomialDecay, build_optimizer

    tf.keras.utils.set_random_seed(12345)
    policy = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
    if args.precision == "fp16":
        raise SystemExit("fp16 needs loss scaling, which this reference step does not do")
    tf.keras.mixed_precision.set_global_policy(policy[args.precision])
    files, vocab_file = prepare_sample_data(max_seq_length=args.seq,
                                            max_predictions_per_seq=args.predictions)
    vocab_size = load_tokenizer("sentencepiece", vocab_file).vocab_size
    shape = cfg.MODEL_PRESETS[args.model]
    initializer = tf.keras.initializers.TruncatedNormal(stddev=0.02)
    encoder = networks.BertEncoder(
        vocab_size=vocab_size, hidden_size=shape["hidden_size"],
        num_layers=shape["num_hidden_layers"], num_attention_heads=shape["num_attention_heads"],
        inner_dim=shape["intermediate_size"], max_sequence_length=512, type_vocab_size=2,
        inner_activation=lambda x: tf.keras.activations.gelu(x, approximate=False),
        output_dropout=args.dropout, attention_dropout=args.dropout, initializer=initializer)
    model = models.BertPretrainer(encoder, num_classes=2,
                                  num_token_predictions=args.predictions,
                                  initializer=initializer, output="logits")

    steps = args.steps + 1
    schedule = WarmupPolynomialDecay(args.learning_rate, steps, 0)
    iterations = tf.Variable(0, dtype=tf.int64, trainable=False)
    optimizer = build_optimizer(cfg.OptimizerConfig(learning_rate=args.learning_rate),
                                lambda: schedule(iterations))
    dataset = pretraining_dataset(files, batch_size=args.batch, max_seq_length=args.seq,
                                  max_predictions_per_seq=args.predictions, seed=12345)

    @tf.function
    def train_step(features):
        inputs = dict(input_word_ids=features["input_ids"], input_mask=features["input_mask"],
                      input_type_ids=features["segment_ids"],
                      masked_lm_positions=features["masked_lm_positions"])
        with tf.GradientTape() as tape:
            outputs = model(inputs, training=True)
            losses = pretraining_losses(tf.cast(outputs["masked_lm"], tf.float32),
                                        tf.cast(outputs["classification"], tf.float32), features)
        grads = tape.gradient(losses["loss"], model.trainable_variables)
        grads, _ = tf.clip_by_global_norm(grads, 1.0)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        iterations.assign_add(1)
        return losses["loss"]

    memory = PeakMemory()
    iterator = iter(dataset)
    first_loss = float(train_step(next(iterator)))  # traces: not timed
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step(next(iterator))
    last_loss = float(loss)  # waits for the last step
    elapsed = time.perf_counter() - start
    return dict(examples_per_sec=args.steps * args.batch / elapsed,
                peak_memory_bytes=memory.window_peak(), first_loss=first_loss,
                final_loss=last_loss,
                num_parameters=int(sum(v.shape.num_elements() for v in model.trainable_variables)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--predictions", type=int, default=20)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--tfbert_flags", default="",
                        help="extra flags for the tfbert run only, e.g. '--ln_ytf_impl'")
    parser.add_argument("--csv", default=os.path.join(REPO_ROOT, "runs", "bench",
                                                      "compare_reference.csv"))
    parser.add_argument("--worker_json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker_json:  # the reference run, in its own process
        with open(args.worker_json, "w") as f:
            json.dump(reference_worker(args), f)
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_job(os.path.join(tmp, "tfbert"), [
            f"--model={args.model}", f"--precision={args.precision}",
            f"--train_batch_size={args.batch}", f"--max_seq_length={args.seq}",
            f"--max_predictions_per_seq={args.predictions}",
            f"--hidden_dropout_prob={args.dropout}",
            f"--attention_probs_dropout_prob={args.dropout}",
            f"--learning_rate={args.learning_rate}", "--num_warmup_steps=0",
            f"--num_train_steps={args.steps + 1}", f"--log_every_n_steps={args.steps + 1}",
            *shlex.split(args.tfbert_flags)])
        rows.append(dict(implementation=f"tfbert {args.tfbert_flags}".strip(), examples_per_sec=summary["examples_per_sec"],
                         max_gb=summary["peak_memory_bytes"] / 2 ** 30,
                         first_loss=summary["first_loss"], final_loss=summary["final_loss"]))
        print(f"tfbert: {rows[-1]['examples_per_sec']:.1f} examples/s", flush=True)

        worker_json = os.path.join(tmp, "reference.json")
        command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:],
                   f"--worker_json={worker_json}"]
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                                env=dict(os.environ, PYTHONPATH=REPO_ROOT))
        if result.returncode != 0:
            raise SystemExit(f"the reference run failed:\n{result.stderr[-3000:]}")
        with open(worker_json) as f:
            reference = json.load(f)
        rows.append(dict(implementation="tf-models-official BertPretrainer",
                         examples_per_sec=reference["examples_per_sec"],
                         max_gb=reference["peak_memory_bytes"] / 2 ** 30,
                         first_loss=reference["first_loss"], final_loss=reference["final_loss"]))
        print(f"reference: {rows[-1]['examples_per_sec']:.1f} examples/s", flush=True)

    table = pd.DataFrame(rows)
    reference_row = table.iloc[1]
    table["speed_vs_reference"] = table["examples_per_sec"] / reference_row["examples_per_sec"]
    table["memory_vs_reference"] = (table["max_gb"] / reference_row["max_gb"]
                                    if reference_row["max_gb"] else float("nan"))
    for key, value in dict(model=args.model, precision=args.precision, batch=args.batch,
                           seq=args.seq, steps=args.steps).items():
        table[key] = value
    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    table.to_csv(args.csv, index=False)
    print(f"\n{args.model} model, {args.precision}, batch {args.batch} x {args.seq}, "
          f"{args.steps} steps after the first\n")
    print(table[["implementation", "max_gb", "examples_per_sec", "speed_vs_reference",
                 "memory_vs_reference", "first_loss", "final_loss"]]
          .to_markdown(index=False, floatfmt=".3f"))
    print(f"\nCSV: {args.csv}")


if __name__ == "__main__":
    main()
