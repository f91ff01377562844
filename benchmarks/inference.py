"""The notes' distillation table: size, latency and throughput of a teacher and its student.

    python benchmarks/inference.py                  # random base teacher, 2-layer student
    python benchmarks/inference.py --teacher=runs/teacher --student=runs/student
    python benchmarks/inference.py --teacher_model=tiny --student_layers=1 --seq_length=128

The notes measure DistilRuBERT-small: a 12-layer, 768-hidden teacher against a 2-layer student
of the same width, vocabulary 119547, on random sequences of 512 tokens. --teacher and --student
take any checkpoint `tfbert.checkpoints.load_pretrained` reads (a tfbert run directory, a
HuggingFace or a google-research/bert directory). Without them, random-weight models of the
notes' shapes (--teacher_model, the student with --student_layers of its layers) are written as
HuggingFace checkpoints to a temporary directory first, so that their sizes and their loading
are those of real checkpoints.

Sizes are in MiB (2**20 bytes: the notes' 679 MB is the ~178M float32 parameters of the
teacher's pretraining checkpoint): the checkpoint as stored (a tfbert run's latest ckpt-N.*,
HuggingFace's *.safetensors or pytorch_model.bin, google's bert_model.ckpt.*), and the SavedModel
that `tfbert.checkpoints.export` writes (the encoder alone: no pretraining heads). A tfbert run's
checkpoint also holds the optimizer's slots, about three times the weights: convert it with
`python -m tfbert.tools.convert --to=huggingface` to compare the weights alone.

Timing: the encoder of `load_pretrained(path, precision=...)`, called in one tf.function (traced
once for both batch sizes, training=False) on random valid token ids with a full input mask.
Latency is the seconds per call at --latency_batch, throughput the samples/s at
--throughput_batch. --warmup untimed calls per model, then --repeats timed calls, alternating
teacher and student so that the machine's noise hits both alike; the table shows the median,
the CSV the min and max too. The precision is set per model by `load_pretrained`, not through
Keras' global policy, so one run cannot leak into the next. The CPU is always measured, the GPU
too when TensorFlow sees one. On a CPU without bfloat16 instructions (AVX-512 BF16, AMX)
bfloat16 matmuls are emulated: bf16 then measures the emulation, not the model.

Writes OUTPUT_DIR/inference.csv (one row per model x precision x device), inference.md (the
notes' layout plus the student-vs-teacher ratios, the notes' own figures below) and
inference.png; prints the Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import glob
import math
import os
import statistics
import sys
import tempfile
import textwrap
import time

import pandas as pd

from jobs import REPO_ROOT

sys.path.insert(0, REPO_ROOT)
# tfbert before TensorFlow: importing it sets TensorFlow's environment (oneDNN).
from tfbert import checkpoints  # noqa: E402
from tfbert.checkpoints import google, huggingface  # noqa: E402
from tfbert.checkpoints.export import export  # noqa: E402
from tfbert.config import MODEL_PRESETS, ModelConfig  # noqa: E402

import tensorflow as tf  # noqa: E402

MIB = 2 ** 20
MODELS = ("teacher", "student")
PRECISIONS = ("fp32", "bf16", "fp16")
# The notes' table (DistilRuBERT-small, their machine), shown beside ours in inference.md.
NOTES_TABLE = """\
| Model | Size, Mb. | CPU latency, sec.| GPU latency, sec. | CPU throughput, samples/sec. | GPU throughput, samples/sec. |
|---|---|---|---|---|---|
| Teacher | 679 | 0.655 | 0.031 | 0.3754 | 36.4902 |
| Student | 409 | 0.1656 | 0.015 | 0.9692 | 71.3553 |"""


def write_random_model(config: ModelConfig, directory: str) -> str:
    """A random-weight BertPretrainer of `config`, written as a HuggingFace checkpoint (heads
    included, as in a pretraining checkpoint). Returns `directory`."""
    from tfbert.checkpoints.pretrained import model_arrays
    from tfbert.modeling.layers.dropout import DropoutRng
    from tfbert.modeling.models.bert_pretrainer import BertPretrainer

    model = BertPretrainer(config, rng=DropoutRng(0))
    model.build()
    # HuggingFace rather than google: google's format has no exact (erf) "gelu".
    huggingface.write(directory, config, model_arrays(model))
    return directory


def random_checkpoints(preset: str, vocab_size: int, student_layers: int,
                       directory: str) -> dict[str, str]:
    """{"teacher": dir, "student": dir}: the preset's shape, and that shape with fewer layers."""
    teacher = ModelConfig(vocab_size=vocab_size, **MODEL_PRESETS[preset])
    student = dataclasses.replace(teacher, num_hidden_layers=student_layers)
    return {name: write_random_model(config, os.path.join(directory, name))
            for name, config in (("teacher", teacher), ("student", student))}


def checkpoint_files(path: str) -> list[str]:
    """The weight files of the checkpoint at `path` (not its config or tokenizer files)."""
    fmt = checkpoints.detect_format(path)
    if fmt == "huggingface":
        # One model.safetensors, or the shards its index names; else PyTorch's file.
        return (sorted(glob.glob(os.path.join(path, "*.safetensors")))
                or [os.path.join(path, huggingface.PYTORCH_FILE)])
    prefix = (google.checkpoint_prefix(path) if fmt == "google"
              else checkpoints.latest_checkpoint(path))
    return sorted(glob.glob(glob.escape(prefix) + ".*"))


def directory_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(directory) for name in names)


def checkpoint_params(path: str) -> int | None:
    """Parameters stored in the checkpoint (weights only, not optimizer slots); None for a
    tfbert 0.1 object-based checkpoint, whose tensors are not listed by name."""
    weights = checkpoints.open_pretrained(path).weights
    return None if weights is None else sum(math.prod(s) for s in weights.shapes.values())


def measure_sizes(paths: dict[str, str], work_dir: str) -> dict[str, dict]:
    """{model: sizes and parameter counts}; exports each model to a SavedModel for its size."""
    sizes = {}
    for name, path in paths.items():
        savedmodel = os.path.join(work_dir, f"{name}-savedmodel")
        export(path, savedmodel, "savedmodel")
        sizes[name] = dict(
            size_checkpoint_mb=sum(os.path.getsize(f) for f in checkpoint_files(path)) / MIB,
            size_savedmodel_mb=directory_bytes(savedmodel) / MIB,
            checkpoint_params=checkpoint_params(path))
        gc.collect()  # export held two copies of the model
    return sizes


def inference_function(encoder):
    """`encoder` in a tf.function over int32 [batch, seq] ids, mask and segment ids, returning
    a float32 scalar. One input signature with unknown batch and length: traced once."""
    spec = tf.TensorSpec([None, None], tf.int32)

    @tf.function(input_signature=[spec, spec, spec])
    def infer(input_ids, input_mask, segment_ids):
        outputs = encoder(dict(input_ids=input_ids, input_mask=input_mask,
                               segment_ids=segment_ids), training=False)
        # Reading one scalar back waits for the whole computation (a GPU runs asynchronously)
        # without timing a [B, S, D] copy to the host; it depends on every output, so no part
        # of the encoder can be pruned from the graph.
        return sum(tf.reduce_sum(tf.cast(value, tf.float32)) for value in outputs.values())

    return infer


def random_batch(batch: int, seq_length: int, vocab_size: int, seed: int) -> tuple:
    """Valid random token ids, a full mask and one segment, int32 [batch, seq_length] each."""
    ids = tf.random.Generator.from_seed(seed).uniform([batch, seq_length], 0, vocab_size,
                                                      tf.int32)
    return ids, tf.ones_like(ids), tf.zeros_like(ids)


def time_calls(functions: dict, inputs: tuple, warmup: int, repeats: int) -> dict[str, list]:
    """{model: seconds of each timed call}. The models take turns call by call."""
    for function in functions.values():
        for _ in range(warmup):  # tracing and first-call allocations: not timed
            function(*inputs).numpy()
    seconds = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function(*inputs).numpy()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def measure(paths: dict[str, str], precision: str, device: str, args) -> dict[str, dict]:
    """{model: timing figures} for both models at one precision on one device."""
    with tf.device(device):  # the variables too: a call must not copy weights across devices
        loaded = {name: checkpoints.load_pretrained(path, precision=precision)
                  for name, path in paths.items()}
        # Ids valid for both models (a student may have a smaller vocabulary).
        vocab = min(config.vocab_size for _, config in loaded.values())
        functions = {name: inference_function(encoder) for name, (encoder, _) in loaded.items()}
        latency = time_calls(functions, random_batch(args.latency_batch, args.seq_length,
                                                     vocab, seed=1), args.warmup, args.repeats)
        throughput = time_calls(functions, random_batch(args.throughput_batch, args.seq_length,
                                                        vocab, seed=2), args.warmup,
                                args.repeats)
    figures = {}
    for name, (encoder, config) in loaded.items():
        samples_per_s = [args.throughput_batch / s for s in throughput[name]]
        figures[name] = dict(
            layers=config.num_hidden_layers, hidden=config.hidden_size,
            vocab_size=config.vocab_size,
            params=sum(v.shape.num_elements() for v in encoder.variables),
            latency_s=statistics.median(latency[name]), latency_min_s=min(latency[name]),
            latency_max_s=max(latency[name]),
            throughput=statistics.median(samples_per_s), throughput_min=min(samples_per_s),
            throughput_max=max(samples_per_s),
            traces=functions[name].experimental_get_tracing_count())
    return figures


def devices() -> list[tuple[str, str]]:
    """[(label, TensorFlow device)]: the CPU, and the first GPU when there is one."""
    found = [("CPU", "/CPU:0")]
    if tf.config.list_physical_devices("GPU"):
        found.append(("GPU", "/GPU:0"))
    return found


def run(paths: dict[str, str], args, work_dir: str) -> pd.DataFrame:
    for name, path in paths.items():  # before the exports and loads, which take minutes
        config = checkpoints.open_pretrained(path).model_config
        if args.seq_length > config.max_position_embeddings:
            raise SystemExit(f"--seq_length={args.seq_length} is longer than the {name}'s "
                             f"max_position_embeddings={config.max_position_embeddings}")
    sizes = measure_sizes(paths, work_dir)
    rows = []
    for label, device in devices():
        for precision in args.precisions:
            print(f"timing {precision} on the {label}", flush=True)
            figures = measure(paths, precision, device, args)
            for name in MODELS:
                rows.append(dict(model=name, precision=precision, device=label,
                                 path=args.teacher if name == "teacher" else args.student,
                                 seq_length=args.seq_length, latency_batch=args.latency_batch,
                                 throughput_batch=args.throughput_batch, warmup=args.warmup,
                                 repeats=args.repeats, **sizes[name], **figures[name]))
                print(f"done: {name} {precision} {label}: latency {rows[-1]['latency_s']:.4f} s, "
                      f"{rows[-1]['throughput']:.3f} samples/s", flush=True)
            # measure() has let go of both models: free them before the next pair is loaded.
            tf.keras.backend.clear_session()
            gc.collect()
    return pd.DataFrame(rows)


def markdown_table(table: pd.DataFrame) -> str:
    """The notes' layout, one block of rows per precision, with the student-vs-teacher row."""
    labels = list(dict.fromkeys(table["device"]))
    header = (["Model", "Precision", "Size, MiB", "SavedModel, MiB"]
              + [f"{d} latency, sec." for d in labels]
              + [f"{d} throughput, samples/sec." for d in labels])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for precision in dict.fromkeys(table["precision"]):
        rows = table[table["precision"] == precision].set_index(["model", "device"])
        for name in MODELS:
            first = rows.loc[(name, labels[0])]
            cells = [name.capitalize(), precision, f"{first['size_checkpoint_mb']:.1f}",
                     f"{first['size_savedmodel_mb']:.1f}"]
            cells += [f"{rows.loc[(name, d), 'latency_s']:.4f}" for d in labels]
            cells += [f"{rows.loc[(name, d), 'throughput']:.4f}" for d in labels]
            lines.append("| " + " | ".join(cells) + " |")
        teacher, student = rows.loc["teacher"], rows.loc["student"]
        cells = ["Student vs teacher", precision,
                 f"{student['size_checkpoint_mb'].iloc[0] / teacher['size_checkpoint_mb'].iloc[0]:.2f}x",
                 f"{student['size_savedmodel_mb'].iloc[0] / teacher['size_savedmodel_mb'].iloc[0]:.2f}x"]
        cells += [f"{teacher.loc[d, 'latency_s'] / student.loc[d, 'latency_s']:.2f}x faster"
                  for d in labels]
        cells += [f"{student.loc[d, 'throughput'] / teacher.loc[d, 'throughput']:.2f}x"
                  for d in labels]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(table: pd.DataFrame, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = list(dict.fromkeys(zip(table["device"], table["precision"])))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.38
    for ax, column, ylabel in ((axes[0], "latency", "latency, s (median; min-max)"),
                               (axes[1], "throughput", "throughput, samples/s (median; min-max)")):
        median = "latency_s" if column == "latency" else "throughput"
        low, high = (("latency_min_s", "latency_max_s") if column == "latency"
                     else ("throughput_min", "throughput_max"))
        for offset, name in ((-width / 2, "teacher"), (width / 2, "student")):
            rows = table[table["model"] == name].set_index(["device", "precision"]).loc[setups]
            errors = [rows[median] - rows[low], rows[high] - rows[median]]
            ax.bar([i + offset for i in range(len(setups))], rows[median], width, yerr=errors,
                   capsize=3, label=name)
        ax.set_xticks(range(len(setups)))
        ax.set_xticklabels([f"{device} {precision}" for device, precision in setups])
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(title, 120)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None, help="teacher checkpoint (any format)")
    parser.add_argument("--student", default=None, help="student checkpoint (any format)")
    parser.add_argument("--teacher_model", default="base", choices=sorted(MODEL_PRESETS),
                        help="without --teacher/--student: the random teacher's shape")
    parser.add_argument("--student_layers", type=int, default=2,
                        help="without --teacher/--student: the random student's layers")
    parser.add_argument("--vocab_size", type=int, default=119547,
                        help="without --teacher/--student: the random models' vocabulary")
    parser.add_argument("--seq_length", type=int, default=512)
    parser.add_argument("--latency_batch", type=int, default=1)
    parser.add_argument("--throughput_batch", type=int, default=16)
    parser.add_argument("--precisions", default="fp32,bf16", help=f"of {PRECISIONS}")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per model")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per model")
    parser.add_argument("--output_dir", default=os.path.join(REPO_ROOT, "runs", "bench",
                                                             "inference"))
    args = parser.parse_args()

    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = sorted(set(args.precisions) - set(PRECISIONS))
    if unknown or not args.precisions:
        parser.error(f"--precisions: {unknown or 'none given'}; choose from {PRECISIONS}")
    if (args.teacher is None) != (args.student is None):
        parser.error("give both --teacher and --student, or neither (random models)")
    for name in ("student_layers", "seq_length", "latency_batch", "throughput_batch",
                 "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work_dir:
        if args.teacher is None:
            paths = random_checkpoints(args.teacher_model, args.vocab_size, args.student_layers,
                                       work_dir)
            source = (f"random {args.teacher_model} teacher, {args.student_layers}-layer student, "
                      f"vocabulary {args.vocab_size}")
        else:
            paths = dict(teacher=args.teacher, student=args.student)
            source = f"teacher {args.teacher}, student {args.student}"
        table = run(paths, args, work_dir)

    os.makedirs(args.output_dir, exist_ok=True)
    csv, md, png = (os.path.join(args.output_dir, f"inference.{ext}")
                    for ext in ("csv", "md", "png"))
    table.to_csv(csv, index=False)
    gpu = "" if "GPU" in set(table["device"]) else "; no GPU found, not measured"
    title = (f"{source}; seq_length {args.seq_length}; latency at batch {args.latency_batch}, "
             f"throughput at batch {args.throughput_batch}; median of {args.repeats} calls "
             f"after {args.warmup} warm-up calls, teacher and student alternating; "
             f"{os.cpu_count()} CPU cores{gpu}")
    markdown = (f"{title}.\n\n{markdown_table(table)}\n\nSizes in MiB (2**20 bytes): the "
                f"checkpoint as stored, and its SavedModel export (the encoder alone). Student "
                f"vs teacher: sizes as the student's fraction, latency and throughput as the "
                f"student's speed-up. Min and max of each figure are in inference.csv.\n\n"
                f"The notes' figures (DistilRuBERT-small, their machine):\n\n{NOTES_TABLE}")
    with open(md, "w", encoding="utf-8") as f:
        f.write(markdown + "\n")
    chart(table, png, title)
    print("\n" + markdown)
    print(f"\nCSV: {csv}\nTable: {md}\nChart: {png}\nWall time: "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
