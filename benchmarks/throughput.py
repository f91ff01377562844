"""Throughput and peak memory of the training step across precisions and XLA modes.

    python benchmarks/throughput.py                       # tiny model, CPU defaults
    python benchmarks/throughput.py --model=mini --precisions=fp32,bf16 --xla_modes=off,auto

Each configuration runs `python -m tfbert.run` in its own process (XLA and precision settings are
process-wide), all on the same data and model, side by side in one invocation. Figures come from
each run's summary.json: examples/s with the first (compiling) step excluded, and the allocator's
peak memory. Writes a CSV and prints a Markdown table with ratios against the first row.
float16 is left out of the CPU default: CPUs have no float16 matrix units and TensorFlow emulates
it, about 80x slower than float32 here; ask for it explicitly on a GPU.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile

import pandas as pd

from jobs import REPO_ROOT, run_job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--xla_modes", default="off,auto,jit")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--csv", default=os.path.join(REPO_ROOT, "runs", "bench", "throughput.csv"))
    parser.add_argument("extra", nargs="*", help="extra tfbert.run flags, after --")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision, xla in itertools.product(args.precisions.split(","),
                                                args.xla_modes.split(",")):
            summary = run_job(os.path.join(tmp, f"{precision}-{xla}"), [
                f"--model={args.model}", f"--precision={precision}", f"--xla={xla}",
                f"--num_train_steps={args.steps}", f"--train_batch_size={args.batch}",
                f"--max_seq_length={args.seq}", f"--log_every_n_steps={args.steps}",
                f"--save_checkpoints_steps={args.steps}", *args.extra])
            rows.append(dict(setup=f"{precision}+xla={xla}", model=args.model, precision=precision,
                             xla=xla, batch=args.batch, seq=args.seq, steps=args.steps,
                             examples_per_sec=summary["examples_per_sec"],
                             tokens_per_sec=summary["tokens_per_sec"],
                             max_gb=summary["peak_memory_bytes"] / 2 ** 30,
                             rss_gb=summary["peak_rss_bytes"] / 2 ** 30,
                             final_loss=summary["final_loss"]))
            print(f"done: {rows[-1]['setup']}: {rows[-1]['examples_per_sec']:.1f} examples/s",
                  flush=True)
    table = pd.DataFrame(rows)
    base = table.iloc[0]
    table["speed_vs_first_%"] = (table["examples_per_sec"] / base["examples_per_sec"] - 1) * 100
    table["memory_vs_first_%"] = (table["max_gb"] / base["max_gb"] - 1) * 100 if base["max_gb"] else 0.0
    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    table.to_csv(args.csv, index=False)
    columns = ["setup", "max_gb", "examples_per_sec", "speed_vs_first_%", "memory_vs_first_%",
               "rss_gb", "final_loss"]
    print(table[columns].to_markdown(index=False, floatfmt=".3f"))
    print(f"\nCSV: {args.csv}")


if __name__ == "__main__":
    main()
