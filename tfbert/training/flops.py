"""Model FLOPs of a pretraining example and the matmul peak of a device: the two halves of the
model FLOPs utilisation (MFU) of a training step.

    MFU = examples/s * model_flops_per_example(...) / matmul_peak(compute dtype)

"Model FLOPs" count the matrix multiplications the model needs, as in the PaLM paper's MFU:
one multiply-add is 2 FLOPs, the backward pass costs twice the forward pass, and work that an
implementation adds (recomputation, casts, softmax, LayerNorm, elementwise ops) is not counted.
So MFU compares implementations of the same model; it does not measure how busy the hardware is.

The peak is measured, not read from a data sheet: the FLOP/s of one large square matmul in the
step's compute dtype on this device, with TensorFlow's own kernels. On a CPU without bfloat16
matrix instructions that is an emulated bfloat16 matmul, which is what the step runs too.
`matmul_peak` caches it in `$TFBERT_CACHE_DIR/matmul_peak.json`, keyed by device, dtype, size
and TensorFlow version, so a run can report MFU without measuring again.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

from tfbert.config import ModelConfig
from tfbert.modeling.layers.activations import GATED_ACTIVATIONS

# The backward pass of a matmul is two matmuls of the same size (gradients of both operands).
TRAINING_FLOPS_PER_FORWARD_FLOP = 3

PEAK_CACHE_FILE = "matmul_peak.json"
# The dtype of a step's matmuls, by --precision: the peak to compare the step with.
COMPUTE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def forward_flops_by_part(model_config: ModelConfig, seq_length: int, num_predictions: int
                          ) -> dict[str, int]:
    """Forward-pass FLOPs of one pretraining example, by part of the model.

    Shape legend: L layers, S sequence length, D hidden size, I intermediate size, V vocabulary,
    P masked positions (the MLM head runs on those only: `BertPretrainer` gathers them first).

    Args:
      model_config: the encoder's shape (hidden_act "geglu" makes the first FFN projection 2I
        wide).
      seq_length: S, the padded sequence length (padding costs as much as tokens).
      num_predictions: P, masked positions per sequence (--max_predictions_per_seq).
    Returns:
      {part: FLOPs} (Python ints) with parts
        "attention_projections": L * 4 * 2SD^2 (query, key, value, output),
        "attention_scores_context": L * 2 * 2S^2D (QK^T and probs @ V, over all heads),
        "ffn": L * (2SD * I_in + 2SI * D), I_in = 2I for GeGLU else I,
        "mlm_transform": 2PD^2, "mlm_vocab": 2PDV (the tied output embedding),
        "pooler_nsp": 2D^2 + 2 * 2D (pooler dense on [CLS] and the 2-way NSP head).
      Embedding lookups, LayerNorm, softmax, activations and losses are not counted.
    """
    if seq_length <= 0 or num_predictions < 0:
        raise ValueError(f"seq_length must be positive and num_predictions >= 0, got "
                         f"seq_length={seq_length}, num_predictions={num_predictions}")
    layers, s, d = model_config.num_hidden_layers, seq_length, model_config.hidden_size
    i, v, p = model_config.intermediate_size, model_config.vocab_size, num_predictions
    ffn_in_width = 2 * i if model_config.hidden_act in GATED_ACTIVATIONS else i
    return {
        "attention_projections": layers * 4 * 2 * s * d * d,
        "attention_scores_context": layers * 2 * 2 * s * s * d,
        "ffn": layers * (2 * s * d * ffn_in_width + 2 * s * i * d),
        "mlm_transform": 2 * p * d * d,
        "mlm_vocab": 2 * p * d * v,
        "pooler_nsp": 2 * d * d + 2 * d * 2,
    }


def model_flops_per_example(model_config: ModelConfig, seq_length: int, num_predictions: int,
                            training: bool = True) -> int:
    """Model FLOPs of one pretraining example (see `forward_flops_by_part`).

    Args:
      model_config, seq_length, num_predictions: as `forward_flops_by_part`.
      training: forward + backward (3x the forward FLOPs); False: the forward pass alone.
    Returns: FLOPs as a Python int. The mini model (4 x 256, I=1024, V=8000) at S=128, P=20
      needs about 2.87 GFLOP per training example.
    """
    forward = sum(forward_flops_by_part(model_config, seq_length, num_predictions).values())
    return forward * (TRAINING_FLOPS_PER_FORWARD_FLOP if training else 1)


# --------------------------------------------------------------------------------------------
# The matmul peak.

def _dtype_name(dtype) -> str:
    import tensorflow as tf

    name = tf.as_dtype(dtype).name
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"matmul peak: dtype must be float32, bfloat16 or float16, got {name}")
    return name


def measure_matmul_peak(dtype="bfloat16", size: int = 2048, device: str | None = None,
                        repeats: int = 10, warmup: int = 2) -> float:
    """The achieved FLOP/s of a [size, size] @ [size, size] matmul in `dtype`.

    The matmul runs inside a tf.function (the training step's execution path), `warmup` times
    untimed (first call traces, oneDNN picks its kernels), then `repeats` times timed one by
    one; the median is taken so that one preempted call on a shared machine does not count.
    Only one element of the product comes back to Python, to synchronise without copying it.

    Args:
      dtype: "float32", "bfloat16" or "float16" (or the tf.DType).
      size: the matrices' side; 2 * size^3 FLOPs per call.
      device: a TensorFlow device ("/CPU:0", "/GPU:0"); None: TensorFlow's default placement.
      repeats, warmup: timed and untimed calls.
    Returns: FLOP/s (a positive float).
    """
    import tensorflow as tf

    dtype = tf.as_dtype(_dtype_name(dtype))
    if size <= 0 or repeats <= 0:
        raise ValueError(f"size and repeats must be positive, got {size}, {repeats}")
    with tf.device(device):
        generator = tf.random.Generator.from_seed(0)
        # Values in [-1, 1): a product of size terms stays finite in float16.
        a = tf.cast(generator.uniform([size, size], -1.0, 1.0), dtype)
        b = tf.cast(generator.uniform([size, size], -1.0, 1.0), dtype)

        @tf.function
        def matmul(a, b):
            return tf.matmul(a, b)[0, 0]

        for _ in range(warmup):
            matmul(a, b).numpy()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(a, b).numpy()
            seconds.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(seconds)


def device_description(device: str | None = None) -> str:
    """A name for the device's speed class: the GPU's model, or the CPU's model with the number
    of cores this process may use (the matmul uses all of them)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if device is None:
        device = "/GPU:0" if gpus else "/CPU:0"  # TensorFlow's default placement
    spec = tf.DeviceSpec.from_string(device)
    if (spec.device_type or "").upper() == "GPU":
        gpu = gpus[spec.device_index or 0]
        details = tf.config.experimental.get_device_details(gpu)
        return f"GPU {details.get('device_name', gpu.name)}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU {model} x{cores}"


def _cache_path(cache_dir: str | None) -> str:
    if cache_dir is None:
        from tfbert.data.sample import cache_dir as default_cache_dir

        cache_dir = default_cache_dir()
    return os.path.join(cache_dir, PEAK_CACHE_FILE)


def matmul_peak(dtype="bfloat16", size: int = 2048, device: str | None = None,
                cache_dir: str | None = None, refresh: bool = False) -> float:
    """`measure_matmul_peak`, measured once per device, dtype, size and TensorFlow version and
    then read from `<cache_dir>/matmul_peak.json` ($TFBERT_CACHE_DIR, default ~/.cache/tfbert).

    Args:
      dtype, size, device: as `measure_matmul_peak`.
      cache_dir: where the JSON file lives; None: tfbert's cache directory.
      refresh: measure again and overwrite the cached figure (e.g. measured while the machine
        was busy).
    Returns: FLOP/s.
    """
    import tensorflow as tf

    from tfbert.config import atomic_write_text

    key = f"{device_description(device)} | {_dtype_name(dtype)} | {size} | TF {tf.__version__}"
    path = _cache_path(cache_dir)
    cached = {}
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                cached = json.load(f)
        except (OSError, json.JSONDecodeError):
            cached = {}  # a damaged cache is measured again and rewritten
    if not refresh and key in cached:
        return float(cached[key]["flops_per_sec"])
    flops_per_sec = measure_matmul_peak(dtype, size, device)
    cached[key] = dict(flops_per_sec=flops_per_sec, measured=time.strftime("%Y-%m-%d %H:%M:%S"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps(cached, indent=2, sort_keys=True) + "\n")
    return flops_per_sec
