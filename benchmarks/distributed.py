"""Data-parallel throughput: 1 and 2 ranks, and 2 fp16 ranks with and without Horovod's fp16
compression (which needs --precision=fp16's loss scale).

    python benchmarks/distributed.py                     # tiny model, CPU defaults
    python benchmarks/distributed.py --model=mini --steps=60

Each setup is one `tfbert.run` job (under `horovodrun --gloo` for several ranks) on the sample
corpus, run side by side in one invocation. Figures come from each job's summary.json:
examples/s per rank (first step excluded), summed over ranks, and the allocator's peak memory.
On this 2-core machine two ranks share the cores, so per-rank throughput falls; the benchmark
shows the cost of the all-reduce and of compression, not a GPU cluster's scaling.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import pandas as pd

from jobs import REPO_ROOT, run_job

SETUPS = [  # (ranks, extra flags)
    (1, []),
    (2, []),
    (2, ["--precision=fp16"]),
    (2, ["--precision=fp16", "--hvd_fp16_compression"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--csv", default=os.path.join(REPO_ROOT, "runs", "bench", "distributed.csv"))
    args = parser.parse_args()

    common = [f"--model={args.model}", f"--num_train_steps={args.steps}",
              f"--train_batch_size={args.batch}", f"--log_every_n_steps={args.steps}",
              f"--save_checkpoints_steps={args.steps}"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (ranks, extra) in enumerate(SETUPS):
            summary = run_job(os.path.join(tmp, str(i)), common + extra, ranks)
            rows.append(dict(setup=f"{ranks} rank(s)" + (" + " + " ".join(extra) if extra else ""),
                             ranks=ranks, model=args.model, batch_per_rank=args.batch,
                             examples_per_sec_per_rank=summary["examples_per_sec"],
                             examples_per_sec_total=summary["examples_per_sec_total"],
                             max_gb=summary["peak_memory_bytes_max"] / 2 ** 30,
                             final_loss=summary["final_loss"]))
            print(f"done: {rows[-1]['setup']}", flush=True)
    table = pd.DataFrame(rows)
    base = table.iloc[0]["examples_per_sec_per_rank"]
    table["per_rank_vs_1_rank_%"] = (table["examples_per_sec_per_rank"] / base - 1) * 100
    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    table.to_csv(args.csv, index=False)
    print(table[["setup", "examples_per_sec_per_rank", "examples_per_sec_total",
                 "per_rank_vs_1_rank_%", "max_gb", "final_loss"]].to_markdown(
        index=False, floatfmt=".3f"))
    print(f"\nCSV: {args.csv}")


if __name__ == "__main__":
    main()
