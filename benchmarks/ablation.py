"""The notes' ablation tables, regenerated: runs setups from flags/ and compares them.

    python benchmarks/ablation.py                        # the CPU set, mini model (~14 min here)
    python benchmarks/ablation.py --setups=baseline,fp16,base,basef,optimal
    python benchmarks/ablation.py --setups=all --np=8 --size="--model=large" --fp16_as=fp16

Each setup is `python -m tfbert.run --flagfile=flags/<setup>.cfg <size override>` in its own
process (precision, XLA and Horovod are process-wide), under `horovodrun -np N --gloo` for every
setup alike (most setups use Horovod's fp16 compression). The first step traces and compiles and
is excluded; examples/s are over the next --steps steps, and "max GB" is the TensorFlow
allocator's peak, both from each run's summary.json. A setup that cannot run (its feature is not
built yet, e.g. tensor parallelism) gets a row with the reason.

The ZeRO setups (--custom_memory_optimization, --split_opt_state, --split_grad_accum) split the
optimizer state across data-parallel ranks and refuse one process: under --np=1 they run with 2
ranks, and say so; a tensor-parallel setup runs with T ranks per replica (2T with ZeRO). Their examples/s are per rank with two ranks sharing the machine; on a CPU
compare their memory, not their speed, with the 1-rank rows (benchmarks/zero.py compares ZeRO
with data parallelism at the same rank count).

On a CPU, --fp16_as=bf16 (the default when TensorFlow sees no GPU) runs the fp16 setups in
bfloat16: CPUs have no float16 arithmetic and TensorFlow emulates it about 80x slower, which
would measure the emulation, not the setups. Such a setup also loses --hvd_fp16_compression:
without fp16's loss scale, float16 compression flushes small gradients to zero (tfbert.run
refuses it), and float16 gradient accumulators become float32 (they too rely on fp16's loss
scale). The "substituted" column lists what a row runs differently from its flagfile.

Writes a CSV (pandas), a Markdown table in the notes' format beside the notes' own figures
(read from flags/README.md), and a PNG chart of peak memory against throughput.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import textwrap

import pandas as pd

from jobs import REPO_ROOT, JobFailed, run_job

FLAGS_DIR = os.path.join(REPO_ROOT, "flags")

# The default set for a CPU: each switch of the notes that can run here, one row each. Of the
# ZeRO rows only optimald (ZeRO-2, 2 ranks): benchmarks/zero.py compares the stages and the
# split strategies against data parallelism at the same rank count. tp2 (the notes' row, fused
# LayerNorm and softmax off) and tp2_fused run with 4 ranks (TP=2 x ZeRO-2 over 2 replicas);
# tp4 would need 8 ranks.
CPU_SETUPS = [
    "baseline", "fp16", "fp16_xla", "base", "base_ln_ytf", "base_fattsoftmax", "base_flamb",
    "basef", "optimal", "basef_memopt_heuristic", "basef_memopt_recomputation",
    "basef_recomputation_suppress_grappler", "optimal_bias_keys", "optimal_attn_dropout",
    "optimal_hidden_dropout", "optimal_memopt_recomputation", "optimal_gradaccum_fp32",
    "optimal_adamw", "optimald", "tp2", "tp2_fused",
]
CPU_SIZE = ("--model=mini --max_seq_length=128 --max_predictions_per_seq=20 "
            "--train_batch_size=16")


def notes_figures() -> pd.DataFrame:
    """The table of flags/README.md: flagfile, notes row, the notes' max GB and examples/s."""
    rows = []
    with open(os.path.join(FLAGS_DIR, "README.md"), encoding="utf-8") as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 5 and cells[0].strip("`").endswith(".cfg"):
                rows.append(dict(setup=cells[0].strip("`")[:-len(".cfg")], notes_row=cells[1],
                                 notes_max_gb=float(cells[2]),
                                 notes_examples_per_sec=float(cells[3]), status=cells[4]))
    return pd.DataFrame(rows).set_index("setup")


def setup_flags(setup: str, extra: list[str]):
    """The tfbert.run flags a setup ends up with (its flagfiles, then the overrides).

    Parsed as tfbert.run parses them: nested --flagfile relative to the including file, a later
    flag overriding an earlier one. Returns absl FlagValues (e.g. `.precision`).
    """
    from absl import flags

    sys.path.insert(0, REPO_ROOT)
    from tfbert import run

    flag_values = flags.FlagValues()
    run.define_flags(flag_values)
    flag_values(run.expand_flagfiles(["tfbert.run", f"--flagfile={flagfile(setup)}", *extra]))
    return flag_values


def substitutions(setup_values, fp16_as: str) -> tuple[list[str], list[str]]:
    """What an fp16 setup runs differently as --fp16_as: (flags to append, what they change)."""
    if setup_values.precision != "fp16" or fp16_as == "fp16":
        return [], []
    appended = [f"--precision={fp16_as}"]
    changes = [f"precision fp16->{fp16_as}"]
    if setup_values.hvd_fp16_compression:
        # float16 compression without fp16's loss scale flushes small gradients to zero, and
        # tfbert.run refuses it outside --precision=fp16.
        appended.append("--nohvd_fp16_compression")
        changes.append("hvd_fp16_compression off")
    if setup_values.grad_accum_dtype == "float16":
        # Likewise float16 accumulators (zero1, optimald): refused outside --precision=fp16.
        appended.append("--grad_accum_dtype=float32")
        changes.append("grad_accum_dtype float16->float32")
    return appended, changes


def zero_stage(setup_values) -> int:
    """The ZeRO stage a setup's flags turn on (0: off). A contradiction among the ZeRO flags
    counts as off here: the run itself then stops with tfbert's message."""
    sys.path.insert(0, REPO_ROOT)
    from tfbert import run
    from tfbert.config import ConfigError

    try:
        return run.zero_stage_from_flags(setup_values)
    except ConfigError:
        return 0


def flagfile(setup: str) -> str:
    path = os.path.join(FLAGS_DIR, f"{setup}.cfg")
    if not os.path.isfile(path):
        raise SystemExit(f"--setups: no flagfile {path}")
    return path


def gpu_present() -> bool:
    try:
        import tensorflow as tf
    except ImportError:
        return False
    return bool(tf.config.list_physical_devices("GPU"))


def run_setups(setups: list[str], size: list[str], steps: int, ranks: int, fp16_as: str,
               work_dir: str) -> pd.DataFrame:
    rows = []
    for setup in setups:
        extra = list(size)
        setup_values = setup_flags(setup, extra)
        substituted_flags, changes = substitutions(setup_values, fp16_as)
        extra += substituted_flags
        # ZeRO splits the optimizer state across data-parallel ranks, tensor parallelism each
        # model across its group: too few ranks are a config error.
        tensor_parallel = setup_values.tensor_parallel_size
        replicas = 2 if zero_stage(setup_values) else 1
        setup_ranks = max(ranks, tensor_parallel * replicas)
        if setup_ranks > ranks:
            reasons = ([f"TP={tensor_parallel}"] if tensor_parallel > 1 else []) + (
                ["ZeRO needs 2 replicas"] if replicas > 1 else [])
            changes.append(f"ranks {ranks}->{setup_ranks} ({' x '.join(reasons)})")
        flags = [f"--flagfile={flagfile(setup)}", *extra, f"--num_train_steps={steps + 1}",
                 f"--log_every_n_steps={steps + 1}", f"--save_checkpoints_steps={steps + 1}"]
        precision = setup_values.precision
        row = dict(setup=setup, precision=fp16_as if precision == "fp16" else precision,
                   substituted="; ".join(changes), ranks=setup_ranks, steps=steps,
                   flags=" ".join(extra))
        try:
            summary = run_job(os.path.join(work_dir, setup), flags, ranks=setup_ranks,
                              horovodrun=True)
        except JobFailed as e:
            if not e.config_error:
                raise
            row.update(status="does not run", message=e.message)
            print(f"{setup}: does not run: {e.message}", flush=True)
        else:
            row.update(status="ok", message="",
                       max_gb=summary["peak_memory_bytes_max"] / 2 ** 30,
                       examples_per_sec=summary["examples_per_sec"],
                       examples_per_sec_total=summary["examples_per_sec_total"],
                       rss_gb=max(summary["per_rank"]["peak_rss_bytes"]) / 2 ** 30,
                       final_loss=summary["final_loss"])
            print(f"{setup}: {row['examples_per_sec']:.1f} examples/s per rank, "
                  f"{row['max_gb']:.3f} GB", flush=True)
        rows.append(row)
    measured = ["max_gb", "examples_per_sec", "examples_per_sec_total", "rss_gb", "final_loss"]
    table = pd.DataFrame(rows)
    return table.reindex(columns=list(table.columns) + [c for c in measured
                                                        if c not in table.columns])


def with_change(value: float, base: float, digits: int) -> str:
    """"14.6 (-10%)": a figure and its change against the base setup, as the notes write it."""
    if pd.isna(value):
        return "-"
    if pd.isna(base) or base == 0:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ({(value / base - 1) * 100:+.0f}%)"


def markdown_table(table: pd.DataFrame, base: str) -> str:
    ours = table.set_index("setup")
    lines = ["| setup | max gb | examples/sec | notes: max gb | notes: examples/sec | substituted "
             "| comment |",
             "|---|---|---|---|---|---|---|"]
    for setup, row in ours.iterrows():
        comment = row["message"] if row["status"] != "ok" else ""
        lines.append(
            f"| {setup} | {with_change(row.get('max_gb'), ours.at[base, 'max_gb'], 3)} | "
            f"{with_change(row.get('examples_per_sec'), ours.at[base, 'examples_per_sec'], 1)} | "
            f"{with_change(row['notes_max_gb'], ours.at[base, 'notes_max_gb'], 1)} | "
            f"{with_change(row['notes_examples_per_sec'], ours.at[base, 'notes_examples_per_sec'], 1)}"
            f" | {row['substituted']} | {comment} |")
    return "\n".join(lines)


def chart(table: pd.DataFrame, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = table[table["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(9, 6))
    ax.scatter(ran["max_gb"], ran["examples_per_sec"])
    for _, row in ran.iterrows():
        ax.annotate(row["setup"], (row["max_gb"], row["examples_per_sec"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("peak memory, GB (TensorFlow allocator)")
    ax.set_ylabel("examples/s per rank")
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default="cpu",
                        help="comma-separated flagfile names from flags/, 'cpu' or 'all'")
    parser.add_argument("--size", default=None,
                        help=f"flags appended to every setup (default on a CPU: '{CPU_SIZE}'; "
                             f"on a GPU: none, the setups' own sizes)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps after the first")
    parser.add_argument("--np", type=int, default=1, help="ranks per setup (horovodrun -np)")
    parser.add_argument("--fp16_as", choices=["fp16", "bf16", "fp32"], default=None,
                        help="precision for the fp16 setups (default: bf16 without a GPU)")
    parser.add_argument("--base", default="base", help="the setup the changes are relative to")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "runs", "bench", "ablation"),
                        help="output prefix: writes PREFIX.csv, PREFIX.md, PREFIX.png")
    args = parser.parse_args()

    notes = notes_figures()
    if args.setups == "cpu":
        setups = CPU_SETUPS
    elif args.setups == "all":
        setups = list(notes.index)
    else:
        setups = [s.strip().removesuffix(".cfg") for s in args.setups.split(",") if s.strip()]
    on_gpu = gpu_present()
    size = shlex.split(args.size if args.size is not None else ("" if on_gpu else CPU_SIZE))
    fp16_as = args.fp16_as or ("fp16" if on_gpu else "bf16")

    with tempfile.TemporaryDirectory() as work_dir:
        table = run_setups(setups, size, args.steps, args.np, fp16_as, work_dir)
    table = table.join(notes[["notes_row", "notes_max_gb", "notes_examples_per_sec"]], on="setup")
    base = args.base if args.base in set(table["setup"]) else table["setup"].iloc[0]
    ok_base = table.set_index("setup").loc[base]
    if ok_base["status"] == "ok":
        table["memory_vs_base_%"] = (table["max_gb"] / ok_base["max_gb"] - 1) * 100
        table["speed_vs_base_%"] = (table["examples_per_sec"] / ok_base["examples_per_sec"]
                                    - 1) * 100
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    table.to_csv(args.out + ".csv", index=False)
    # ZeRO and tensor-parallel setups need more ranks: each row's "ranks" says how many.
    zero_ranks = " (some setups more: see 'substituted')" if (table["ranks"] > args.np).any() \
        else ""
    title = (f"{' '.join(size) or 'setup sizes'}, {args.np} rank(s){zero_ranks}, {args.steps} "
             f"steps, fp16 setups as {fp16_as}")
    markdown = f"Changes against `{base}`; {title}.\n\n" + markdown_table(table, base)
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write(markdown + "\n")
    chart(table, args.out + ".png", title)
    print("\n" + markdown)
    print(f"\nCSV: {args.out}.csv\nTable: {args.out}.md\nChart: {args.out}.png")


if __name__ == "__main__":
    main()
