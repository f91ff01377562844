"""ZeRO-1/2 against data parallelism: optimizer-state bytes and peak memory per rank, throughput.

    python benchmarks/zero.py                            # tiny model, 2 ranks (5-9 min here)
    python benchmarks/zero.py --size="--model=mini --train_batch_size=8" --repeats=3 --steps=20
    python benchmarks/zero.py --setups=dp,zero2-flat,zero2-greedy:16
    python benchmarks/zero.py --np=8 --size="--model=large --precision=bf16" --setups=all

Setups: `dp` (data parallelism: every rank holds all the optimizer state) and
`zero<stage>-<strategy>`: --custom_memory_optimization --zero_stage=<stage>
--state_split_strategy=<strategy>, e.g. zero1-naive, zero2-greedy:8, zero2-flat. Stage 1 splits
the optimizer state (LAMB's m and v) across the ranks, stage 2 the gradients and accumulators
too. The default set is dp and both stages with each of naive, greedy:8 and flat.

Each run is `horovodrun -np N --gloo python -m tfbert.run <size> <setup flags>` in its own
process; the setups alternate (dp, zero1-naive, ..., then dp again for the next repeat), so that
a slow minute of a shared machine does not land on one setup alone. From each run's summary.json:

- optimizer-state bytes per rank, the largest and the smallest over the ranks (a strategy that
  balances badly shows a gap; naive gives whole layers, and the embedding matrix, to one rank),
  and the largest as a fraction of dp's (1/N is the ideal);
- gradient + accumulator bytes per rank (the largest; stage 2 splits them);
- peak memory per rank: the TensorFlow allocator's peak, the largest over the ranks;
- examples/s over all ranks, first (compiling) step excluded, the median over the repeats.

The byte figures are what each rank holds between steps and do not change between repeats;
peak memory is the median over repeats of the largest rank. On this 2-core machine two ranks
share the cores and ZeRO's extra collectives (reduce-scatter, all-gather) compete with the
compute, so the throughput column shows their cost on a CPU, not on GPUs with NVLink.

Writes PREFIX.csv (pandas), PREFIX.md (the printed Markdown table) and PREFIX.png (optimizer
state and peak memory per rank, one bar per setup).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import tempfile
import textwrap

import pandas as pd

from jobs import REPO_ROOT, JobFailed, run_job

ALL_SETUPS = ["dp", "zero1-naive", "zero1-greedy:8", "zero1-flat",
              "zero2-naive", "zero2-greedy:8", "zero2-flat"]
# Small enough for a 2-core machine: a run is 45-75 s here, most of it start-up and the first
# step's tracing, which the model size barely changes (the mini model's runs take 55-85 s), so
# the 7 setups take 5-9 minutes. For steadier figures: --size="--model=mini ..." --repeats=3
# --steps=20.
CPU_SIZE = ("--model=tiny --max_seq_length=64 --max_predictions_per_seq=10 "
            "--train_batch_size=8")
MIB = 2 ** 20
GB = 2 ** 30


def setup_flags(setup: str) -> tuple[int, str | None, list[str]]:
    """"dp" -> (0, None, []); "zero2-greedy:8" -> (2, "greedy:8", [tfbert.run flags])."""
    if setup == "dp":
        return 0, None, []
    match = re.fullmatch(r"zero([12])-(\S+)", setup)
    if match is None:
        raise SystemExit(f"--setups: {setup!r} is not 'dp' or 'zero<1|2>-<strategy>' "
                         f"(e.g. zero1-naive, zero2-greedy:8, zero2-flat)")
    stage, strategy = int(match.group(1)), match.group(2)
    return stage, strategy, ["--custom_memory_optimization", f"--zero_stage={stage}",
                             f"--state_split_strategy={strategy}"]


def figures(summary: dict) -> dict:
    """One run's figures from its summary.json (per-rank lists reduced over the ranks)."""
    per_rank = summary["per_rank"]
    held = [g + a for g, a in zip(per_rank["gradient_bytes"], per_rank["accumulator_bytes"])]
    return dict(optimizer_state_bytes_max=max(per_rank["optimizer_state_bytes"]),
                optimizer_state_bytes_min=min(per_rank["optimizer_state_bytes"]),
                grad_accum_bytes_max=max(held),
                param_bytes_max=max(per_rank["param_bytes"]),
                peak_memory_bytes_max=max(per_rank["peak_memory_bytes"]),
                peak_rss_bytes_max=max(per_rank["peak_rss_bytes"]),
                examples_per_sec_total=summary["examples_per_sec_total"],
                final_loss=summary["final_loss"])


def run_setups(setups: list[str], size: list[str], steps: int, ranks: int, repeats: int,
               work_dir: str) -> pd.DataFrame:
    """Runs every setup `repeats` times, alternating; one row per setup."""
    runs: dict[str, list[dict]] = {setup: [] for setup in setups}
    failed: dict[str, str] = {}
    for repeat in range(repeats):
        for setup in setups:
            if setup in failed:
                continue
            _, _, flags = setup_flags(setup)
            flags = [*size, *flags, f"--num_train_steps={steps + 1}",
                     f"--log_every_n_steps={steps + 1}", f"--save_checkpoints_steps={steps + 1}"]
            try:
                summary = run_job(os.path.join(work_dir, f"{setup}-{repeat}"), flags,
                                  ranks=ranks, horovodrun=True)
            except JobFailed as e:
                if not e.config_error:
                    raise
                failed[setup] = e.message
                print(f"{setup}: does not run: {e.message}", flush=True)
                continue
            runs[setup].append(figures(summary))
            print(f"{setup} (run {repeat + 1}/{repeats}): "
                  f"{runs[setup][-1]['examples_per_sec_total']:.1f} examples/s over {ranks} "
                  f"ranks", flush=True)

    rows = []
    for setup in setups:
        stage, strategy, _ = setup_flags(setup)
        row = dict(setup=setup, zero_stage=stage, state_split_strategy=strategy or "",
                   ranks=ranks, steps=steps, size=" ".join(size))
        if setup in failed:
            row.update(status="does not run", message=failed[setup], repeats=0)
        else:
            measured = runs[setup]
            row.update(status="ok", message="", repeats=len(measured))
            # Bytes held between steps are the same in every repeat: the first run's.
            for key in ("optimizer_state_bytes_max", "optimizer_state_bytes_min",
                        "grad_accum_bytes_max", "param_bytes_max"):
                row[key] = measured[0][key]
            for key in ("peak_memory_bytes_max", "peak_rss_bytes_max", "examples_per_sec_total",
                        "final_loss"):
                row[key] = statistics.median(m[key] for m in measured)
            row["examples_per_sec_total_runs"] = " ".join(
                f"{m['examples_per_sec_total']:.2f}" for m in measured)
        rows.append(row)
    measured_columns = ["optimizer_state_bytes_max", "optimizer_state_bytes_min",
                        "grad_accum_bytes_max", "param_bytes_max", "peak_memory_bytes_max",
                        "peak_rss_bytes_max", "examples_per_sec_total", "final_loss",
                        "examples_per_sec_total_runs"]
    table = pd.DataFrame(rows)
    table = table.reindex(columns=list(table.columns) + [c for c in measured_columns
                                                         if c not in table.columns])
    dp = table[(table["setup"] == "dp") & (table["status"] == "ok")]
    if len(dp):
        dp = dp.iloc[0]
        table["optimizer_state_vs_dp"] = (table["optimizer_state_bytes_max"]
                                          / dp["optimizer_state_bytes_max"])
        table["peak_memory_vs_dp_%"] = (table["peak_memory_bytes_max"]
                                        / dp["peak_memory_bytes_max"] - 1) * 100
        table["speed_vs_dp_%"] = (table["examples_per_sec_total"]
                                  / dp["examples_per_sec_total"] - 1) * 100
    return table


def markdown_table(table: pd.DataFrame, repeats: int) -> str:
    def cell(row, column: str, scale: float, spec: str) -> str:
        value = row.get(column, float("nan"))
        return "-" if pd.isna(value) else format(value / scale, spec)

    lines = ["| setup | opt state / rank, MiB (max) | (min) | max vs dp | grad + accum / rank, MiB "
             f"| peak memory / rank, GB | examples/s, all ranks (median of {repeats}) | comment |",
             "|---|---|---|---|---|---|---|---|"]
    for _, row in table.iterrows():
        cells = [row["setup"],
                 cell(row, "optimizer_state_bytes_max", MIB, ".2f"),
                 cell(row, "optimizer_state_bytes_min", MIB, ".2f"),
                 cell(row, "optimizer_state_vs_dp", 1, ".3f"),
                 cell(row, "grad_accum_bytes_max", MIB, ".2f"),
                 cell(row, "peak_memory_bytes_max", GB, ".3f"),
                 cell(row, "examples_per_sec_total", 1, ".1f"),
                 row["message"] if row["status"] != "ok" else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(table: pd.DataFrame, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = table[table["status"] == "ok"].reset_index(drop=True)
    positions = range(len(ran))
    fig, (state_ax, memory_ax) = plt.subplots(1, 2, figsize=(12, 5))
    width = 0.4
    state_ax.bar([p - width / 2 for p in positions], ran["optimizer_state_bytes_max"] / MIB,
                 width, label="largest rank")
    state_ax.bar([p + width / 2 for p in positions], ran["optimizer_state_bytes_min"] / MIB,
                 width, label="smallest rank")
    state_ax.set_ylabel("optimizer state per rank, MiB")
    state_ax.legend(fontsize=8)
    memory_ax.bar(positions, ran["peak_memory_bytes_max"] / GB, 0.6)
    memory_ax.set_ylabel("peak memory per rank (largest), GB")
    for ax in (state_ax, memory_ax):
        ax.set_xticks(list(positions))
        ax.set_xticklabels(ran["setup"], rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("\n".join(textwrap.wrap(title, 110)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default="all",
                        help="comma-separated: dp, zero<1|2>-<naive|greedy:N|flat>, or 'all' "
                             f"({','.join(ALL_SETUPS)})")
    parser.add_argument("--size", default=CPU_SIZE,
                        help=f"tfbert.run flags for every setup (default: '{CPU_SIZE}')")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per setup, alternating between setups (median examples/s)")
    parser.add_argument("--np", type=int, default=2, help="ranks per setup (horovodrun -np)")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "runs", "bench", "zero"),
                        help="output prefix: writes PREFIX.csv, PREFIX.md, PREFIX.png")
    args = parser.parse_args()

    setups = ALL_SETUPS if args.setups == "all" else [
        s.strip() for s in args.setups.split(",") if s.strip()]
    for setup in setups:
        setup_flags(setup)  # fail on a bad name before the first run
    if args.repeats < 1 or args.steps < 1:
        raise SystemExit("--repeats and --steps must be at least 1")
    if args.np < 2:
        raise SystemExit("--np: ZeRO splits the state across ranks; it needs 2 or more")
    size = shlex.split(args.size)

    with tempfile.TemporaryDirectory() as work_dir:
        table = run_setups(setups, size, args.steps, args.np, args.repeats, work_dir)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    table.to_csv(args.out + ".csv", index=False)
    title = f"{' '.join(size)}, {args.np} ranks, {args.steps} steps, {args.repeats} repeat(s)"
    markdown = f"{title}.\n\n" + markdown_table(table, args.repeats)
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write(markdown + "\n")
    chart(table, args.out + ".png", title)
    print("\n" + markdown)
    print(f"\nCSV: {args.out}.csv\nTable: {args.out}.md\nChart: {args.out}.png")


if __name__ == "__main__":
    main()
