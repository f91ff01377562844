"""Where the training step's time goes: per-op and per-category time under TensorFlow's profiler,
and the step's model FLOPs utilisation (MFU).

    python benchmarks/profile_step.py --steps=10 -- --model=mini --precision=bf16 --ln_ytf_impl \
        --attn_softmax_ytf_impl --ytf_gelu --gelu_save_derivative --ytf_dropout \
        --fused_bias_dropout_add --fused_xent --fused_qkv --fused_qkv_split \
        --optimizer=fused_lamb --max_seq_length=128 --train_batch_size=16

Everything after `--` is `tfbert.run` flags (flagfiles too): the script builds the run's config,
data and `Trainer` in-process with tfbert.run's own functions, runs --warmup_steps untimed steps
(the first traces and compiles), times --timed_steps steps without the profiler (examples/s and
MFU come from these: the profiler slows the step down), then runs --steps steps under
`tf.profiler.experimental`, each marked as a step with `tf.profiler.experimental.Trace`.

How the profile is read. The profiler writes an XSpace protobuf, `<logdir>/plugins/profile/
<run>/<host>.xplane.pb`, and TensorFlow 2.15 ships its Python schema
(`tensorflow.tsl.profiler.protobuf.xplane_pb2`). The "/host:CPU" plane has one line per thread
and one event per TraceMe: every op the executor runs is an event named "<op name>:<op type>"
on the thread that ran it, nested in executor events ("ExecutorState::Process") and nesting
what the kernel traces itself (e.g. "ParallelFor"). So per thread line:
  - events are sorted by start; a stack gives each event its parent (events on one thread nest);
  - an op's self time is its duration minus its nested ops (nested non-op events, e.g. a
    kernel's "ParallelFor", are part of the op's own work); a non-op event's self time (the
    executor's bookkeeping) is its duration minus all its nested events;
  - with --host_tracer_level=3 (the default) the executor also traces cheap ops and gives each op
    a "shape" stat with its inputs' dtypes and shapes, "(float[16,128,256];float[256,256])", from
    which the bytes an op reads are computed. Outputs are not recorded: no bytes written.
Threads: "tf_Compute/*" run the step's ops (two of them here, sharing the CPU's cores, so their
times add up to more than the wall time: the categories are thread time, not a partition of
the wall time); "tf_data_*" run the input pipeline, in the background; "python" calls the step
and waits for it ("KernelAndDeviceFunc::Run": waiting, left out) and takes each batch from the
prefetch buffer (data pipeline: waiting there means the input is late).

What did not work in TensorFlow 2.15 without TensorBoard's profile plugin
(tensorboard_plugin_profile, not installed): `_pywrap_profiler.xspace_to_tools_data(paths,
"tensorflow_stats")` does return per-op self times, but as a serialized TfStatsDatabase
protobuf whose schema (tf_stats_pb2) ships only with that plugin; "framework_op_stats" is not a
tool of this version ("Can not find tool"); "overview_page" has step times and no ops;
"op_profile" is empty on a CPU; the stats' FLOP rate and memory bandwidth are left at 0 for host
ops. Reading the XSpace directly needs nothing beyond TensorFlow, keeps the thread and nesting
information, and gives input shapes. A GPU's kernels live on "/device:GPU:*" planes, which this
script does not read (it warns when a profile has them): its figures are the host's.

--xla=auto: each compiled cluster is one op, "_XlaRun" (category "XLA clusters"), whose thread
waits while XLA's own "host_executor" threads run it. With XLA_FLAGS=
--xla_cpu_enable_xprof_traceme XLA traces its HLO instructions on those threads ("dot.8",
"fusion.3", "call.7"): dots then count as matmul, the rest as "XLA clusters", and "_XlaRun" as
waiting. The HLO names do not say which TensorFlow op they came from.

Categories come from an op's type first (matmuls, casts, transposes, the fused ops, softmax,
random ops), then from its name scope (tfbert's layers name theirs as google-research/bert
does: .../attention/..., .../LayerNorm/..., .../intermediate/..., .../dropout/..., cls/...;
gradients carry the forward op's scope under "gradient_tape/"); `classify` has the rules.
"bias adds" are the dense layers' bias additions and their gradients (column sums) outside the
FFN, whose bias belongs to GELU as in the fused op; "heads and loss" the MLM/NSP heads besides
their matmuls; "framework" the executor's own time between ops and Python's between steps;
"other" the ops no rule claims (residual adds, gradient sums, embedding lookups).

Writes PREFIX_ops.csv (one row per op and thread kind: ms per step, calls per step, bytes read),
PREFIX_categories.csv, PREFIX.md (the printed tables), PREFIX.png (time per category) and keeps
the profile in PREFIX_trace/ (TensorBoard's profile plugin opens it).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import textwrap
import time

import pandas as pd

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# In display order; "(waiting)" (the Python thread blocked in the step) is read but not counted.
CATEGORIES = ("matmul", "bias adds", "attention softmax", "transposes", "LayerNorm", "GELU",
              "dropout", "heads and loss", "optimizer", "casts", "XLA clusters", "data pipeline",
              "collectives", "framework", "other")
WAITING = "(waiting)"

# "<op name>:<op type>": TensorFlow's TraceMe of an op. Op names hold no ':' or blank, which
# sets them apart from "ExecutorState::Process", "EagerLocalExecute: __inference_...", etc.
_OP_EVENT = re.compile(r"^([^:\s]+):([\w>]+)$")
# An HLO instruction traced by XLA's CPU executable: "dot.8", "fusion", "custom-call.2".
_HLO_EVENT = re.compile(r"[a-z][a-z0-9\-]*(\.\d+)?")
# One input in a "shape" stat: "float[16,128,256]", "bfloat16[]".
_SHAPE_ITEM = re.compile(r"(\w+)\[([\d,]*)\]")
# Bytes per element, by TensorFlow's DataTypeString. Resources, variants and strings count 0.
_DTYPE_BYTES = {"float": 4, "double": 8, "half": 2, "bfloat16": 2, "int8": 1, "uint8": 1,
                "int16": 2, "uint16": 2, "int32": 4, "uint32": 4, "int64": 8, "uint64": 8,
                "bool": 1, "complex64": 8, "complex128": 16}

# Ops that return their input's buffer, or a handle, without reading the data.
_VIEW_TYPES = {"Reshape", "Identity", "IdentityN", "ExpandDims", "Squeeze", "Shape", "ShapeN",
               "Size", "Rank", "Bitcast", "StopGradient", "ReadVariableOp", "_Arg", "_Retval",
               "NoOp", "Const", "Snapshot"}
# Op types, with the oneDNN rewrites (_Mkl*) Grappler makes of them on a CPU.
_MATMUL_TYPES = {"MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum",
                 "_FusedMatMul", "_MklMatMul", "_MklFusedMatMul", "_MklBatchMatMul",
                 "_MklBatchMatMulV2", "_MklFusedBatchMatMulV2", "_MklEinsum",
                 "_MklNativeMatMul", "_MklNativeFusedMatMul", "_MklNativeBatchMatMulV2"}
_CAST_TYPES = {"Cast", "_MklCast"}
_SOFTMAX_TYPES = {"Softmax", "_MklSoftmax", "TfBert>FusedAttentionSoftmax",
                  "TfBert>FusedAttentionSoftmaxGrad"}
_XLA_TYPES = {"_XlaRun", "_XlaCompile", "XlaLaunch", "_XlaMerge"}
# With --fused_qkv_split the Q/K/V heads' split (and their bias add) is one op and its gradient.
_TRANSPOSE_TYPES = {"Transpose", "_MklTranspose", "ConjugateTranspose",
                    "TfBert>FusedBiasSplitHeads", "TfBert>FusedBiasSplitHeadsGrad"}
_RANDOM_TYPES = ("StatelessRandom", "RandomUniform", "RngReadAndSkip", "RngSkip")
_LOSS_TYPES = {"SparseSoftmaxCrossEntropyWithLogits", "SoftmaxCrossEntropyWithLogits",
               "LogSoftmax", "ArgMax", "TfBert>FusedSoftmaxCrossEntropy",
               "TfBert>FusedSoftmaxCrossEntropyGrad"}
# Scopes of the update step: the optimizers' own, the global norm and clipping before them.
_OPTIMIZER_SCOPES = {"LAMB", "AdamW", "Adam", "global_norm", "clip_by_global_norm"}
_OPTIMIZER_TYPE_PREFIXES = ("TfBert>FusedLamb", "ResourceApply", "ApplyAdam")
# The scopes of tfbert's Dense layers (tfbert.modeling.layers.dense) outside the FFN.
_DENSE_SCOPES = {"dense", "query", "key", "value"}


def classify(op_name: str, op_type: str, thread: str, hlo_traced: bool = False) -> str:
    """The category of one profile row.

    Args:
      op_name: the op's name ("gradient_tape/bert/encoder/layer_0/attention/einsum/Einsum"),
        or the event's name for a non-op event ("ExecutorState::Process", "dot.8").
      op_type: the op's type ("Einsum"); "" for a non-op event.
      thread: `thread_kind` of the row's thread.
      hlo_traced: the profile has XLA's HLO instructions (XLA_FLAGS=
        --xla_cpu_enable_xprof_traceme): a cluster's op (_XlaRun) then waits for them.
    Returns: one of CATEGORIES, or WAITING.
    """
    if thread == "python" and op_name == "KernelAndDeviceFunc::Run":
        return WAITING  # the Python thread blocked until the step function returns
    if thread == "xla":
        # HLO instructions of a compiled cluster: "dot.8", "fusion.3", "call.7" (a parallel
        # loop), ... Their TensorFlow ops are not named.
        if op_name.startswith(("dot", "convolution")) and _HLO_EVENT.fullmatch(op_name):
            return "matmul"
        return "XLA clusters"
    if hlo_traced and op_type == "_XlaRun":
        return WAITING
    if (thread == "data" or op_name.startswith(("Iterator::", "IteratorGetNext"))
            or op_type.startswith(("IteratorGetNext", "MultiDeviceIteratorGetNext"))):
        return "data pipeline"
    if not op_type:
        return "framework"  # executor bookkeeping, eager dispatch, the Python loop
    if op_type.startswith(("Horovod", "Collective", "Nccl")):
        return "collectives"
    if op_type in _XLA_TYPES:
        return "XLA clusters"  # --xla=auto: compiled ops, opaque to the host tracer
    scopes = op_name.split("/")
    scope_set = set(scopes)
    if op_type.startswith(_OPTIMIZER_TYPE_PREFIXES) or scope_set & _OPTIMIZER_SCOPES:
        return "optimizer"
    # By type first: a matmul, cast or transpose is one whatever layer it belongs to, and the
    # fused softmax op draws the attention dropout mask itself.
    if op_type in _MATMUL_TYPES:
        return "matmul"
    if op_type in _CAST_TYPES:
        return "casts"
    if op_type in _TRANSPOSE_TYPES:
        return "transposes"  # attention heads split and merged, and their gradients
    if op_type in _SOFTMAX_TYPES:
        return "attention softmax"
    if "LayerNorm" in op_type or "LayerNorm" in scope_set:
        return "LayerNorm"
    if "Gelu" in op_type or op_type == "Erf" or "Gelu" in scope_set:
        return "GELU"  # the FFN's, and the MLM head transform's
    if (op_type.startswith(_RANDOM_TYPES) or "Dropout" in op_type
            or any("dropout" in s for s in scopes)):
        return "dropout"  # with --fused_bias_dropout_add, also the bias and residual adds
    if "intermediate" in scope_set:
        return "GELU"  # the FFN activation and its bias add (the fused op does both)
    if scope_set & _DENSE_SCOPES:
        return "bias adds"  # and their gradients (a Sum over rows)
    if "self" in scope_set and scopes[scopes.index("self") + 1:][:1] == ["add"]:
        return "bias adds"  # --fused_qkv: the one bias add of Q, K and V, and its gradient
    if "attention" in scope_set:
        below = scopes[scopes.index("attention") + 1]
        if below not in ("self", "output", "output_1"):
            # The attention core besides its matmuls: query scaling, mask, softmax and its
            # gradient; not the residual add before the LayerNorm (attention/output_1/add).
            return "attention softmax"
    if op_type in _LOSS_TYPES or "cls" in scopes[:2]:  # cls/..., gradient_tape/cls/...
        return "heads and loss"
    return "other"


def input_bytes(shape_stat: str) -> int:
    """Bytes of an op's inputs from the profiler's "shape" stat, e.g.
    "(float[16,128,256];float[256,256])" -> 4 * (16*128*256 + 256*256)."""
    total = 0
    for dtype, dims in _SHAPE_ITEM.findall(shape_stat):
        elements = 1
        for dim in filter(None, dims.split(",")):
            elements *= int(dim)
        total += elements * _DTYPE_BYTES.get(dtype, 0)
    return total


def thread_kind(line_name: str) -> str:
    """"python", "data" (tf.data's threads), "xla" (XLA's CPU executable threads) or
    "compute" (the executor's: the step's ops)."""
    if line_name == "python":
        return "python"
    if line_name.startswith("host_executor"):
        return "xla"
    return "data" if line_name.startswith("tf_data") else "compute"


def read_host_ops(xplane_path: str) -> tuple[pd.DataFrame, list[tuple[int, int]]]:
    """Self time per op (and per non-op event) of the host plane of an XSpace file.

    Returns:
      (rows, steps): rows a DataFrame with columns op_name, op_type ("" for non-op events),
      thread ("compute", "data", "python"), self_ps (int, picoseconds, summed over threads and
      occurrences), calls (int), input_bytes (int, summed over calls; 0 where no "shape" stat);
      steps the (start_ps, duration_ps) of each "train" step marker, in order.
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(xplane_path, "rb") as f:
        space.ParseFromString(f.read())
    devices = [p.name for p in space.planes if p.name.startswith("/device:")]
    if devices:
        print(f"warning: the profile has device planes {devices}; their kernels are not read "
              f"(host figures only)", file=sys.stderr)
    hosts = [p for p in space.planes if p.name == "/host:CPU"]
    if not hosts:
        raise RuntimeError(f"{xplane_path} has no /host:CPU plane: "
                           f"{[p.name for p in space.planes]}")
    plane = hosts[0]
    names = {i: m.name for i, m in plane.event_metadata.items()}
    stat_names = {i: m.name for i, m in plane.stat_metadata.items()}
    rows: dict[tuple, list[int]] = {}  # key -> [self_ps, calls, input_bytes]
    steps = []
    for line in plane.lines:
        thread = thread_kind(line.name)
        stack: list[tuple[int, tuple]] = []  # open events: (end_ps, the row their time goes to)
        for event in sorted(line.events, key=lambda e: (e.offset_ps, -e.duration_ps)):
            start, end = event.offset_ps, event.offset_ps + event.duration_ps
            while stack and stack[-1][0] <= start:
                stack.pop()
            name = names[event.metadata_id]
            match = _OP_EVENT.match(name)
            key = (match.group(1), match.group(2), thread) if match else (name, "", thread)
            if thread == "python" and name == "train":
                stats = {stat_names.get(s.metadata_id): s for s in event.stats}
                if "step_num" in stats:
                    steps.append((start, event.duration_ps))
            parent_end, parent_owner = stack[-1] if stack else (None, None)
            # A non-op event inside an op (its owner has an op type) is that op's own work;
            # anything else is a row of its own.
            owner = parent_owner if (parent_owner and not match and parent_owner[1]) else key
            row = rows.setdefault(owner, [0, 0, 0])
            row[0] += event.duration_ps
            if owner == key:
                row[1] += 1
            if match and match.group(2) not in _VIEW_TYPES:
                for stat in event.stats:
                    if stat_names.get(stat.metadata_id) == "shape":
                        # Repeated strings are interned: ref_value names a stat_metadata entry.
                        value = (stat_names.get(stat.ref_value, "")
                                 if stat.WhichOneof("value") == "ref_value" else stat.str_value)
                        row[2] += input_bytes(value)
            if parent_owner is not None:
                # Clipped to the parent: events of one thread nest, but a parent's end and a
                # child's may disagree by the clock's resolution.
                rows[parent_owner][0] -= min(end, parent_end) - start
            stack.append((end, owner))
    table = pd.DataFrame([(*key, *values) for key, values in rows.items()],
                         columns=["op_name", "op_type", "thread", "self_ps", "calls",
                                  "input_bytes"])
    return table, sorted(steps)


def layer_pattern(op_name: str) -> str:
    """The op's name with the layer (or Keras optimizer update) index replaced, so that one op
    of every layer adds up: "bert/encoder/layer_3/attention/einsum/Einsum" ->
    "bert/encoder/layer_*/attention/einsum/Einsum", ".../LAMB/update_12/mul" ->
    ".../LAMB/update_*/mul"."""
    return re.sub(r"\bupdate(_\d+)?/", "update_*/", re.sub(r"layer_\d+", "layer_*", op_name))


# --------------------------------------------------------------------------------------------

def build_trainer(run_flags: list[str], output_dir: str):
    """tfbert.run's flags -> (Config, Trainer), as `tfbert.run.train` builds them (no Horovod:
    one process). `output_dir` is used unless the flags give --output_dir."""
    from absl import flags

    from tfbert import run as tfbert_run

    flag_values = flags.FlagValues()
    tfbert_run.define_flags(flag_values)
    unparsed = flag_values(tfbert_run.expand_flagfiles(["tfbert.run"] + run_flags))
    if len(unparsed) > 1:
        raise SystemExit(f"unexpected tfbert.run arguments: {unparsed[1:]}")
    if not flag_values["output_dir"].present:
        flag_values.output_dir = output_dir
    if flag_values.xla == "auto":
        from tfbert.training.xla import request_cpu_autoclustering

        request_cpu_autoclustering()  # before TensorFlow is imported (tfbert.training.xla)
    if flag_values.mode == "predict":
        raise SystemExit("profile_step.py profiles training: --mode=predict has no step")

    import tensorflow as tf

    from tfbert.distributed import SingleProcess
    from tfbert.training.trainer import Trainer

    group = SingleProcess()
    config, tokenizer = tfbert_run.build_config(flag_values, group)
    tf.keras.utils.set_random_seed(config.runtime.seed)  # as tfbert.run.train does
    task_data = (tfbert_run.pretraining_data if config.task.is_pretraining
                 else tfbert_run.finetuning_data)
    dataset, _ = task_data(config, tokenizer, group)  # evaluation is not part of the step
    trainer = Trainer(config, dataset, group, tokenizer=tokenizer)
    trainer.restore_or_initialize()
    return config, trainer


def run_steps(trainer, steps: int, marked: bool = False) -> float:
    """Runs `steps` optimizer steps; returns the seconds they took. Reading a step's output
    waits for the step to finish. marked: each step is a "train" step in the profile."""
    import tensorflow as tf

    start = time.perf_counter()
    for step in range(steps):
        if marked:
            with tf.profiler.experimental.Trace("train", step_num=step, _r=1):
                int(trainer.run_step()["nonfinite_streak"])
        else:
            int(trainer.run_step()["nonfinite_streak"])
    return time.perf_counter() - start


def profile(trainer, steps: int, logdir: str, host_tracer_level: int) -> str:
    """Runs `steps` steps under the profiler; returns the path of the XSpace file."""
    import tensorflow as tf

    options = tf.profiler.experimental.ProfilerOptions(
        host_tracer_level=host_tracer_level, python_tracer_level=0, device_tracer_level=1)
    tf.profiler.experimental.start(logdir, options)
    try:
        run_steps(trainer, steps, marked=True)
    finally:
        tf.profiler.experimental.stop()
    paths = glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb"))
    if not paths:
        raise RuntimeError(f"the profiler wrote no .xplane.pb under {logdir}")
    return max(paths, key=os.path.getmtime)


def summarise(rows: pd.DataFrame, steps: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-op rows (ms per step, share, category) and per-category rows, without waiting."""
    rows = rows.copy()
    # XLA's threads also trace their allocator ("MemoryDeallocation") without HLO tracing.
    hlo_traced = bool((rows.loc[rows["thread"] == "xla", "op_name"]
                       .str.fullmatch(_HLO_EVENT.pattern)).any())
    rows["category"] = [classify(n, t, th, hlo_traced) for n, t, th in
                        zip(rows["op_name"], rows["op_type"], rows["thread"])]
    rows = rows[rows["category"] != WAITING]
    rows["ms_per_step"] = rows["self_ps"] / 1e9 / steps
    rows["calls_per_step"] = rows["calls"] / steps
    rows["mb_read_per_step"] = rows["input_bytes"] / 2 ** 20 / steps
    total = rows["ms_per_step"].sum()
    rows["share_%"] = 100 * rows["ms_per_step"] / total
    # Input bytes over self time: how fast an op reads (a memory-bound op's figure of merit).
    rows["gb_per_s_read"] = (rows["input_bytes"] / 1e9) / (rows["self_ps"] / 1e12).where(
        rows["self_ps"] > 0)
    rows = rows.sort_values("ms_per_step", ascending=False).reset_index(drop=True)
    categories = rows.groupby("category").agg(
        ms_per_step=("ms_per_step", "sum"), mb_read_per_step=("mb_read_per_step", "sum"),
        ops_per_step=("calls_per_step", "sum"))
    categories = categories.reindex([c for c in CATEGORIES if c in categories.index])
    categories["share_%"] = 100 * categories["ms_per_step"] / total
    categories["top_op_types"] = [_top_types(rows[rows["category"] == c]) for c in categories.index]
    return rows, categories.reset_index()


def _top_types(rows: pd.DataFrame, count: int = 3) -> str:
    """"Einsum 61.2, MatMul 18.3, ...": the op types (event names of non-op rows) with the most
    time per step."""
    # Non-op events by their last part: "Iterator::Root::Prefetch::ParallelMapV2" ->
    # "ParallelMapV2".
    key = rows["op_type"].where(rows["op_type"] != "",
                                rows["op_name"].str.split("::").str[-1])
    sums = rows["ms_per_step"].groupby(key).sum().nlargest(count)
    return ", ".join(f"{name} {ms:.1f}" for name, ms in sums.items())


def top_patterns(rows: pd.DataFrame, by: str, top: int) -> pd.DataFrame:
    """The top `top` ops by `by` ("ms_per_step" or "mb_read_per_step"), one row per op of all
    layers together (`layer_pattern`)."""
    grouped = (rows.assign(op=[layer_pattern(n) for n in rows["op_name"]])
               .groupby(["op", "op_type", "category"], as_index=False)
               .agg(ms_per_step=("ms_per_step", "sum"), calls_per_step=("calls_per_step", "sum"),
                    mb_read_per_step=("mb_read_per_step", "sum"), share_pct=("share_%", "sum")))
    grouped["gb_per_s_read"] = (grouped["mb_read_per_step"] * 2 ** 20 / 1e9
                                / (grouped["ms_per_step"] / 1e3))
    return (grouped.sort_values(by, ascending=False).head(top).reset_index(drop=True)
            .rename(columns={"share_pct": "share_%"}))


def chart(categories: pd.DataFrame, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = categories.iloc[::-1]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(data) + 1.2))
    ax.barh(data["category"], data["ms_per_step"], color="tab:blue")
    for y, (ms, share) in enumerate(zip(data["ms_per_step"], data["share_%"])):
        ax.text(ms, y, f" {ms:.1f} ms ({share:.0f}%)", va="center", fontsize=8)
    ax.set_xlabel("thread time per step (ms)")
    ax.set_title("\n".join(textwrap.fill(line, 90) for line in title.splitlines()), fontsize=9)
    ax.set_xlim(0, data["ms_per_step"].max() * 1.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_report(summary: dict, categories: pd.DataFrame, ops: pd.DataFrame, top: int,
                    bytes_known: bool) -> str:
    """The printed report: the summary lines, the category table and the top-op tables."""
    time_columns = ["op", "op_type", "category", "ms_per_step", "share_%", "calls_per_step"]
    if bytes_known:
        time_columns += ["mb_read_per_step", "gb_per_s_read"]
    timed = summary["timed_steps"]
    lines = [
        f"## Training step profile: {summary['setup']}",
        "",
        f"- device: {summary['device']}; {summary['profiled_steps']} profiled steps after "
        f"{summary['warmup_steps']} warm-up steps",
        f"- step: {summary['step_ms']:.1f} ms, {summary['examples_per_sec']:.2f} examples/s "
        f"({f'{timed} steps timed without the profiler' if timed else 'the profiled steps'}); "
        f"under the profiler {summary['profiled_step_ms']:.1f} ms",
        f"- thread time: {summary['thread_ms_per_step']:.1f} ms per step, "
        f"{summary['thread_ms_per_step'] / summary['profiled_step_ms']:.2f}x the profiled wall "
        f"time (the executor runs ops side by side on its threads)",
        f"- model FLOPs: {summary['model_gflop_per_example']:.3f} GFLOP per example (3x "
        f"forward); {summary['compute_dtype']} matmul peak {summary['matmul_peak_gflops']:.1f} "
        f"GFLOP/s ({summary['peak_size']}^2 matmul, median; cached)",
        f"- **MFU: {100 * summary['mfu']:.1f}%** ({summary['model_gflops']:.1f} GFLOP/s of "
        f"model FLOPs)",
        "",
        "### Time per category (thread time per step)",
        "",
        categories.to_markdown(index=False, floatfmt=".2f"),
        "",
        f"### Top {top} ops by self time (all layers of an op together)",
        "",
        top_patterns(ops, "ms_per_step", top)[time_columns].to_markdown(index=False,
                                                                         floatfmt=".2f"),
    ]
    if bytes_known:
        lines += ["", f"### Top {top} ops by bytes read (inputs; outputs are not recorded)", "",
                  top_patterns(ops, "mb_read_per_step", top)[time_columns].to_markdown(
                      index=False, floatfmt=".2f")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        usage="%(prog)s [options] -- [tfbert.run flags]")
    parser.add_argument("--steps", type=int, default=10, help="profiled steps")
    parser.add_argument("--warmup_steps", type=int, default=3,
                        help="untimed steps first (the first traces and compiles)")
    parser.add_argument("--timed_steps", type=int, default=None,
                        help="steps timed without the profiler, for examples/s and MFU "
                             "(default: --steps; 0: time the profiled steps)")
    parser.add_argument("--host_tracer_level", type=int, default=3, choices=(1, 2, 3),
                        help="3: every op, with input shapes (bytes read); 2: expensive ops "
                             "only, less overhead")
    parser.add_argument("--top", type=int, default=15, help="rows of the top-op tables")
    parser.add_argument("--peak_size", type=int, default=2048,
                        help="side of the square matmul whose FLOP/s is the peak (float16 on "
                             "a CPU is emulated, ~100x slower: give e.g. 512)")
    parser.add_argument("--refresh_peak", action="store_true",
                        help="measure the matmul peak again instead of reading the cache")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "runs", "bench", "profile_step"),
                        help="output prefix: PREFIX_ops.csv, PREFIX_categories.csv, PREFIX.md, "
                             "PREFIX.png, PREFIX_trace/")
    argv = sys.argv[1:]
    run_flags = []
    if "--" in argv:
        argv, run_flags = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    args = parser.parse_args(argv)
    if args.steps <= 0 or args.warmup_steps <= 0:
        parser.error("--steps and --warmup_steps must be positive (the first step compiles)")
    timed_steps = args.steps if args.timed_steps is None else args.timed_steps
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

    with tempfile.TemporaryDirectory() as tmp:
        config, trainer = build_trainer(run_flags, os.path.join(tmp, "run"))

        from tfbert.training import flops

        run_steps(trainer, args.warmup_steps)
        timed_seconds = run_steps(trainer, timed_steps) if timed_steps else None
        logdir = args.out + "_trace"
        shutil.rmtree(logdir, ignore_errors=True)  # one profile per prefix
        xplane = profile(trainer, args.steps, logdir, args.host_tracer_level)

    raw, step_markers = read_host_ops(xplane)
    if len(step_markers) != args.steps:
        raise RuntimeError(f"expected {args.steps} step markers in {xplane}, found "
                           f"{len(step_markers)}")
    ops, categories = summarise(raw, args.steps)
    profiled_step_s = sum(d for _, d in step_markers) / 1e12 / args.steps

    runtime, data = config.runtime, config.data
    examples_per_step = data.train_batch_size * config.distribution.num_accumulation_steps
    step_s = timed_seconds / timed_steps if timed_steps else profiled_step_s
    examples_per_sec = examples_per_step / step_s
    flops_per_example = flops.model_flops_per_example(
        config.model, data.max_seq_length, data.max_predictions_per_seq)
    dtype = flops.COMPUTE_DTYPES[runtime.precision]
    peak = flops.matmul_peak(dtype, args.peak_size, refresh=args.refresh_peak)
    mfu = examples_per_sec * flops_per_example / peak
    model = config.model
    setup = (f"{model.num_hidden_layers}x{model.hidden_size} (I={model.intermediate_size}, "
             f"V={model.vocab_size}), batch {data.train_batch_size} x {data.max_seq_length}, "
             f"P={data.max_predictions_per_seq}, {runtime.precision}, xla={runtime.xla}, "
             f"{config.optimizer.optimizer}"
             + "".join(f", {flag}" for flag in config.ops.enabled_flags())
             + (", --gelu_save_derivative" if config.ops.gelu_save_derivative else "")
             + (", --fused_qkv" if config.ops.fused_qkv else ""))
    summary = dict(
        setup=setup, run_flags=" ".join(run_flags), warmup_steps=args.warmup_steps,
        profiled_steps=args.steps, timed_steps=timed_steps, step_ms=1e3 * step_s,
        profiled_step_ms=1e3 * profiled_step_s, examples_per_sec=examples_per_sec,
        thread_ms_per_step=float(ops["ms_per_step"].sum()),
        model_gflop_per_example=flops_per_example / 1e9,
        model_gflops=examples_per_sec * flops_per_example / 1e9, compute_dtype=dtype,
        matmul_peak_gflops=peak / 1e9, peak_size=args.peak_size, mfu=mfu,
        device=flops.device_description(), host_tracer_level=args.host_tracer_level,
        xplane=xplane)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    ops.to_csv(args.out + "_ops.csv", index=False)
    categories.to_csv(args.out + "_categories.csv", index=False)
    with open(args.out + "_summary.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    text = markdown_report(summary, categories, ops, args.top,
                           bytes_known=args.host_tracer_level >= 3)
    with open(args.out + ".md", "w", encoding="utf-8") as f:
        f.write(text)
    chart(categories, args.out + ".png", f"{setup}\nMFU {100 * mfu:.1f}%, "
                                         f"{summary['step_ms']:.0f} ms per step")
    print(text)
    print(f"CSV: {args.out}_ops.csv, {args.out}_categories.csv\nChart: {args.out}.png\n"
          f"Profile: {logdir}", flush=True)


if __name__ == "__main__":
    main()
