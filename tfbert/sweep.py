"""Hyperparameter sweeps: every setting of a grid as its own `tfbert.run` job, one table.

    python -m tfbert.sweep --output_dir=sweeps/xl \\
        --grid=learning_rate=6e-7,8e-7,1e-6 --grid=pooler_dropout_prob=0.3,0.5 \\
        --grid=attention_probs_dropout_prob=0.1,0.2 --parallel=2 -- \\
        --mode=finetune --task=classification --init_checkpoint=runs/xl \\
        --train_file=train.tsv --eval_file=dev.tsv --num_train_steps=10000

Each `--grid=FLAG=V1,V2,...` is one axis; the jobs are the product of the axes, each
`python -m tfbert.run` with the flags after `--` plus its setting, in
`<output_dir>/runs/<setting>` (under `horovodrun -np --ranks_per_job` when that is above 1).
`--parallel` jobs run at once. The table has one row per setting of the other axes and, in one
cell, the metric for each value of `--cell_axis` (the learning rate by default), as the
benchmark notes write it: `[7.7, 7.72, 4.56]`; a `seed` axis is averaged. A job that fails or
diverges is reported in its cell ("failed", "diverged", "nan") and the sweep goes on.

Outputs, in --output_dir: `sweep.csv` (one line per job), `sweep.md` (the table, also printed),
`sweep.png` (the metric against the cell axis, a line per row). Running the same command again
resumes: each job resumes its own run directory (finished ones have nothing left to train).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time

from absl import app, flags

SEED_AXIS = "seed"
EXIT_DIVERGED = 3


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    fv = dict(flag_values=flag_values)
    flags.DEFINE_multi_string("grid", [], "An axis: FLAG=V1,V2,... (repeat for more axes).",
                              **fv)
    flags.DEFINE_string("output_dir", "", "Where the jobs' run directories and the table go.",
                        **fv)
    flags.DEFINE_string("cell_axis", "learning_rate", "The axis whose values share one cell of "
                                                      "the table.", **fv)
    flags.DEFINE_string("metric", "best", "The summary.json figure reported: best (the best "
                                          "evaluation of --best_metric), or a key such as "
                                          "eval_accuracy or final_loss.", **fv)
    flags.DEFINE_integer("parallel", 1, "Jobs run at once.", **fv)
    flags.DEFINE_integer("ranks_per_job", 1, "Processes per job (horovodrun -np above 1).", **fv)
    flags.DEFINE_float("job_timeout_secs", 0, "A job running longer is killed and reported as "
                                              "failed (0: no limit).", **fv)


class SweepError(ValueError):
    """A grid or setting that cannot be swept."""


@dataclasses.dataclass(frozen=True)
class Job:
    """One setting of the grid."""

    index: int
    setting: dict[str, str]  # flag -> value, in axis order
    output_dir: str

    @property
    def name(self) -> str:
        return "_".join(f"{flag}={value}" for flag, value in self.setting.items())


def parse_grid(axes: list[str]) -> dict[str, list[str]]:
    """["learning_rate=1e-5,2e-5", ...] -> {"learning_rate": ["1e-5", "2e-5"], ...}."""
    grid = {}
    for axis in axes:
        flag, sep, values = axis.partition("=")
        flag = flag.strip().lstrip("-")
        values = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not flag or not values:
            raise SweepError(f"--grid={axis!r}: expected FLAG=V1,V2,...")
        if flag in grid:
            raise SweepError(f"--grid names {flag} twice")
        if flag == "output_dir":
            raise SweepError("--grid=output_dir: each job's directory is chosen by the sweep")
        if len(set(values)) != len(values):
            raise SweepError(f"--grid={axis!r} repeats a value")
        grid[flag] = values
    if not grid:
        raise SweepError("give at least one --grid=FLAG=V1,V2,...")
    return grid


def plan_jobs(grid: dict[str, list[str]], output_dir: str) -> list[Job]:
    jobs = []
    for index, values in enumerate(itertools.product(*grid.values())):
        setting = dict(zip(grid, values))
        name = "_".join(f"{flag}={value}" for flag, value in setting.items())
        jobs.append(Job(index, setting, os.path.join(output_dir, "runs", name)))
    return jobs


def job_command(job: Job, base_flags: list[str], ranks: int) -> list[str]:
    command = [sys.executable, "-m", "tfbert.run", *base_flags,
               *(f"--{flag}={value}" for flag, value in job.setting.items()),
               f"--output_dir={job.output_dir}"]
    if ranks > 1:
        horovodrun = (shutil.which("horovodrun", path=os.path.dirname(sys.executable))
                      or shutil.which("horovodrun"))
        if horovodrun is None:
            raise SweepError("--ranks_per_job > 1 needs horovodrun (make setup builds Horovod)")
        command = [horovodrun, "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo", *command]
    return command


def read_metric(job: Job, metric: str) -> float | None:
    """The job's figure from its summary.json (None when it has none)."""
    try:
        with open(os.path.join(job.output_dir, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    key = metric
    if metric == "best":
        if not summary.get("best_metric"):
            raise SweepError(f"{job.output_dir}: --metric=best needs an evaluation with "
                             f"--best_metric (give --eval_file), or name a summary key")
        key = f"best_eval_{summary['best_metric']}"
    value = summary.get(key)
    if value is None and key not in summary:
        raise SweepError(f"{job.output_dir}/summary.json has no {key!r}; its keys: "
                         f"{sorted(summary)}")
    return float("nan") if value is None else float(value)


def run_jobs(jobs: list[Job], base_flags: list[str], parallel: int, ranks: int,
             timeout: float, metric: str, log=print) -> list[dict]:
    """Runs the jobs, `parallel` at a time; returns one result per job (status, metric)."""
    pending = list(jobs)
    running: dict[int, tuple[Job, subprocess.Popen, float, object]] = {}
    results = {}
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            os.makedirs(job.output_dir, exist_ok=True)
            log_file = open(job.output_dir + ".log", "w", encoding="utf-8")
            process = subprocess.Popen(job_command(job, base_flags, ranks), stdout=log_file,
                                       stderr=subprocess.STDOUT, text=True)
            running[job.index] = (job, process, time.monotonic(), log_file)
            log(f"[{job.index + 1}/{len(jobs)}] started {job.name}")
        time.sleep(0.5)
        for index, (job, process, started, log_file) in list(running.items()):
            timed_out = timeout > 0 and time.monotonic() - started > timeout
            if timed_out:
                process.kill()
            returncode = process.poll()
            if returncode is None:
                continue
            log_file.close()
            del running[index]
            results[index] = _result(job, returncode, timed_out, metric,
                                     time.monotonic() - started, log)
            log(f"[{index + 1}/{len(jobs)}] {results[index]['status']} {job.name}"
                + (f": {metric} {results[index]['metric']:.4g}"
                   if results[index]["metric"] is not None else ""))
    return [results[job.index] for job in jobs]


def _result(job: Job, returncode: int, timed_out: bool, metric: str, seconds: float,
            log=print) -> dict:
    value, problem = None, None
    if returncode == 0:
        try:
            value = read_metric(job, metric)
        except SweepError as e:  # reported, and the sweep goes on
            problem = str(e)
            log(f"{job.name}: {problem}")
    if problem:
        status = "no metric"
    elif timed_out:
        status = "timeout"
    elif returncode == EXIT_DIVERGED:
        status = "diverged"
    elif returncode != 0:
        status = "failed"
    elif value is None or math.isnan(value):
        status = "nan"
    else:
        status = "ok"
    return dict(index=job.index, **job.setting, status=status, returncode=returncode,
                metric=value if status == "ok" else None, seconds=round(seconds, 1),
                output_dir=job.output_dir, log=job.output_dir + ".log")


def _cell(results: list[dict]) -> str:
    """One value of the cell axis: the metric (mean over seeds), or why there is none."""
    values = [r["metric"] for r in results if r["status"] == "ok"]
    if len(values) < len(results):
        failed = [r["status"] for r in results if r["status"] != "ok"]
        if not values:
            return failed[0]
        return f"{sum(values) / len(values):.4g} ({len(failed)} {failed[0]})"
    return f"{sum(values) / len(values):.4g}"


def sweep_table(grid: dict[str, list[str]], results: list[dict], cell_axis: str):
    """The notes' table: a row per setting of the axes other than `cell_axis` and seed, the
    metric for each value of `cell_axis` in one cell."""
    import pandas as pd

    row_axes = [axis for axis in grid if axis not in (cell_axis, SEED_AXIS)]
    rows = []
    for number, values in enumerate(itertools.product(*(grid[a] for a in row_axes)), start=1):
        setting = dict(zip(row_axes, values))
        mine = [r for r in results if all(r[a] == v for a, v in setting.items())]
        cells = [_cell([r for r in mine if r[cell_axis] == value]) for value in grid[cell_axis]]
        rows.append({"№": number, **setting, cell_axis: "[" + ", ".join(grid[cell_axis]) + "]",
                     "metric": "[" + ", ".join(cells) + "]"})
    return pd.DataFrame(rows)


def plot_sweep(grid, results, cell_axis: str, metric: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row_axes = [axis for axis in grid if axis not in (cell_axis, SEED_AXIS)]
    figure, axes = plt.subplots(figsize=(8, 5))
    numeric = all(_is_number(v) for v in grid[cell_axis])
    xs = [float(v) if numeric else i for i, v in enumerate(grid[cell_axis])]
    for values in itertools.product(*(grid[a] for a in row_axes)):
        setting = dict(zip(row_axes, values))
        ys = []
        for value in grid[cell_axis]:
            ok = [r["metric"] for r in results if r[cell_axis] == value and r["status"] == "ok"
                  and all(r[a] == v for a, v in setting.items())]
            ys.append(sum(ok) / len(ok) if ok else float("nan"))
        label = ", ".join(f"{a}={v}" for a, v in setting.items()) or "all"
        axes.plot(xs, ys, marker="o", label=label)
    if numeric and min(xs) > 0 and max(xs) / min(xs) >= 10:
        axes.set_xscale("log")
    if not numeric:
        axes.set_xticks(xs, grid[cell_axis])
    axes.set_xlabel(cell_axis)
    axes.set_ylabel(metric)
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def sweep(grid: dict[str, list[str]], base_flags: list[str], output_dir: str,
          cell_axis: str = "learning_rate", metric: str = "best", parallel: int = 1,
          ranks_per_job: int = 1, job_timeout_secs: float = 0, log=print):
    """Runs the sweep; returns (results per job, the table as a DataFrame)."""
    import pandas as pd

    if cell_axis not in grid:
        raise SweepError(f"--cell_axis={cell_axis} is not an axis of the grid {list(grid)}")
    if parallel < 1 or ranks_per_job < 1:
        raise SweepError("--parallel and --ranks_per_job must be >= 1")
    swept = set(grid)
    fixed = {arg.split("=", 1)[0].lstrip("-") for arg in base_flags if arg.startswith("-")}
    if swept & fixed:
        raise SweepError(f"{sorted(swept & fixed)} are both swept and fixed after --")
    if "output_dir" in fixed:
        raise SweepError("--output_dir after --: each job's directory is chosen by the sweep")
    os.makedirs(output_dir, exist_ok=True)
    jobs = plan_jobs(grid, output_dir)
    results = run_jobs(jobs, base_flags, parallel, ranks_per_job, job_timeout_secs, metric, log)
    pd.DataFrame(results).to_csv(os.path.join(output_dir, "sweep.csv"), index=False)
    table = sweep_table(grid, results, cell_axis)
    markdown = table.to_markdown(index=False)
    with open(os.path.join(output_dir, "sweep.md"), "w", encoding="utf-8") as f:
        f.write(f"metric: {metric}\n\n{markdown}\n")
    plot_sweep(grid, results, cell_axis, metric, os.path.join(output_dir, "sweep.png"))
    return results, table


def main(argv) -> int:
    fv = flags.FLAGS
    base_flags = argv[1:]
    if not fv.output_dir:
        raise app.UsageError("--output_dir is required")
    try:
        grid = parse_grid(fv.grid)
        results, table = sweep(grid, base_flags, fv.output_dir, fv.cell_axis, fv.metric,
                               fv.parallel, fv.ranks_per_job, fv.job_timeout_secs)
    except SweepError as e:
        print(f"tfbert.sweep: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"\nmetric: {fv.metric}\n{table.to_markdown(index=False)}\n\n"
          f"{sum(r['status'] == 'ok' for r in results)}/{len(results)} jobs ok; "
          f"{fv.output_dir}/sweep.csv, sweep.md, sweep.png", flush=True)
    return 0


def run() -> None:
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
