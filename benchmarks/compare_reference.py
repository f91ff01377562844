"""tfbert's training step against tf-models-official's BertPretrainer, side by side.

    python benchmarks/compare_reference.py                      # mini model, both setups
    python benchmarks/compare_reference.py --model=tiny --setups=plain --repeats=1
    python benchmarks/compare_reference.py --vocab_file=spm7000/spm.model   # another vocabulary

Both run the same model size, batch, sequence length, dropouts, optimizer (LAMB from
tensorflow-addons with the same schedule, clipping and weight-decay exclusions), loss and input
pipeline (the sample corpus through tfbert's reader, tokenized by the sample's own tokenizer or
by --vocab_file's, e.g. one that `python -m tfbert.train_tokenizer` made with another vocabulary
size), each in its own process:

- tfbert: `python -m tfbert.run` (the real training loop, checkpoints and logging included);
- reference: `official.nlp.modeling.networks.BertEncoder` + `models.BertPretrainer` in a plain
  `tf.function` step written here.

Two setups, each side at its own setting:

- plain: float32 on both sides, tfbert with its defaults;
- best: each at its best: tfbert in bfloat16 with every fused op and the fused LAMB
  (`--best_flags`), the reference with Keras' `mixed_bfloat16`. Without XLA: on a CPU with
  bfloat16 matrix units (AMX), auto-clustering hands the bfloat16 matmuls to XLA's own CPU
  code instead of oneDNN's AMX kernels, and the step ran 3x slower (22 against 69 examples/s,
  mini model); `--best_flags="... --xla=auto"` measures it.

Every setup runs --repeats times, tfbert and the reference alternated, so that the machine's
noise hits both; the table shows medians. Figures: examples/s over --steps steps after the first
(compiling) one, the first step's seconds (tracing, graph optimisation and compiling: the
start-up cost), the TensorFlow allocator's peak memory, and the model FLOPs utilisation (MFU):
examples/s x the model FLOPs of one example (`tfbert.training.flops`, the same for both: the
same model) / the measured matmul peak of this machine in the setup's compute dtype. Writes a
CSV (one row per run) and prints a Markdown table of medians with the tfbert/reference ratios.
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
    from tfbert.modeling.losses import pretraining_losses
    from tfbert.tokenization import load_tokenizer
    from tfbert.training.memory import PeakMemory
    from tfbert.training.optimization import WarmupPolynomialDecay, build_optimizer

    tf.keras.utils.set_random_seed(12345)
    policy = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
    if args.precision == "fp16":
        raise SystemExit("fp16 needs loss scaling, which this reference step does not do")
    tf.keras.mixed_precision.set_global_policy(policy[args.precision])
    files, vocab_file = sample_data(args)
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
    start = time.perf_counter()
    first_loss = float(train_step(next(iterator)))  # traces: not in the throughput
    first_step_secs = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step(next(iterator))
    last_loss = float(loss)  # waits for the last step
    elapsed = time.perf_counter() - start
    return dict(examples_per_sec=args.steps * args.batch / elapsed,
                first_step_secs=first_step_secs, peak_memory_bytes=memory.window_peak(),
                first_loss=first_loss, final_loss=last_loss,
                num_parameters=int(sum(v.shape.num_elements() for v in model.trainable_variables)))


# Each side's settings per setup: tfbert's flags and the reference's precision.
SETUPS = {"plain": ("", "fp32"), "best": (None, "bf16")}  # None: --best_flags
BEST_FLAGS = ("--precision=bf16 --ln_ytf_impl --attn_softmax_ytf_impl --ytf_gelu --ytf_dropout "
              "--gelu_save_derivative --fused_bias_dropout_add --fused_xent --fused_qkv "
              "--fused_qkv_split --optimizer=fused_lamb")


def sample_data(args) -> tuple[list[str], str]:
    """The sample corpus' records and tokenizer: its own, or --vocab_file's (both sides)."""
    from tfbert.data.sample import prepare_sample_data

    return prepare_sample_data(vocab_file=args.vocab_file or None, max_seq_length=args.seq,
                               max_predictions_per_seq=args.predictions)


def model_flops(args, vocab_size: int) -> int:
    from tfbert import config as cfg
    from tfbert.training.flops import model_flops_per_example

    model = cfg.ModelConfig(vocab_size=vocab_size, **cfg.MODEL_PRESETS[args.model])
    return model_flops_per_example(model, args.seq, args.predictions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mini")
    parser.add_argument("--setups", default="plain,best", help=f"of {sorted(SETUPS)}")
    parser.add_argument("--best_flags", default=BEST_FLAGS,
                        help="tfbert's flags in the best setup")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each side per setup, alternated")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--predictions", type=int, default=20)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--vocab_file", default="",
                        help="a sentencepiece .model for both sides (default: the sample's own)")
    parser.add_argument("--csv", default=os.path.join(REPO_ROOT, "runs", "bench",
                                                      "compare_reference.csv"))
    # The reference run, in its own process.
    parser.add_argument("--worker_json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker_json:
        with open(args.worker_json, "w") as f:
            json.dump(reference_worker(args), f)
        return

    sys.path.insert(0, REPO_ROOT)
    from tfbert.tokenization import load_tokenizer
    from tfbert.training.flops import COMPUTE_DTYPES, matmul_peak

    setups = args.setups.split(",")
    unknown = sorted(set(setups) - set(SETUPS))
    if unknown:
        raise SystemExit(f"--setups: unknown {unknown}; known: {sorted(SETUPS)}")
    if args.vocab_file:
        if not os.path.isfile(args.vocab_file):
            raise SystemExit(f"--vocab_file: {args.vocab_file} does not exist")
        args.vocab_file = os.path.abspath(args.vocab_file)  # the jobs run in the repository
    _, vocab_file = sample_data(args)
    vocab_size = load_tokenizer("sentencepiece", vocab_file).vocab_size
    flops = model_flops(args, vocab_size)
    common = [f"--model={args.model}", f"--train_batch_size={args.batch}",
              f"--max_seq_length={args.seq}", f"--max_predictions_per_seq={args.predictions}",
              f"--hidden_dropout_prob={args.dropout}",
              f"--attention_probs_dropout_prob={args.dropout}",
              f"--learning_rate={args.learning_rate}", "--num_warmup_steps=0",
              f"--num_train_steps={args.steps + 1}", f"--log_every_n_steps={args.steps + 1}"]
    if args.vocab_file:
        common.append(f"--vocab_file={args.vocab_file}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for setup in setups:
                tfbert_flags, reference_precision = SETUPS[setup]
                tfbert_flags = shlex.split(args.best_flags if tfbert_flags is None
                                           else tfbert_flags)
                summary = run_job(os.path.join(tmp, f"tfbert-{setup}-{repeat}"),
                                  common + tfbert_flags)
                precision = next((f.split("=", 1)[1] for f in tfbert_flags
                                  if f.startswith("--precision=")), "fp32")
                rows.append(dict(setup=setup, repeat=repeat, implementation="tfbert",
                                 precision=precision, flags=" ".join(tfbert_flags),
                                 examples_per_sec=summary["examples_per_sec"],
                                 first_step_secs=summary["first_step_secs"],
                                 max_gb=summary["peak_memory_bytes"] / 2 ** 30,
                                 first_loss=summary["first_loss"],
                                 final_loss=summary["final_loss"]))

                worker_json = os.path.join(tmp, "reference.json")
                command = [sys.executable, os.path.abspath(__file__), f"--model={args.model}",
                           f"--steps={args.steps}", f"--batch={args.batch}", f"--seq={args.seq}",
                           f"--predictions={args.predictions}", f"--dropout={args.dropout}",
                           f"--learning_rate={args.learning_rate}",
                           f"--precision={reference_precision}", f"--worker_json={worker_json}",
                           f"--vocab_file={args.vocab_file}"]
                result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                                        env=dict(os.environ, PYTHONPATH=REPO_ROOT))
                if result.returncode != 0:
                    raise SystemExit(f"the reference run failed:\n{result.stderr[-3000:]}")
                with open(worker_json) as f:
                    reference = json.load(f)
                rows.append(dict(setup=setup, repeat=repeat,
                                 implementation="tf-models-official BertPretrainer",
                                 precision=reference_precision, flags="",
                                 examples_per_sec=reference["examples_per_sec"],
                                 first_step_secs=reference["first_step_secs"],
                                 max_gb=reference["peak_memory_bytes"] / 2 ** 30,
                                 first_loss=reference["first_loss"],
                                 final_loss=reference["final_loss"]))
                print(f"{setup} #{repeat}: tfbert {rows[-2]['examples_per_sec']:.1f}, "
                      f"reference {rows[-1]['examples_per_sec']:.1f} examples/s", flush=True)

    # Measured after the runs, on a machine they no longer load.
    peaks = {precision: matmul_peak(COMPUTE_DTYPES[precision])
             for precision in {row["precision"] for row in rows}}
    runs = pd.DataFrame(rows)
    runs["model_flops_per_example"] = flops
    runs["matmul_peak_tflops"] = runs["precision"].map(peaks) / 1e12
    runs["mfu"] = runs["examples_per_sec"] * flops / runs["precision"].map(peaks)
    for key, value in dict(model=args.model, vocab_size=vocab_size, batch=args.batch,
                           seq=args.seq, predictions=args.predictions, steps=args.steps).items():
        runs[key] = value
    os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
    runs.to_csv(args.csv, index=False)

    table = (runs.groupby(["setup", "implementation"], sort=False)
             .agg(precision=("precision", "first"), examples_per_sec=("examples_per_sec", "median"),
                  mfu=("mfu", "median"), first_step_secs=("first_step_secs", "median"),
                  max_gb=("max_gb", "median"),
                  first_loss=("first_loss", "median"), final_loss=("final_loss", "median"))
             .reset_index())
    reference = table[table["implementation"] != "tfbert"].set_index("setup")
    table["speed_vs_reference"] = [
        row.examples_per_sec / reference.loc[row.setup, "examples_per_sec"]
        for row in table.itertuples()]
    print(f"\n{args.model} model, vocabulary {vocab_size}, batch {args.batch} x {args.seq}, "
          f"{args.predictions} predictions, {flops / 1e9:.3f} GFLOP per example; medians of "
          f"{args.repeats} run(s) of {args.steps} steps after the first; matmul peaks (TFLOP/s): "
          + ", ".join(f"{p} {v / 1e12:.3f}" for p, v in sorted(peaks.items())) + "\n")
    print(table.to_markdown(index=False, floatfmt=".3f"))
    if {"plain", "best"} <= set(setups):
        best = table[table["setup"] == "best"].set_index("implementation")["examples_per_sec"]
        plain = table[table["setup"] == "plain"].set_index("implementation")["examples_per_sec"]
        ratio = best["tfbert"] / best.drop("tfbert").iloc[0]
        print(f"\ntfbert best / reference best: {ratio:.2f}x; plain fp32: "
              f"{plain['tfbert'] / plain.drop('tfbert').iloc[0]:.2f}x")
    print(f"\nCSV: {args.csv}")


if __name__ == "__main__":
    main()
