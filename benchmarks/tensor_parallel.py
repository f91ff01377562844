"""Tensor parallelism against one process: memory per rank, throughput, and what crosses the wire.

    python benchmarks/tensor_parallel.py                 # tiny model, TP=1 vs TP=2 (3-5 min here)
    python benchmarks/tensor_parallel.py --no_measure    # only the computed table (seconds)
    python benchmarks/tensor_parallel.py --size="--model=mini --train_batch_size=8" --repeats=3
    python benchmarks/tensor_parallel.py --no_measure --gpus=128 --tp_sizes=1,2,4,8

Two tables.

1. Measured here: one model replica on 1 rank (TP=1) and on T ranks (--tensor_parallel_size=T,
   one replica), each run `horovodrun -np T --gloo python -m tfbert.run <size>` in its own
   process, the setups alternating per repeat (TP=1, TP=2, then TP=1 again) so that a slow minute
   of a shared machine does not land on one setup alone. From each run's summary.json: the
   replica's examples/s (first, compiling step excluded; the median over repeats), peak memory
   per rank (the TensorFlow allocator's, the largest rank; median), and parameter and
   optimizer-state bytes per rank (the largest rank). Beside the measured parameter bytes, the
   same figure computed from the run's config.json by `parameter_bytes_per_rank`. On this 2-core
   machine the T ranks share the cores and every layer waits for 4 all-reduces over Gloo, so the
   examples/s show the cost of the split on a CPU, not on GPUs joined by NVLink.

2. Computed from shapes (no training, `--no_measure` prints only this): for the presets of the
   notes' rows at TP = 1, 2, 4 on --gpus ranks in all (N / T data-parallel replicas), per rank:
   parameter bytes, bytes sent per optimizer step by the tensor-parallel activation all-reduces
   and by the data-parallel gradient all-reduce, and their sum. Batch, sequence length,
   predictions and micro-batches per step are the flagfiles' (flags/xlarge.cfg,
   flags/48x3072.cfg); the vocabulary is the sharding byte table's (100k, 103k for 48x3072:
   `tfbert.training.sharding.preset_config`). Each TP rank of a replica reads the replica's
   whole batch, so at fixed --gpus a larger T means fewer replicas and a smaller global batch.

What crosses the wire, per micro-batch, under TP=T (tfbert.modeling.tensor_parallel), each a
ring all-reduce over the T ranks of the group, which sends 2 (T - 1) / T times the tensor's bytes
per rank:

  per layer   forward: the attention output projection's and the second FFN projection's partial
              products, [B, S, D] each; backward: the gradients of the inputs of Q/K/V (one
              all-reduce for the three) and of the first FFN projection, [B, S, D] each. In the
              compute dtype (2 bytes in fp16 and bf16; on Gloo bfloat16 travels as float32, NCCL
              sums it natively).
  embeddings  forward: the word-embedding lookup's rows summed over the vocabulary parts,
              [B, S, D] float32 (the table is float32 and not autocast).
  MLM head    backward: the gradient of the transform's output, [B, P, D], compute dtype;
              forward: the cross-entropy's max [B, P] float32, its sums (of exponentials and the
              target logit) [B, P, 2] float32 and the argmax [B, P] int32.

The per-variable norms that LAMB's trust ratios and gradient clipping add over the group
([variables, 2] float32, a few KB per step) are left out. The data-parallel all-reduce sends each
rank's own gradients once per optimizer step over the N / T ranks that hold the same part: split
tensors 1 / T of their bytes, replicated ones whole, in float32 or float16 under
--hvd_fp16_compression (the flagfiles' setting: 2 bytes). This is plain data parallelism: ZeRO
(48x3072.cfg includes optimald.cfg) replaces the all-reduce by a reduce-scatter (per micro-batch
under ZeRO-2) and an all-gather of the float32 parameters, which is left to benchmarks/zero.py.

Writes PREFIX-measured.csv (not under --no_measure), PREFIX-computed.csv, PREFIX.md (the printed
Markdown tables) and PREFIX.png (per-rank bytes measured; per-rank bytes sent, computed).
GB = 2^30 bytes, MiB = 2^20 bytes, as in tfbert's logs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import tempfile
import textwrap

import pandas as pd

from jobs import REPO_ROOT, JobFailed, run_job
from tfbert.config import MODEL_PRESETS, ModelConfig
from tfbert.modeling.tensor_parallel import split_of
from tfbert.training.sharding import model_variable_shapes, preset_config

# As benchmarks/zero.py: a run is about a minute here, most of it start-up and tracing.
CPU_SIZE = ("--model=tiny --max_seq_length=64 --max_predictions_per_seq=10 "
            "--train_batch_size=8")
# The notes' rows: train_batch_size (per rank, each TP rank of a replica reads the same batch),
# max_seq_length, max_predictions_per_seq and num_accumulation_steps of flags/xlarge.cfg and
# flags/48x3072.cfg (both --precision=fp16 --hvd_fp16_compression through base.cfg, and 2
# accumulation steps through optimal_gradaccum_fp16.cfg).
NOTES_ROWS = {
    "xlarge": dict(batch=32, seq=512, predictions=80, accumulation=2),
    "48x3072": dict(batch=8, seq=512, predictions=80, accumulation=2),
}
PARAM_BYTES = 4  # float32 variables in every precision (mixed precision keeps them float32)
MIB = 2 ** 20
GB = 2 ** 30


# ---------------------------------------------------------------------------------------------
# Volumes, from shapes alone.

def ring_allreduce_bytes(nbytes: float, ranks: int) -> float:
    """Bytes each rank sends in a ring all-reduce of `nbytes` over `ranks` ranks:
    (ranks - 1) / ranks of them in the reduce-scatter, as many again in the all-gather."""
    return 2 * (ranks - 1) / ranks * nbytes


def split_elements(config: ModelConfig, tp: int) -> tuple[int, int]:
    """(replicated, split) elements of the whole model under `tp`-way tensor parallelism: a
    rank holds all the replicated ones and 1 / tp of the split ones.

    Raises ValueError naming the variable when a split axis does not divide by `tp`.
    """
    if config.num_attention_heads % tp:
        raise ValueError(f"--num_attention_heads={config.num_attention_heads} does not split "
                         f"over --tensor_parallel_size={tp}")
    gated = config.hidden_act == "geglu"
    replicated = split = 0
    for name, shape in model_variable_shapes(config).items():
        part = split_of(name, gated)
        if part is None:
            replicated += math.prod(shape)
            continue
        pieces = tp * (2 if part.halves else 1)  # gate and value halves each cut into tp
        if shape[part.axis] % pieces:
            raise ValueError(f"{name} {shape}: axis {part.axis} does not split into {pieces} "
                             f"equal parts (--tensor_parallel_size={tp})")
        split += math.prod(shape)
    return replicated, split


def parameter_bytes_per_rank(config: ModelConfig, tp: int,
                             bytes_per_element: int = PARAM_BYTES) -> int:
    """Bytes of the variables one rank holds under `tp`-way tensor parallelism (float32 by
    default; pass 2 for float16 gradients, 8 for LAMB's m and v)."""
    replicated, split = split_elements(config, tp)
    return (replicated + split // tp) * bytes_per_element


def tensor_parallel_collectives(config: ModelConfig, batch: int, seq: int, predictions: int,
                                dtype_bytes: int) -> list[tuple[str, int, int]]:
    """The activation all-reduces of one micro-batch under tensor parallelism (of any size > 1):
    (what, how many, bytes of each tensor). `dtype_bytes`: the compute dtype's size."""
    d, layers = config.hidden_size, config.num_hidden_layers
    hidden = batch * seq * d
    return [
        ("layer forward: attention output, FFN output [B, S, D]", 2 * layers,
         hidden * dtype_bytes),
        ("layer backward: inputs of Q/K/V, of the first FFN projection [B, S, D]", 2 * layers,
         hidden * dtype_bytes),
        ("embedding lookup forward [B, S, D] float32", 1, hidden * 4),
        ("MLM transform output backward [B, P, D]", 1, batch * predictions * d * dtype_bytes),
        ("cross-entropy max [B, P] float32", 1, batch * predictions * 4),
        ("cross-entropy sums [B, P, 2] float32", 1, batch * predictions * 2 * 4),
        ("cross-entropy argmax [B, P] int32", 1, batch * predictions * 4),
    ]


def tensor_parallel_bytes(config: ModelConfig, tp: int, batch: int, seq: int, predictions: int,
                          dtype_bytes: int) -> float:
    """Bytes one rank sends in the activation all-reduces of one micro-batch of `batch`
    sequences of `seq` tokens and `predictions` masked positions; 0 at tp = 1."""
    if tp == 1:
        return 0.0
    total = sum(count * nbytes for _, count, nbytes in
                tensor_parallel_collectives(config, batch, seq, predictions, dtype_bytes))
    return ring_allreduce_bytes(total, tp)


def data_parallel_bytes(config: ModelConfig, tp: int, ranks: int, grad_bytes: int) -> float:
    """Bytes one rank sends in the data-parallel gradient all-reduce of one optimizer step:
    its own part of the gradients (`grad_bytes` per element) over the ranks / tp ranks that
    hold the same part."""
    if ranks % tp:
        raise ValueError(f"{ranks} ranks do not form groups of --tensor_parallel_size={tp}")
    return ring_allreduce_bytes(parameter_bytes_per_rank(config, tp, grad_bytes), ranks // tp)


def computed_table(presets: list[str], tp_sizes: list[int], gpus: int, dtype_bytes: int,
                   grad_bytes: int, overrides: dict) -> pd.DataFrame:
    """Table 2: one row per preset and TP size."""
    rows = []
    for preset in presets:
        config = preset_config(preset)
        shape = dict(NOTES_ROWS.get(preset, NOTES_ROWS["48x3072"]))
        shape.update({k: v for k, v in overrides.items() if v is not None})
        total = sum(split_elements(config, 1))
        for tp in tp_sizes:
            row = dict(preset=preset, vocab_size=config.vocab_size, parameters=total, tp=tp,
                       gpus=gpus, replicas=gpus // tp, **shape, dtype_bytes=dtype_bytes,
                       grad_bytes=grad_bytes)
            try:
                row["param_bytes_per_rank"] = parameter_bytes_per_rank(config, tp)
                row["tp_bytes_per_step"] = shape["accumulation"] * tensor_parallel_bytes(
                    config, tp, shape["batch"], shape["seq"], shape["predictions"], dtype_bytes)
                row["dp_bytes_per_step"] = data_parallel_bytes(config, tp, gpus, grad_bytes)
            except ValueError as e:
                row["message"] = str(e)
                rows.append(row)
                continue
            row["sent_bytes_per_step"] = row["tp_bytes_per_step"] + row["dp_bytes_per_step"]
            row["message"] = ""
            rows.append(row)
    return pd.DataFrame(rows)


def computed_markdown(table: pd.DataFrame) -> str:
    lines = ["| preset | vocab | TP | replicas | batch x seq x pred x micro | params / rank, GB "
             "| TP activations sent / rank / step, GB | DP gradients sent / rank / step, GB "
             "| sum, GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for _, row in table.iterrows():
        if row["message"]:
            figures = ["-"] * 4
        else:
            figures = [f"{row[c] / GB:.3f}" for c in ("param_bytes_per_rank", "tp_bytes_per_step",
                                                       "dp_bytes_per_step",
                                                       "sent_bytes_per_step")]
        lines.append("| " + " | ".join([
            f"{row['preset']} ({row['parameters'] / 1e9:.2f}B)", str(row["vocab_size"]),
            str(row["tp"]), str(row["replicas"]),
            f"{row['batch']} x {row['seq']} x {row['predictions']} x {row['accumulation']}",
            *figures]) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Measured.

def figures(summary: dict, output_dir: str) -> dict:
    """One run's figures from its summary.json, and its parameter bytes per rank computed from
    its config.json."""
    per_rank = summary["per_rank"]
    with open(os.path.join(output_dir, "config.json"), encoding="utf-8") as f:
        model = ModelConfig(**json.load(f)["model"])
    return dict(examples_per_sec_total=summary["examples_per_sec_total"],
                peak_memory_bytes_max=summary["peak_memory_bytes_max"],
                param_bytes_max=max(per_rank["param_bytes"]),
                optimizer_state_bytes_max=max(per_rank["optimizer_state_bytes"]),
                param_bytes_computed=parameter_bytes_per_rank(
                    model, summary["tensor_parallel_size"]),
                final_loss=summary["final_loss"])


def run_setups(tp_sizes: list[int], size: list[str], steps: int, repeats: int,
               work_dir: str) -> pd.DataFrame:
    """Table 1: each TP size `repeats` times (one replica of T ranks), alternating."""
    runs: dict[int, list[dict]] = {tp: [] for tp in tp_sizes}
    failed: dict[int, str] = {}
    for repeat in range(repeats):
        for tp in tp_sizes:
            if tp in failed:
                continue
            flags = [*size, f"--tensor_parallel_size={tp}", f"--num_train_steps={steps + 1}",
                     f"--log_every_n_steps={steps + 1}", f"--save_checkpoints_steps={steps + 1}"]
            output_dir = os.path.join(work_dir, f"tp{tp}-{repeat}")
            try:
                summary = run_job(output_dir, flags, ranks=tp, horovodrun=True)
            except JobFailed as e:
                if not e.config_error:
                    raise
                failed[tp] = e.message
                print(f"TP={tp}: does not run: {e.message}", flush=True)
                continue
            runs[tp].append(figures(summary, output_dir))
            print(f"TP={tp} (run {repeat + 1}/{repeats}): "
                  f"{runs[tp][-1]['examples_per_sec_total']:.1f} examples/s over {tp} rank(s)",
                  flush=True)

    rows = []
    for tp in tp_sizes:
        row = dict(setup=f"tp{tp}", tp=tp, ranks=tp, steps=steps, size=" ".join(size))
        if tp in failed:
            row.update(status="does not run", message=failed[tp], repeats=0)
        else:
            measured = runs[tp]
            row.update(status="ok", message="", repeats=len(measured))
            # Bytes held between steps are the same in every repeat: the first run's.
            for key in ("param_bytes_max", "param_bytes_computed", "optimizer_state_bytes_max"):
                row[key] = measured[0][key]
            for key in ("examples_per_sec_total", "peak_memory_bytes_max", "final_loss"):
                row[key] = statistics.median(m[key] for m in measured)
            row["examples_per_sec_total_runs"] = " ".join(
                f"{m['examples_per_sec_total']:.2f}" for m in measured)
        rows.append(row)
    columns = ["param_bytes_max", "param_bytes_computed", "optimizer_state_bytes_max",
               "examples_per_sec_total", "peak_memory_bytes_max", "final_loss",
               "examples_per_sec_total_runs"]
    table = pd.DataFrame(rows)
    table = table.reindex(columns=list(table.columns) + [c for c in columns
                                                         if c not in table.columns])
    base = table[(table["tp"] == 1) & (table["status"] == "ok")]
    if len(base):
        base = base.iloc[0]
        table["speed_vs_tp1_%"] = (table["examples_per_sec_total"]
                                   / base["examples_per_sec_total"] - 1) * 100
        table["param_bytes_vs_tp1"] = table["param_bytes_max"] / base["param_bytes_max"]
        table["peak_memory_vs_tp1"] = (table["peak_memory_bytes_max"]
                                       / base["peak_memory_bytes_max"])
    return table


def measured_markdown(table: pd.DataFrame, repeats: int) -> str:
    def cell(row, column: str, scale: float, spec: str, unit: str = "") -> str:
        value = row.get(column, float("nan"))
        return "-" if pd.isna(value) else format(value / scale, spec) + unit

    lines = [f"| setup | ranks | examples/s, replica (median of {repeats}) | vs TP=1 | peak memory "
             "/ rank, GB | vs TP=1 | params / rank, MiB | computed, MiB | vs TP=1 "
             "| opt state / rank, MiB | comment |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, row in table.iterrows():
        cells = [row["setup"], str(row["ranks"]),
                 cell(row, "examples_per_sec_total", 1, ".1f"),
                 cell(row, "speed_vs_tp1_%", 1, "+.0f", "%"),
                 cell(row, "peak_memory_bytes_max", GB, ".3f"),
                 cell(row, "peak_memory_vs_tp1", 1, ".2f"),
                 cell(row, "param_bytes_max", MIB, ".2f"),
                 cell(row, "param_bytes_computed", MIB, ".2f"),
                 cell(row, "param_bytes_vs_tp1", 1, ".3f"),
                 cell(row, "optimizer_state_bytes_max", MIB, ".2f"),
                 row["message"] if row["status"] != "ok" else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(measured: pd.DataFrame | None, computed: pd.DataFrame, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if measured is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5), squeeze=False)
    if measured is not None:
        ax = axes[0][0]
        ran = measured[measured["status"] == "ok"].reset_index(drop=True)
        width = 0.27
        for i, (column, label) in enumerate([("param_bytes_max", "parameters"),
                                             ("optimizer_state_bytes_max", "optimizer state"),
                                             ("peak_memory_bytes_max", "peak memory")]):
            ax.bar([p + (i - 1) * width for p in range(len(ran))], ran[column] / MIB, width,
                   label=label)
        ax.set_xticks(list(range(len(ran))))
        ax.set_xticklabels(ran["setup"])
        ax.set_ylabel("per rank (largest), MiB")
        ax.set_title("measured here", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    ax = axes[0][-1]
    ok = computed[computed["message"] == ""].reset_index(drop=True)
    positions = list(range(len(ok)))
    ax.bar(positions, ok["tp_bytes_per_step"] / GB, 0.6, label="TP activation all-reduces")
    ax.bar(positions, ok["dp_bytes_per_step"] / GB, 0.6, bottom=ok["tp_bytes_per_step"] / GB,
           label="DP gradient all-reduce")
    ax.set_xticks(positions)
    ax.set_xticklabels([f"{p}\nTP={t}" for p, t in zip(ok["preset"], ok["tp"])], fontsize=8)
    ax.set_ylabel("sent per rank per optimizer step, GB")
    ax.set_title(f"computed, {ok['gpus'].iloc[0] if len(ok) else '?'} GPUs", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle("\n".join(textwrap.wrap(title, 110)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{flag}={text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise SystemExit(f"{flag}={text!r}: give positive integers")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default=CPU_SIZE,
                        help=f"tfbert.run flags of the measured runs (default: '{CPU_SIZE}')")
    parser.add_argument("--measured_tp_sizes", default="1,2",
                        help="tensor-parallel sizes measured, one replica each (T ranks)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per setup, alternating between setups (median examples/s)")
    parser.add_argument("--no_measure", action="store_true",
                        help="print only the computed table (no training)")
    parser.add_argument("--presets", default=",".join(NOTES_ROWS),
                        help="model presets of the computed table (a preset without a row of "
                             "the notes takes 48x3072's batch, sequence and micro-batches)")
    parser.add_argument("--tp_sizes", default="1,2,4", help="TP sizes of the computed table")
    parser.add_argument("--gpus", type=int, default=64, help="ranks in all (computed table)")
    for name, what in (("batch", "train_batch_size"), ("seq", "max_seq_length"),
                       ("predictions", "max_predictions_per_seq"),
                       ("accumulation", "num_accumulation_steps")):
        parser.add_argument(f"--{name}", type=int, default=None,
                            help=f"{what} of every preset in the computed table (default: the "
                                 f"preset's flagfile)")
    parser.add_argument("--dtype_bytes", type=int, default=2,
                        help="bytes of an activation in the compute dtype (fp16 and bf16: 2)")
    parser.add_argument("--grad_bytes", type=int, default=2,
                        help="bytes of a gradient in the data-parallel all-reduce (float16 under "
                             "--hvd_fp16_compression, as the flagfiles: 2; float32: 4)")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "runs", "bench",
                                                      "tensor_parallel"),
                        help="output prefix: writes PREFIX-measured.csv, PREFIX-computed.csv, "
                             "PREFIX.md, PREFIX.png")
    args = parser.parse_args()

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p not in MODEL_PRESETS]
    if unknown:
        raise SystemExit(f"--presets: {', '.join(unknown)} not in {', '.join(MODEL_PRESETS)}")
    tp_sizes = int_list(args.tp_sizes, "--tp_sizes")
    bad = [t for t in tp_sizes if args.gpus % t]
    if bad:
        raise SystemExit(f"--gpus={args.gpus} is not a multiple of --tp_sizes {bad}")
    if args.repeats < 1 or args.steps < 1:
        raise SystemExit("--repeats and --steps must be at least 1")
    measured_tp = int_list(args.measured_tp_sizes, "--measured_tp_sizes")

    overrides = dict(batch=args.batch, seq=args.seq, predictions=args.predictions,
                     accumulation=args.accumulation)
    computed = computed_table(presets, tp_sizes, args.gpus, args.dtype_bytes, args.grad_bytes,
                              overrides)
    computed_title = (f"Computed from shapes, {args.gpus} ranks in all, per rank: activations "
                      f"{args.dtype_bytes} bytes, DP gradients {args.grad_bytes} bytes, float32 "
                      f"parameters; one optimizer step of `micro` micro-batches; GB = 2^30 bytes")
    markdown = f"{computed_title}.\n\n" + computed_markdown(computed)
    for message in sorted(set(computed["message"]) - {""}):
        markdown += f"\n\n{message}"

    measured = None
    size = shlex.split(args.size)
    if not args.no_measure:
        with tempfile.TemporaryDirectory() as work_dir:
            measured = run_setups(measured_tp, size, args.steps, args.repeats, work_dir)
        measured_title = (f"Measured here: {' '.join(size)}, one replica of T ranks, "
                          f"{args.steps} steps, {args.repeats} repeat(s)")
        markdown = (f"{measured_title}.\n\n" + measured_markdown(measured, args.repeats)
                    + "\n\n" + markdown)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    computed.to_csv(args.out + "-computed.csv", index=False)
    if measured is not None:
        measured.to_csv(args.out + "-measured.csv", index=False)
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write(markdown + "\n")
    chart(measured, computed, args.out + ".png",
          computed_title if measured is None else f"{measured_title}. {computed_title}")
    print("\n" + markdown)
    print(f"\nCSV: {args.out}-computed.csv"
          + ("" if measured is None else f", {args.out}-measured.csv")
          + f"\nTable: {args.out}.md\nChart: {args.out}.png")


if __name__ == "__main__":
    main()
