"""Standalone GPU check of tfbert's CUDA kernels against PyTorch: correctness and bandwidth.

    python tests/gpu/check_kernels.py            # on a machine with a GPU, nvcc and PyTorch

No TensorFlow: the kernels are driven through their C ABI (custom_ops/cuda/<op>_launch.h: raw
device pointers, sizes and a cudaStream_t). The script
  1. builds every custom_ops/cuda/*.cu into one shared library with nvcc (build_library),
     and loads it with ctypes, with argtypes parsed from the launch headers;
  2. for each op whose header, source and symbols exist, each dtype (float32, float16,
     bfloat16) and small odd shapes plus BERT shapes, calls the launch functions on torch CUDA
     tensors and compares with a float64 torch reference (autograd for the backward passes);
  3. times the kernels (CUDA events, warm-up, L2 flushed, median) against the PyTorch
     equivalent at BERT shapes and reports the effective bandwidth against --peak_gbps;
  4. prints a Markdown table and writes a CSV; exits 1 if any correctness check fails.
Without PyTorch or without a GPU it prints why, says "skipped" and exits 0.

Error measure: an output passes when |ours - ref| <= tol * (|ref| + rms(ref)) everywhere, tol
per dtype (TOLERANCE). The rms term keeps elements near zero (cancellation in a backward pass,
sums of many terms) from demanding more than the storage type can hold; the |ref| term keeps
the check relative for large elements. "max error" is the largest |ours - ref| of the output
whose worst ratio to the allowed error is largest (its name in brackets).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import ctypes
import dataclasses
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import traceback

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CUDA_DIR = os.path.join(REPO_ROOT, "custom_ops", "cuda")
DEFAULT_CSV = os.path.join(REPO_ROOT, "runs", "gpu", "check_kernels.csv")

DTYPES = ("float32", "float16", "bfloat16")
SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
# Relative tolerances per storage type: about two half-ulps of a 16-bit output, a few float32
# ulps of accumulated error in float32 (the reference is float64).
TOLERANCE = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2}


def as_float32(x: float) -> float:
    """x rounded to float32 (the kernels' scalar arguments are float32)."""
    return ctypes.c_float(x).value


# H100 SXM5 HBM3. torch.cuda.get_device_properties does not give the memory bandwidth.
DEFAULT_PEAK_GBPS = 3350.0


# --------------------------------------------------------------------------------------------
# Headers: C prototypes -> ctypes signatures.
# --------------------------------------------------------------------------------------------

# Scalar C types of the launch ABI, with a short code used in the expected signatures below.
_SCALARS = {
    "float": ("f", ctypes.c_float),
    "double": ("d", ctypes.c_double),
    "int": ("i", ctypes.c_int),
    "unsigned int": ("u", ctypes.c_uint),
    "long long": ("ll", ctypes.c_longlong),
    "long long int": ("ll", ctypes.c_longlong),
    "int64_t": ("ll", ctypes.c_int64),
    "size_t": ("z", ctypes.c_size_t),
    "bool": ("b", ctypes.c_bool),
    "cudaStream_t": ("s", ctypes.c_void_p),
}
_PROTOTYPE = re.compile(r"cudaError_t\s+(tfbert_\w+)\s*\(([^;{)]*)\)\s*;")
_INLINE = re.compile(r"static\s+inline\s+(long long|int)\s+(tfbert_\w+)\s*\(([^)]*)\)\s*\{")


@dataclasses.dataclass
class Prototype:
    name: str
    codes: tuple  # one short code per parameter: "p" pointer, "f", "i", "ll", "s", ...
    argtypes: tuple
    param_names: tuple


@dataclasses.dataclass
class Header:
    op: str  # "layer_norm" for layer_norm_launch.h
    path: str
    prototypes: dict  # name -> Prototype (the exported launch functions)
    inline: dict  # name -> (return C type, [(C type, name)]) static inline helpers


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _parse_param(param: str):
    """'const unsigned short* x' -> ('p', c_void_p, 'x')."""
    pointer = "*" in param
    words = re.sub(r"\bconst\b", " ", param).replace("*", " ").split()
    if len(words) < 2:
        raise ValueError(f"cannot parse parameter {param!r}")
    ctype, name = " ".join(words[:-1]), words[-1]
    if pointer:
        return "p", ctypes.c_void_p, name
    if ctype not in _SCALARS:
        raise ValueError(f"parameter {param!r}: C type {ctype!r} is not in the harness's table")
    code, argtype = _SCALARS[ctype]
    return code, argtype, name


def parse_header(path: str) -> Header:
    text = _strip_comments(open(path).read())
    prototypes = {}
    for match in _PROTOTYPE.finditer(text):
        params = [p.strip() for p in match.group(2).split(",") if p.strip() not in ("", "void")]
        parsed = [_parse_param(p) for p in params]
        prototypes[match.group(1)] = Prototype(
            match.group(1), tuple(c for c, _, _ in parsed), tuple(a for _, a, _ in parsed),
            tuple(n for _, _, n in parsed))
    inline = {}
    for match in _INLINE.finditer(text):
        params = [p.strip() for p in match.group(3).split(",") if p.strip()]
        typed = [(" ".join(p.split()[:-1]), p.split()[-1]) for p in params]
        inline[match.group(2)] = (match.group(1), typed)
    op = os.path.basename(path)[: -len("_launch.h")]
    return Header(op, path, prototypes, inline)


def discover_headers(cuda_dir: str = CUDA_DIR) -> dict:
    """op -> Header for every <op>_launch.h in cuda_dir (at run time: ops may be added)."""
    headers = {}
    for name in sorted(os.listdir(cuda_dir)):
        if name.endswith("_launch.h"):
            header = parse_header(os.path.join(cuda_dir, name))
            headers[header.op] = header
    return headers


# --------------------------------------------------------------------------------------------
# Build.
# --------------------------------------------------------------------------------------------

INLINE_PREFIX = "tfbert_harness_inline_"  # exported wrappers of the headers' static inlines


@dataclasses.dataclass
class Build:
    library: str  # the .so
    headers: dict  # op -> Header
    compiled: list  # the .cu files (basenames) that compiled and are linked
    errors: dict  # .cu basename -> compiler output, for the files that did not compile


def _inline_exports_source(header: Header) -> str:
    """A .cu that exports each static inline helper of a header (workspace sizes), so the
    harness sizes buffers with the header's own arithmetic rather than a copy of it."""
    lines = [f'#include "{os.path.basename(header.path)}"']
    for name, (ret, params) in header.inline.items():
        decl = ", ".join(f"{t} {n}" for t, n in params)
        call = ", ".join(n for _, n in params)
        lines.append(f'extern "C" {ret} {INLINE_PREFIX}{name}({decl}) {{ return {name}({call}); }}')
    return "\n".join(lines) + "\n"


_HARNESS_EXPORTS = """#include <cuda_runtime.h>
// The error string of a cudaError_t, from the runtime linked into this library.
extern "C" const char* tfbert_harness_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}
"""


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    candidate = "/usr/local/cuda/bin/nvcc"
    return candidate if os.path.exists(candidate) else None


def build_library(build_dir: str, arch: str, cuda_dir: str = CUDA_DIR, nvcc: str | None = None,
                  jobs: int | None = None) -> Build:
    """Compiles every cuda_dir/*.cu (one nvcc per file, in parallel) and links the ones that
    compile into build_dir/libtfbert_kernels.so. arch: nvcc flags, e.g.
    "-gencode arch=compute_90,code=sm_90". A file that does not compile (someone is still
    writing it) is left out and reported in Build.errors; the others are still checked.
    The CUDA runtime is linked statically (nvcc's default), so loading the library does not
    depend on LD_LIBRARY_PATH finding this toolkit's libcudart beside PyTorch's."""
    nvcc = nvcc or _nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (PATH or /usr/local/cuda/bin)")
    os.makedirs(build_dir, exist_ok=True)
    headers = discover_headers(cuda_dir)
    generated = os.path.join(build_dir, "generated")
    os.makedirs(generated, exist_ok=True)
    sources = [os.path.join(cuda_dir, f) for f in sorted(os.listdir(cuda_dir)) if f.endswith(".cu")]
    for header in headers.values():
        path = os.path.join(generated, f"{header.op}_inline_exports.cu")
        with open(path, "w") as f:
            f.write(_inline_exports_source(header))
        sources.append(path)
    path = os.path.join(generated, "harness_exports.cu")
    with open(path, "w") as f:
        f.write(_HARNESS_EXPORTS)
    sources.append(path)

    flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", *shlex.split(arch), "-I", cuda_dir]

    def compile_one(source):
        obj = os.path.join(build_dir, os.path.basename(source) + ".o")
        proc = subprocess.run([nvcc, *flags, "-c", source, "-o", obj], capture_output=True,
                              text=True)
        return source, obj, proc

    objects, compiled, errors = [], [], {}
    with concurrent.futures.ThreadPoolExecutor(jobs or min(8, os.cpu_count() or 1)) as pool:
        for source, obj, proc in pool.map(compile_one, sources):
            if proc.returncode == 0:
                objects.append(obj)
                if not source.startswith(generated):
                    compiled.append(os.path.basename(source))
            else:
                errors[os.path.basename(source)] = (proc.stdout + proc.stderr)[-4000:]
    library = os.path.join(build_dir, "libtfbert_kernels.so")
    if os.path.exists(library):
        os.remove(library)
    link = subprocess.run([nvcc, "-shared", *shlex.split(arch), *objects, "-o", library],
                          capture_output=True, text=True)
    if link.returncode != 0:
        raise RuntimeError(f"linking {library} failed:\n{link.stdout}{link.stderr}")
    return Build(library, headers, compiled, errors)


def default_arch() -> str:
    import torch  # only called on a GPU machine

    major, minor = torch.cuda.get_device_capability()
    return f"-gencode arch=compute_{major}{minor},code=sm_{major}{minor}"


# --------------------------------------------------------------------------------------------
# The loaded library.
# --------------------------------------------------------------------------------------------


class LaunchError(RuntimeError):
    pass


class Kernels:
    """The launch functions of one op, with ctypes signatures from its header."""

    def __init__(self, lib, header: Header):
        self.lib, self.header = lib, header
        self.functions = {}
        for name, proto in header.prototypes.items():
            fn = getattr(lib, name)  # AttributeError: symbol missing
            fn.argtypes, fn.restype = list(proto.argtypes), ctypes.c_int
            self.functions[name] = fn

    def require(self, name: str, codes: str) -> None:
        """Fails (a SKIP of the op) unless the header declares `name` with these parameter
        codes, e.g. "p,p,ll,i,f,p,p,p,s": the checks below are written against that signature."""
        proto = self.header.prototypes.get(name)
        if proto is None:
            raise MissingOp(f"{name} is not declared in {os.path.basename(self.header.path)}")
        if ",".join(proto.codes) != codes:
            raise MissingOp(f"{name}({','.join(proto.codes)}) differs from the signature the "
                            f"harness was written for ({codes}): update tests/gpu/check_kernels.py")

    def __call__(self, name: str, *args) -> None:
        error = self.functions[name](*args)
        if error != 0:
            text = self.lib.tfbert_harness_error_string(error).decode()
            raise LaunchError(f"{name} returned cudaError_t {error} ({text})")

    def inline(self, name: str, *args) -> int:
        fn = getattr(self.lib, INLINE_PREFIX + name)
        ret, params = self.header.inline[name]
        fn.argtypes = [ctypes.c_void_p if "*" in t else _SCALARS[t][1] for t, _ in params]
        fn.restype = _SCALARS[ret][1]
        return fn(*args)


class MissingOp(Exception):
    """An op the harness cannot check (header, source or symbols missing): a SKIP row."""


# --------------------------------------------------------------------------------------------
# Results.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    op: str
    dtype: str
    shape: str
    max_error: float | None = None
    worst: str = ""  # the output with the largest error ratio
    ratio: float | None = None  # its largest |ours - ref| / allowed: passes when <= 1
    passed: bool | None = None  # None: skipped
    ours_ms: float | None = None
    torch_ms: float | None = None
    gbps: float | None = None
    peak_pct: float | None = None
    note: str = ""

    @property
    def status(self) -> str:
        return {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]


class Context:
    def __init__(self, torch, args, peak_gbps):
        self.torch, self.args, self.peak_gbps = torch, args, peak_gbps
        self.rows: list[Row] = []
        self.generator = torch.Generator(device="cuda").manual_seed(0)
        self._flush = None

    def stream(self):
        return ctypes.c_void_p(self.torch.cuda.current_stream().cuda_stream)

    def randn(self, shape, dtype="float32", scale=1.0, offset=0.0):
        t = self.torch.randn(shape, device="cuda", generator=self.generator, dtype=self.torch.float32)
        return (t * scale + offset).to(getattr(self.torch, dtype))

    def compare(self, checks) -> tuple:
        """checks: [(name, ours, ref, tol)] -> (max error of the worst output, its name, pass,
        its largest error / allowed error)."""
        torch = self.torch
        worst_ratio, worst_err, worst_name = -1.0, 0.0, ""
        for name, ours, ref, tol in checks:
            ours, ref = ours.double(), ref.double()
            if ours.shape != ref.shape:
                return math.inf, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}", False, math.inf
            if not torch.isfinite(ours).all():
                return math.inf, f"{name}: non-finite", False, math.inf
            diff = (ours - ref).abs()
            rms = ref.pow(2).mean().sqrt() if ref.numel() else ref.new_zeros(())
            allowed = tol * (ref.abs() + rms)
            ratio = (diff / allowed.clamp_min(1e-300)).max().item() if diff.numel() else 0.0
            if ratio > worst_ratio:
                worst_err = diff.max().item() if diff.numel() else 0.0
                worst_ratio, worst_name = ratio, name
        return worst_err, worst_name, worst_ratio <= 1.0, worst_ratio

    def time_ms(self, fn) -> float:
        """Median of --iters timed calls after --warmup, each on a cold L2 (a 256 MiB buffer is
        written between calls, outside the timed interval: BERT's activations exceed L2 in a
        real step, and an L2-resident rerun would report more than the HBM bandwidth)."""
        torch = self.torch
        if self._flush is None:
            self._flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        for _ in range(self.args.warmup):
            fn()
        times = []
        for _ in range(self.args.iters):
            self._flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def add(self, row: Row, ours=None, theirs=None, nbytes=None):
        """Records a row; times `ours` and `theirs` (callables) when given."""
        if ours is not None and not self.args.no_timing:
            row.ours_ms = self.time_ms(ours)
            if theirs is not None:
                row.torch_ms = self.time_ms(theirs)
            if nbytes:
                row.gbps = nbytes / (row.ours_ms * 1e-3) / 1e9
                row.peak_pct = 100.0 * row.gbps / self.peak_gbps
        self.rows.append(row)
        print(f"  {row.status} {row.op} {row.dtype} {row.shape}"
              + (f" err={row.max_error:.3g} [{row.worst}]" if row.max_error is not None else "")
              + (f" err/allowed={row.ratio:.2f}" if row.ratio is not None else "")
              + (f" ours={row.ours_ms:.4f}ms" if row.ours_ms is not None else "")
              + (f" torch={row.torch_ms:.4f}ms" if row.torch_ms is not None else "")
              + (f" {row.note}" if row.note else ""), flush=True)


def ptr(t) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def shape_str(*dims) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


# --------------------------------------------------------------------------------------------
# LayerNorm.
# --------------------------------------------------------------------------------------------

# (rows, cols): odd widths, 1 column, > 2048 (the block-per-row kernels); widths that are whole
# 16-byte vectors up to 2048 (the warp-per-row kernels: fewer vectors than lanes, the maximum).
LAYER_NORM_SMALL = [(13 * 7, 37), (3, 1), (5, 33), (2, 4099), (7, 24), (5, 2048)]


def layer_norm_shapes(args):
    small = LAYER_NORM_SMALL if args.shapes in ("small", "all") else []
    bert = [(8 * s, h) for s in (128, 512) for h in (1024, 2048)] if args.shapes in ("bert", "all") else []
    return [(r, c, False) for r, c in small] + [(r, c, True) for r, c in bert]


def check_layer_norm(ctx: Context, k: Kernels):
    torch, F = ctx.torch, ctx.torch.nn.functional
    for dtype in DTYPES:
        k.require(f"tfbert_layer_norm_forward_{SUFFIX[dtype]}", "p,p,p,ll,i,f,p,p,p,s")
        k.require(f"tfbert_layer_norm_backward_{SUFFIX[dtype]}", "p,p,p,p,p,ll,i,p,p,p,p,s")
    eps = 1e-12  # BERT's epsilon
    for rows, cols, bert in layer_norm_shapes(ctx.args):
        for dtype in DTYPES:
            tol, shape, size = TOLERANCE[dtype], shape_str(rows, cols), 2 if dtype != "float32" else 4
            tdt = getattr(torch, dtype)
            # A mean far from 0 on some rows checks the statistics' cancellation.
            x = ctx.randn((rows, cols), dtype, scale=1.0, offset=0.0)
            x[::3] += 5.0
            gamma = ctx.randn((cols,), scale=0.2, offset=1.0)
            beta = ctx.randn((cols,), scale=0.1)
            dy = ctx.randn((rows, cols), dtype)
            y = torch.empty_like(x)
            mean = torch.empty(rows, device="cuda")
            rstd = torch.empty(rows, device="cuda")
            fwd = f"tfbert_layer_norm_forward_{SUFFIX[dtype]}"
            fwd_args = (ptr(x), ptr(gamma), ptr(beta), rows, cols, eps, ptr(y), ptr(mean),
                        ptr(rstd), ctx.stream())
            k(fwd, *fwd_args)
            torch.cuda.synchronize()

            # The reference in float64 on the same (rounded) inputs.
            x64 = x.double().requires_grad_(True)
            g64 = gamma.double().requires_grad_(True)
            b64 = beta.double().requires_grad_(True)
            y64 = F.layer_norm(x64, (cols,), g64, b64, eps)
            mean64 = x64.detach().mean(-1)
            rstd64 = (x64.detach().var(-1, unbiased=False) + eps).rsqrt()
            err, worst, ok, ratio = ctx.compare([("y", y, y64.detach(), tol),
                                          ("mean", mean, mean64, TOLERANCE["float32"]),
                                          ("rstd", rstd, rstd64, TOLERANCE["float32"])])
            row = Row("layer_norm_fwd", dtype, shape, err, worst, ratio, ok)
            if bert:
                w_t, b_t = gamma.to(tdt), beta.to(tdt)
                nbytes = rows * cols * size * 2 + cols * 8 + rows * 8
                ctx.add(row, lambda: k(fwd, *fwd_args),
                        lambda: F.layer_norm(x, (cols,), w_t, b_t, eps), nbytes)
            else:
                ctx.add(row)

            dx = torch.empty_like(x)
            dgamma = torch.empty(cols, device="cuda")
            dbeta = torch.empty(cols, device="cuda")
            workspace = torch.empty(
                k.inline("tfbert_layer_norm_grad_workspace_floats", rows, cols), device="cuda")
            bwd = f"tfbert_layer_norm_backward_{SUFFIX[dtype]}"
            bwd_args = (ptr(dy), ptr(x), ptr(mean), ptr(rstd), ptr(gamma), rows, cols, ptr(dx),
                        ptr(dgamma), ptr(dbeta), ptr(workspace), ctx.stream())
            k(bwd, *bwd_args)
            torch.cuda.synchronize()
            dx64, dg64, db64 = torch.autograd.grad(y64, (x64, g64, b64), dy.double())
            # dgamma/dbeta are float32 sums over the rows of exactly these inputs.
            err, worst, ok, ratio = ctx.compare([("dx", dx, dx64, tol),
                                          ("dgamma", dgamma, dg64, TOLERANCE["float32"]),
                                          ("dbeta", dbeta, db64, TOLERANCE["float32"])])
            row = Row("layer_norm_bwd", dtype, shape, err, worst, ratio, ok)
            if bert:
                w_t, b_t = gamma.to(tdt), beta.to(tdt)
                _, t_mean, t_rstd = torch.ops.aten.native_layer_norm(x, [cols], w_t, b_t, eps)
                nbytes = rows * cols * size * 3 + rows * 8 + cols * 12
                ctx.add(row, lambda: k(bwd, *bwd_args),
                        lambda: torch.ops.aten.native_layer_norm_backward(
                            dy, x, [cols], t_mean, t_rstd, w_t, b_t, [True, True, True]),
                        nbytes)
            else:
                ctx.add(row)


# --------------------------------------------------------------------------------------------
# Attention softmax (+ dropout).
# --------------------------------------------------------------------------------------------


def dropout_keep_reference(size: int, rate: float, seed0: int, seed1: int):
    """dropout_rng.h in numpy (uint64 arithmetic wraps modulo 2^64): bool [size]."""
    import numpy as np

    g = np.uint64(0x9E3779B97F4A7C15)

    def mix64(z):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    with np.errstate(over="ignore"):
        seeds = np.array([seed0, seed1], dtype=np.int64).view(np.uint64)  # (uint64_t)seed
        key = mix64(seeds[1:2] + mix64(seeds[0:1] + g))
        index = np.arange(size, dtype=np.uint64)
        bits = mix64(key + (index + np.uint64(1)) * g)
        u = (bits >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / 16777216.0)
    return u >= np.float32(rate)


# (B, N, Sq, Sk, mask_rows, masked value): odd sizes, Sk not a multiple of 32, a per-query mask.
ATTENTION_SMALL = [(3, 2, 7, 7, 1, -10000.0), (2, 3, 5, 37, 5, -math.inf), (1, 1, 3, 1, 1, 0.0),
                   (2, 2, 9, 65, 1, -math.inf)]
SEEDS = (1234, -5678)  # a negative seed checks the int64 -> uint64 conversion
DROPOUT_RATE = 0.1


def attention_shapes(args):
    small = ATTENTION_SMALL if args.shapes in ("small", "all") else []
    bert = [(8, 16, s, s, 1, -10000.0) for s in (128, 512)] if args.shapes in ("bert", "all") else []
    return [c + (False,) for c in small] + [c + (True,) for c in bert]


def check_dropout_mask(ctx: Context, k: Kernels):
    """The GPU keep mask equals the numpy reimplementation of dropout_rng.h."""
    import numpy as np

    torch = ctx.torch
    k.require("tfbert_dropout_keep_mask", "ll,f,ll,ll,p,s")
    for size, rate, seed in [(4099, 0.1, SEEDS), (1000, 0.5, (0, 0)), (777, 0.0, (7, 8)),
                             (65537, 0.25, (-1, 2**62))]:
        keep = torch.empty(size, dtype=torch.uint8, device="cuda")
        k("tfbert_dropout_keep_mask", size, rate, seed[0], seed[1], ptr(keep), ctx.stream())
        ours = keep.cpu().numpy().astype(bool)
        ref = dropout_keep_reference(size, rate, *seed)
        mismatches = int(np.count_nonzero(ours != ref))
        ctx.add(Row("dropout_keep_mask_vs_numpy", "uint8", f"[{size}] rate={rate} seed={seed}",
                    float(mismatches), "mismatches", passed=mismatches == 0))


def check_attention_softmax(ctx: Context, k: Kernels):
    torch = ctx.torch
    for dtype in DTYPES:
        k.require(f"tfbert_attention_softmax_forward_{SUFFIX[dtype]}",
                  "p,p,ll,ll,ll,ll,ll,f,f,ll,ll,p,p,s")
        k.require(f"tfbert_attention_softmax_backward_{SUFFIX[dtype]}", "p,p,ll,ll,f,f,ll,ll,p,s")
    check_dropout_mask(ctx, k)
    for b, n, sq, sk, mask_rows, masked, bert in attention_shapes(ctx.args):
        rows, cols = b * n * sq, sk
        scale = 1.0 / math.sqrt(64.0)  # BERT's 1/sqrt(head size)
        for dtype in DTYPES:
            tol, size = TOLERANCE[dtype], 2 if dtype != "float32" else 4
            tdt = getattr(torch, dtype)
            scores = ctx.randn((b, n, sq, sk), dtype, scale=8.0)  # logits of a few units
            # mask_bias [B, mask_rows, Sk]: each batch pads its last keys (key 0 always real).
            mask = torch.zeros((b, mask_rows, sk), device="cuda")
            for i in range(b):
                mask[i, :, max(1, sk - (i * sk) // (b + 1)):] = masked
            if mask_rows > 1:
                mask[:, 1, sk // 2:] = masked  # one query row with its own mask
            mask = mask.to(tdt)
            dprobs = ctx.randn((b, n, sq, sk), dtype)

            # Reference in float64 on the same rounded inputs: softmax(scores * scale + mask).
            s64 = scores.double().requires_grad_(True)
            mask64 = mask.double().view(b, 1, mask_rows, sk)
            p64 = torch.softmax(s64 * scale + mask64, dim=-1)

            for rate in (0.0, DROPOUT_RATE):
                fwd = f"tfbert_attention_softmax_forward_{SUFFIX[dtype]}"
                bwd = f"tfbert_attention_softmax_backward_{SUFFIX[dtype]}"
                probs = torch.empty_like(scores)
                softmax = torch.empty_like(scores) if rate > 0 else probs
                fwd_args = (ptr(scores), ptr(mask), rows, cols, n * sq, sq, mask_rows, scale,
                            rate, SEEDS[0], SEEDS[1], ptr(probs), ptr(softmax), ctx.stream())
                k(fwd, *fwd_args)
                suffix = "" if rate == 0 else f"_dropout{rate}"
                shape = shape_str(b, n, sq, sk) + (f" mask[{b},{mask_rows},{sk}]" if not bert else "")
                if rate > 0:
                    keep = torch.empty((b, n, sq, sk), dtype=torch.uint8, device="cuda")
                    k("tfbert_dropout_keep_mask", rows * cols, rate, SEEDS[0], SEEDS[1],
                      ptr(keep), ctx.stream())
                    keep_f = keep.double() / (1.0 - rate)
                    ref_probs = p64 * keep_f
                else:
                    ref_probs = p64
                torch.cuda.synchronize()

                checks = [("probs", probs, ref_probs.detach(), tol)]
                note = ""
                passed_extra = True
                if rate > 0:
                    checks.append(("softmax", softmax, p64.detach(), tol))
                    # Dropped elements are exactly 0; the kept fraction is 1 - rate (6 sigma).
                    dropped_nonzero = int(((keep == 0) & (probs != 0)).sum().item())
                    kept = keep.double().mean().item()
                    sigma = math.sqrt(rate * (1 - rate) / keep.numel())
                    fraction_ok = abs(kept - (1 - rate)) <= 6 * sigma + 1.0 / keep.numel()
                    passed_extra = dropped_nonzero == 0 and fraction_ok
                    note = f"kept={kept:.4f} (1-rate={1 - rate})"
                    if dropped_nonzero:
                        note += f"; {dropped_nonzero} dropped elements not 0"
                err, worst, ok, ratio = ctx.compare(checks)
                row = Row("attention_softmax_fwd" + suffix, dtype, shape, err, worst, ratio,
                          ok and passed_extra, note=note)
                if bert:
                    mask4 = mask.view(b, 1, mask_rows, sk)
                    nbytes = rows * cols * size * (3 if rate > 0 else 2) + mask.numel() * size
                    if rate > 0:
                        theirs = lambda: torch.nn.functional.dropout(  # noqa: E731
                            torch.softmax(scores * scale + mask4, -1), rate, True)
                    else:
                        theirs = lambda: torch.softmax(scores * scale + mask4, -1)  # noqa: E731
                    ctx.add(row, lambda: k(fwd, *fwd_args), theirs, nbytes)
                else:
                    ctx.add(row)

                # Backward: the kernel reads its own forward's softmax (as the TF op does).
                dscores = torch.empty_like(scores)
                bwd_args = (ptr(dprobs), ptr(softmax), rows, cols, scale, rate, SEEDS[0],
                            SEEDS[1], ptr(dscores), ctx.stream())
                k(bwd, *bwd_args)
                torch.cuda.synchronize()
                (ds64,) = torch.autograd.grad(ref_probs, (s64,), dprobs.double(),
                                              retain_graph=True)
                keep_b = keep.bool() if rate > 0 else None
                inv_keep = 1.0 / (1.0 - rate)

                def theirs():
                    grad = dprobs * keep_b * inv_keep if keep_b is not None else dprobs
                    return torch.ops.aten._softmax_backward_data(
                        grad, softmax, -1, tdt).mul_(scale)

                # Against softmax's autograd formula applied to the softmax the forward stored
                # (what the kernel reads, as the TF op does): tol. Against autograd from the
                # scores, a 16-bit kernel also carries that stored softmax's rounding, which
                # grows with the row length: 2 tol, or PyTorch's own 16-bit backward from the
                # same stored softmax where that is further off (x 1.25 for summation order).
                d64 = dprobs.double() * keep_f if rate > 0 else dprobs.double()
                ds_stored64 = torch.ops.aten._softmax_backward_data(
                    d64, softmax.double(), -1, torch.float64) * scale
                from_scores_tol, note = tol, ""
                if dtype != "float32":
                    torch_ratio = ctx.compare([("torch", theirs(), ds64, 2 * tol)])[3]
                    from_scores_tol = 2 * tol * max(1.0, 1.25 * torch_ratio)
                    note = f"torch {dtype} vs autograd from scores: err/(2 tol)={torch_ratio:.2f}"
                err, worst, ok, ratio = ctx.compare([
                    ("dscores", dscores, ds_stored64, tol),
                    ("dscores_vs_autograd_from_scores", dscores, ds64, from_scores_tol)])
                row = Row("attention_softmax_bwd" + suffix, dtype, shape, err, worst, ratio, ok,
                          note=note)
                if bert:
                    ctx.add(row, lambda: k(bwd, *bwd_args), theirs, rows * cols * size * 3)
                else:
                    ctx.add(row)
                del probs, softmax, dscores


# --------------------------------------------------------------------------------------------
# Dropout (the encoder's hidden dropout, --ytf_dropout).
# --------------------------------------------------------------------------------------------


def dropout_shapes(args):
    """[rows, cols]: odd sizes and one over several grid-stride passes; BERT-large's hidden
    states [B * S, 1024] at batch 8 x 512 and 32 x 512."""
    small = [(5, 7), (3, 70001)] if args.shapes in ("small", "all") else []
    bert = [(8 * 512, 1024), (32 * 512, 1024)] if args.shapes in ("bert", "all") else []
    return [(shape, False) for shape in small] + [(shape, True) for shape in bert]


def misaligned(torch, t):
    """A copy of t whose data starts one element past a 16-byte boundary (the kernels' vector
    loads need 16-byte alignment; this takes their element-wise path)."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = storage[1:].view(t.shape)
    view.copy_(t)
    return view


def check_dropout(ctx: Context, k: Kernels):
    """y = x * keep / (1 - rate) with keep from the numpy port of dropout_rng.h: the float32
    product rounded once to the storage type, so y must equal that bit for bit (the note counts
    mismatches); also against float64 (tol)."""
    torch = ctx.torch
    for dtype in DTYPES:
        k.require(f"tfbert_dropout_{SUFFIX[dtype]}", "p,ll,f,ll,ll,p,s")
    rate = DROPOUT_RATE
    import numpy as np

    one = np.float32(1.0)
    keep_scale = float(one / (one - np.float32(rate)))  # the kernel's 1 / (1 - rate), float32
    for (rows, cols), bert in dropout_shapes(ctx.args):
        n = rows * cols
        kept = torch.from_numpy(dropout_keep_reference(n, rate, *SEEDS)).cuda().view(rows, cols)
        for dtype, aligned in [(d, True) for d in DTYPES] + (
                [] if bert else [(d, False) for d in DTYPES]):
            tdt, size = getattr(torch, dtype), 2 if dtype != "float32" else 4
            x = ctx.randn((rows, cols), dtype, scale=3.0)
            y = torch.full_like(x, float("nan"))
            if not aligned:
                x, y = misaligned(torch, x), misaligned(torch, y)
            fn = f"tfbert_dropout_{SUFFIX[dtype]}"
            args = (ptr(x), n, rate, SEEDS[0], SEEDS[1], ptr(y), ctx.stream())
            k(fn, *args)
            torch.cuda.synchronize()
            exact = torch.where(kept, x.float() * keep_scale, torch.zeros_like(x.float())).to(tdt)
            bits = torch.int16 if size == 2 else torch.int32
            mismatches = int((y.contiguous().view(bits) != exact.view(bits)).sum())
            ref64 = torch.where(kept, x.double() / (1.0 - rate), torch.zeros_like(x.double()))
            err, worst, ok, ratio = ctx.compare([("y", y, ref64, TOLERANCE[dtype])])
            row = Row("dropout", dtype, shape_str(rows, cols) + ("" if aligned else " misaligned"),
                      err, worst, ratio, ok and mismatches == 0,
                      note=f"{mismatches} elements differ from the float32 product" if mismatches
                      else "bit-identical to the float32 product")
            if bert:
                ctx.add(row, lambda: k(fn, *args),
                        lambda: torch.nn.functional.dropout(x, rate, True), 2 * n * size)
            else:
                ctx.add(row)
    check_bias_dropout_add(ctx, k)


def check_bias_dropout_add(ctx: Context, k: Kernels):
    """y = dropout(x + bias) + residual (tfbert_bias_dropout_add_*), the mask from the numpy
    port of dropout_rng.h: the float32 operations rounded once, so y must equal that bit for bit;
    also against float64 (tol)."""
    torch = ctx.torch
    for dtype in DTYPES:
        k.require(f"tfbert_bias_dropout_add_{SUFFIX[dtype]}", "p,p,p,ll,ll,f,ll,ll,p,s")
    rate = DROPOUT_RATE
    import numpy as np

    one = np.float32(1.0)
    keep_scale = float(one / (one - np.float32(rate)))
    for (rows, cols), bert in dropout_shapes(ctx.args):
        n = rows * cols
        kept = torch.from_numpy(dropout_keep_reference(n, rate, *SEEDS)).cuda().view(rows, cols)
        for dtype in DTYPES:
            tdt, size = getattr(torch, dtype), 2 if dtype != "float32" else 4
            x = ctx.randn((rows, cols), dtype, scale=3.0)
            bias = ctx.randn((cols,), dtype)
            residual = ctx.randn((rows, cols), dtype)
            y = torch.full_like(x, float("nan"))
            fn = f"tfbert_bias_dropout_add_{SUFFIX[dtype]}"
            args = (ptr(x), ptr(bias), ptr(residual), n, cols, rate, SEEDS[0], SEEDS[1], ptr(y),
                    ctx.stream())
            k(fn, *args)
            torch.cuda.synchronize()
            biased = x.float() + bias.float()
            exact = (torch.where(kept, biased * keep_scale, torch.zeros_like(biased))
                     + residual.float()).to(tdt)
            bits = torch.int16 if size == 2 else torch.int32
            mismatches = int((y.view(bits) != exact.view(bits)).sum())
            biased64 = x.double() + bias.double()
            ref64 = (torch.where(kept, biased64 / (1.0 - rate), torch.zeros_like(biased64))
                     + residual.double())
            err, worst, ok, ratio = ctx.compare([("y", y, ref64, TOLERANCE[dtype])])
            row = Row("bias_dropout_add", dtype, shape_str(rows, cols), err, worst, ratio,
                      ok and mismatches == 0,
                      note=f"{mismatches} elements differ from the float32 operations" if mismatches
                      else "bit-identical to the float32 operations")
            if bert:
                # Read x and the residual, write y (the bias is negligible).
                ctx.add(row, lambda: k(fn, *args),
                        lambda: torch.nn.functional.dropout(x + bias, rate, True) + residual,
                        3 * n * size)
            else:
                ctx.add(row)


# --------------------------------------------------------------------------------------------
# LAMB.
# --------------------------------------------------------------------------------------------

# The kernels take float32 hyperparameters, and the float64 references use the same values:
# 0.999 is no float32, and 1 - float32(0.999) differs from 0.001 by 1.3e-5 relative, which
# would use up most of float32's tolerance before the kernels' own arithmetic is measured.
LAMB_HYPER = dict(lr=as_float32(1e-3), beta1=as_float32(0.9), beta2=as_float32(0.999),
                  epsilon=as_float32(1e-6), weight_decay=as_float32(0.01), step=3)
# grad_scale other than 1: the gradients clipped by a global norm as the kernels read them.
LAMB_CLIP_SCALE = as_float32(0.37)


def lamb_reference(torch, var, m, v, grad, lr, beta1, beta2, epsilon, weight_decay, step,
                   use_layer_adaptation, apply_weight_decay):
    """tensorflow_addons' LAMB step (cc/ops/lamb_ops.cc), out of place: (var, m, v)."""
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad * grad
    update = (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt() + epsilon)
    if apply_weight_decay:
        update = update + weight_decay * var
    ratio = 1.0
    if use_layer_adaptation:
        w_norm, u_norm = var.norm(), update.norm()
        ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm,
                            torch.ones_like(w_norm))
    return var - ratio * lr * update, m, v


def lamb_sizes(args):
    small = [37, 4099, 1] if args.shapes in ("small", "all") else []
    # BERT-large's attention projection, FFN matrix, and word embeddings (30522 x 1024).
    bert = [1024 * 1024, 1024 * 4096, 30522 * 1024] if args.shapes in ("bert", "all") else []
    return [(n, False) for n in small] + [(n, True) for n in bert]


def check_lamb(ctx: Context, k: Kernels):
    torch = ctx.torch
    k.require("tfbert_lamb_update_f32", "p,p,p,p,ll,f,f,f,f,f,f,f,f,i,i,p,s")
    h = LAMB_HYPER
    bc1, bc2 = 1 - h["beta1"] ** h["step"], 1 - h["beta2"] ** h["step"]
    tol = TOLERANCE["float32"]
    for n, bert in lamb_sizes(ctx.args):
        flags = [(1, 1), (1, 0), (0, 1), (0, 0)] if not bert else [(1, 1)]
        cases = [(a, d, z, 1.0) for a, d in flags for z in
                 ((False, True) if (not bert and a) else (False,))]
        if not bert:
            cases.append((1, 1, False, LAMB_CLIP_SCALE))
        for adapt, decay, zero_var, grad_scale in cases:
            var = ctx.randn((n,), scale=0.02) * (0 if zero_var else 1)
            m = ctx.randn((n,), scale=1e-3)
            v = ctx.randn((n,), scale=1e-3).square()
            grad = ctx.randn((n,), scale=1e-2)
            ref = lamb_reference(torch, var.double(), m.double(), v.double(),
                                 grad.double() * grad_scale, h["lr"], h["beta1"],
                                 h["beta2"], h["epsilon"], h["weight_decay"], h["step"],
                                 adapt, decay)
            workspace = torch.empty(k.inline("tfbert_lamb_workspace_floats", n),
                                    device="cuda")
            v_var, v_m, v_v = var.clone(), m.clone(), v.clone()
            call = ("tfbert_lamb_update_f32", ptr(v_var), ptr(v_m), ptr(v_v), ptr(grad), n,
                    h["lr"], h["beta1"], h["beta2"], h["epsilon"], h["weight_decay"], bc1,
                    bc2, grad_scale, adapt, decay, ptr(workspace), ctx.stream())
            k(*call)
            torch.cuda.synchronize()
            err, worst, ok, ratio = ctx.compare([("var", v_var, ref[0], tol),
                                                 ("m", v_m, ref[1], tol), ("v", v_v, ref[2], tol)])
            name = f"lamb_update{'_adapt' if adapt else ''}{'_decay' if decay else ''}"
            row = Row(name, "float32", f"[{n}]" + (" var=0" if zero_var else "")
                      + (f" grad_scale={grad_scale:g}" if grad_scale != 1.0 else ""), err,
                      worst, ratio, ok)
            if bert:
                # In place: repeated timed steps keep changing var, m, v, which is harmless.
                ctx.add(row, lambda: k(*call),
                        lambda: lamb_reference(torch, var, m, v, grad, h["lr"], h["beta1"],
                                               h["beta2"], h["epsilon"], h["weight_decay"],
                                               h["step"], adapt, decay),
                        nbytes=n * 4 * 7)  # read var, m, v, grad; write var, m, v
            else:
                ctx.add(row)


class LambTensorStruct(ctypes.Structure):
    """TfbertLambTensor of lamb_launch.h."""
    _fields_ = [("var", ctypes.c_void_p), ("m", ctypes.c_void_p), ("v", ctypes.c_void_p),
                ("grad", ctypes.c_void_p), ("n", ctypes.c_longlong),
                ("use_layer_adaptation", ctypes.c_int), ("apply_weight_decay", ctypes.c_int)]


def lamb_multi_cases(args):
    """(name, sizes, flags per tensor, timed): odd small sizes with every flag pair and an empty
    tensor; and BERT-large's parameter list (24 layers of 16 tensors, hidden 1024, FFN 4096,
    plus embeddings), excluded tensors (biases, LayerNorm) without adaptation or decay."""
    cases = []
    if args.shapes in ("small", "all"):
        sizes = [37, 4099, 1, 0, 1024, 70001, 3, 262145]
        flags = [[(1, 1), (1, 0), (0, 1), (0, 0)][i % 4] for i in range(len(sizes))]
        cases.append(("small", sizes, flags, False))
    if args.shapes in ("bert", "all"):
        h, f = 1024, 4096
        layer = [(h * h, 1), (h, 0)] * 4 + [(h, 0), (h, 0), (h * f, 1), (f, 0), (f * h, 1),
                                               (h, 0), (h, 0), (h, 0)]
        embeddings = [(30522 * h, 1), (512 * h, 1), (2 * h, 1), (h, 0), (h, 0)]
        params = embeddings + layer * 24
        cases.append(("bert_large", [n for n, _ in params], [(a, a) for _, a in params], True))
    return cases


def check_lamb_multi(ctx: Context, k: Kernels):
    """The multi-tensor launch against one tfbert_lamb_update_f32 per tensor (bit-identical) and
    the float64 reference; timed against that per-tensor loop (the "torch ms" column)."""
    torch = ctx.torch
    k.require("tfbert_lamb_multi_update_f32", "p,i,f,f,f,f,f,f,f,f,p,s")
    h = LAMB_HYPER
    bc1, bc2 = 1 - h["beta1"] ** h["step"], 1 - h["beta2"] ** h["step"]
    # With a clip scale: both launch paths read the gradients through it.
    scalars = (h["lr"], h["beta1"], h["beta2"], h["epsilon"], h["weight_decay"], bc1, bc2,
               LAMB_CLIP_SCALE)
    tol = TOLERANCE["float32"]
    for name, sizes, flags, timed in lamb_multi_cases(ctx.args):
        states = []
        for n in sizes:
            states.append((ctx.randn((n,), scale=0.02), ctx.randn((n,), scale=1e-3),
                           ctx.randn((n,), scale=1e-3).square(), ctx.randn((n,), scale=1e-2)))
        multi = [(var.clone(), m.clone(), v.clone()) for var, m, v, _ in states]
        single = [(var.clone(), m.clone(), v.clone()) for var, m, v, _ in states]
        table = (LambTensorStruct * len(sizes))(*[
            LambTensorStruct(ptr(o[0]), ptr(o[1]), ptr(o[2]), ptr(s[3]), n, a, d)
            for o, s, n, (a, d) in zip(multi, states, sizes, flags)])
        workspace = torch.empty(max(1, k.inline("tfbert_lamb_multi_workspace_floats", table,
                                                len(sizes))), device="cuda")
        call = ("tfbert_lamb_multi_update_f32", table, len(sizes), *scalars, ptr(workspace),
                ctx.stream())
        k(*call)
        single_workspace = torch.empty(max(k.inline("tfbert_lamb_workspace_floats", max(n, 1))
                                           for n in sizes), device="cuda")

        def one_per_tensor(outs):
            for (var, m, v), (_, _, _, grad), n, (a, d) in zip(outs, states, sizes, flags):
                k("tfbert_lamb_update_f32", ptr(var), ptr(m), ptr(v), ptr(grad), n, *scalars,
                  a, d, ptr(single_workspace), ctx.stream())

        one_per_tensor(single)
        torch.cuda.synchronize()
        identical = all(torch.equal(a, b) for x, y in zip(multi, single) for a, b in zip(x, y))
        checks = []
        for i, ((var, m, v, grad), (a, d)) in enumerate(zip(states, flags)):
            if var.numel() == 0:
                continue
            ref = lamb_reference(torch, var.double(), m.double(), v.double(),
                                 grad.double() * LAMB_CLIP_SCALE, h["lr"], h["beta1"], h["beta2"],
                                 h["epsilon"], h["weight_decay"], h["step"], a, d)
            checks += [(f"var{i}", multi[i][0], ref[0], tol), (f"m{i}", multi[i][1], ref[1], tol),
                       (f"v{i}", multi[i][2], ref[2], tol)]
        err, worst, ok, ratio = ctx.compare(checks)
        total = sum(sizes)
        row = Row("lamb_multi_update", "float32", f"{name}: {len(sizes)} tensors, {total} elements",
                  err, worst, ratio, ok and identical,
                  note=("bit-identical to one launch per tensor" if identical else
                        "DIFFERS from one launch per tensor")
                  + ("; torch ms = one tfbert_lamb_update_f32 per tensor" if timed else ""))
        if timed:
            ctx.add(row, lambda: k(*call), lambda: one_per_tensor(single), nbytes=total * 4 * 7)
        else:
            ctx.add(row)


# --------------------------------------------------------------------------------------------
# LAMB over a ZeRO shard.
# --------------------------------------------------------------------------------------------

# segment_flags bits of lamb_shard_launch.h.
LAMB_SHARD_ACTIVE, LAMB_SHARD_DECAY = 1, 2


def lamb_shard_segment_ids(torch, ends, n):
    """int64 [n]: the segment of each element (ends: int64 [S], non-decreasing, last == n)."""
    return torch.searchsorted(ends, torch.arange(n, device=ends.device), right=True)


def lamb_shard_update(torch, m, v, param, ids, decay, beta1, beta2, epsilon, weight_decay,
                      step):
    """The update direction from the updated moments (cc/ops/lamb_shard_ops.cc)."""
    update = (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt() + epsilon)
    return update + torch.where(decay[ids], weight_decay * param, torch.zeros_like(param))


def lamb_shard_moments_reference(torch, m, v, grad, param, ids, num_segments, decay, active,
                                 beta1, beta2, epsilon, weight_decay, step):
    """The first half, out of place, in the inputs' dtype: (sums [S, 2], m, v).
    ids: lamb_shard_segment_ids; decay, active: bool [S]."""
    on = active[ids]
    zero = torch.zeros_like(param)
    m = torch.where(on, beta1 * m + (1 - beta1) * grad, m)
    v = torch.where(on, beta2 * v + (1 - beta2) * grad * grad, v)
    update = lamb_shard_update(torch, m, v, param, ids, decay, beta1, beta2, epsilon,
                               weight_decay, step)

    def segment_sum(x):
        return torch.zeros(num_segments, dtype=param.dtype, device=param.device).index_add_(
            0, ids, torch.where(on, x, zero))

    return torch.stack([segment_sum(param * param), segment_sum(update * update)], dim=1), m, v


def lamb_shard_apply_reference(torch, param, m, v, ids, decay, active, scale, beta1, beta2,
                               epsilon, weight_decay, step):
    """The second half from the updated moments: new_param (param where inactive)."""
    update = lamb_shard_update(torch, m, v, param, ids, decay, beta1, beta2, epsilon,
                               weight_decay, step)
    return torch.where(active[ids], param - scale[ids] * update, param)


def lamb_shard_cases(args):
    """(name, segment sizes, apply_weight_decay, active, timed). Small: odd sizes, empty
    segments, a segment over many tiles, tile-aligned boundaries, inactive segments, the empty
    shard. BERT: three BERT-large encoder layers cut at an arbitrary point (as a ZeRO rank's
    shard), matrices decayed, biases and LayerNorm not."""
    cases = []
    if args.shapes in ("small", "all"):
        cases += [
            ("odd", [37, 1, 58], [1, 0, 1], [1, 1, 1], False),
            ("empty+inactive", [0, 13, 0, 37, 27], [1, 0, 1, 1, 0], [1, 1, 1, 0, 1], False),
            ("many_tiles", [3, 20000, 11], [0, 1, 1], [1, 1, 0], False),
            ("tile_aligned", [4096, 0, 4097], [1, 1, 0], [1, 1, 1], False),
            ("one_element", [1], [1], [1], False),
            ("empty_shard", [0, 0], [1, 0], [1, 1], False),
        ]
    if args.shapes in ("bert", "all"):
        hidden, ffn = 1024, 4096
        layer = ([hidden * hidden, hidden] * 4 + [hidden, hidden]
                 + [hidden * ffn, ffn, ffn * hidden, hidden] + [hidden, hidden])
        layer_decay = [1, 0] * 4 + [0, 0] + [1, 0, 1, 0] + [0, 0]
        sizes = layer * 3
        sizes[0] -= 500_000  # the shard starts inside a tensor
        cases.append(("bert_large_3_layers", sizes, layer_decay * 3, [1] * len(sizes), True))
    return cases


def lamb_shard_worst_element(torch, new_param, ref_param, param, m, v, ids, ends, decay, scale,
                             tol) -> str:
    """The inputs and outputs at the element whose error is largest against its allowance."""
    ref = ref_param
    allowed = tol * (ref.abs() + ref.pow(2).mean().sqrt())
    i = int(((new_param.double() - ref).abs() / allowed).argmax().item())
    s = int(ids[i].item())
    begin = int(ends[s - 1].item()) if s > 0 else 0
    return (f"worst element {i} (segment {s}, offset {i - begin}, decay {bool(decay[s])}): "
            f"param={param[i].item():.9g} m={m[i].item():.9g} v={v[i].item():.9g} "
            f"scale={scale[s].item():.9g} ours={new_param[i].item():.9g} "
            f"ref={ref[i].item():.12g}")


def check_lamb_shard(ctx: Context, k: Kernels):
    torch = ctx.torch
    k.require("tfbert_lamb_shard_moments_f32", "p,p,p,p,ll,p,p,ll,f,f,f,f,f,f,p,p,s")
    k.require("tfbert_lamb_shard_apply_f32", "p,p,p,ll,p,p,ll,p,f,f,f,f,f,f,p,s")
    h = LAMB_HYPER
    bc1, bc2 = 1 - h["beta1"] ** h["step"], 1 - h["beta2"] ** h["step"]
    hyper = (h["beta1"], h["beta2"], h["epsilon"], h["weight_decay"], bc1, bc2)
    tol = TOLERANCE["float32"]
    for name, sizes, decay_list, active_list, timed in lamb_shard_cases(ctx.args):
        n, num_segments = sum(sizes), len(sizes)
        ends = torch.tensor(sizes, device="cuda").cumsum(0)
        decay = torch.tensor(decay_list, dtype=torch.bool, device="cuda")
        active = torch.tensor(active_list, dtype=torch.bool, device="cuda")
        flags = (active.to(torch.uint8) * LAMB_SHARD_ACTIVE
                 + decay.to(torch.uint8) * LAMB_SHARD_DECAY)
        param = ctx.randn((n,), scale=0.02)
        m = ctx.randn((n,), scale=1e-3)
        v = ctx.randn((n,), scale=1e-3).square()
        grad = ctx.randn((n,), scale=1e-2)
        scale = ctx.randn((num_segments,), scale=1e-3).abs()
        ids = lamb_shard_segment_ids(torch, ends, n)
        hyper64 = (h["beta1"], h["beta2"], h["epsilon"], h["weight_decay"], h["step"])
        ref_sums, ref_m, ref_v = lamb_shard_moments_reference(
            torch, m.double(), v.double(), grad.double(), param.double(), ids, num_segments,
            decay, active, *hyper64)
        workspace = torch.empty(
            max(1, k.inline("tfbert_lamb_shard_workspace_doubles", n, num_segments)),
            dtype=torch.float64, device="cuda")
        o_m, o_v = m.clone(), v.clone()
        sums = torch.full((num_segments, 2), float("nan"), device="cuda")  # all must be written
        new_param = torch.full_like(param, float("nan"))
        moments = ("tfbert_lamb_shard_moments_f32", ptr(o_m), ptr(o_v), ptr(grad), ptr(param),
                   n, ptr(ends), ptr(flags), num_segments, *hyper, ptr(workspace), ptr(sums),
                   ctx.stream())
        apply = ("tfbert_lamb_shard_apply_f32", ptr(param), ptr(o_m), ptr(o_v), n, ptr(ends),
                 ptr(flags), num_segments, ptr(scale), *hyper, ptr(new_param), ctx.stream())
        k(*moments)
        k(*apply)
        torch.cuda.synchronize()
        first = (sums.clone(), new_param.clone())
        # Deterministic: the same inputs again give bit-identical sums and parameters.
        o_m.copy_(m)
        o_v.copy_(v)
        k(*moments)
        k(*apply)
        torch.cuda.synchronize()
        deterministic = torch.equal(first[0], sums) and torch.equal(first[1], new_param)
        # The apply half against float64 from the moments it read (the kernel's own m and v;
        # the moments half is checked against float64 above).
        read_m, read_v = o_m.clone(), o_v.clone()  # the timing below updates o_m, o_v again
        ref_param = lamb_shard_apply_reference(torch, param.double(), read_m.double(),
                                               read_v.double(), ids, decay, active,
                                               scale.double(), *hyper64)
        # Inactive segments: m, v and param exactly as they were.
        on = active[ids]
        untouched = (torch.equal(o_m[~on], m[~on]) and torch.equal(o_v[~on], v[~on])
                     and torch.equal(new_param[~on], param[~on]))
        shape = f"[{n}] S={num_segments} {name}"
        note = ("" if deterministic else "not deterministic ") + (
            "" if untouched else "inactive segments changed")
        err, worst, ok, ratio = ctx.compare([("sums", sums, ref_sums, tol), ("m", o_m, ref_m, tol),
                                             ("v", o_v, ref_v, tol)])
        row = Row("lamb_shard_moments", "float32", shape, err, worst, ratio,
                  ok and deterministic and untouched, note=note.strip())
        if timed:
            # Each call updates m and v in place again: harmless for timing.
            ctx.add(row, lambda: k(*moments),
                    lambda: lamb_shard_moments_reference(torch, m, v, grad, param, ids,
                                                         num_segments, decay, active, *hyper64),
                    nbytes=n * 4 * 6)  # read m, v, grad, param; write m, v
        else:
            ctx.add(row)
        err, worst, ok, ratio = ctx.compare([("new_param", new_param, ref_param, tol)])
        if not ok:
            note = (note + " " + lamb_shard_worst_element(
                torch, new_param, ref_param, param, read_m, read_v, ids, ends, decay, scale,
                tol)).strip()
        row = Row("lamb_shard_apply", "float32", shape, err, worst, ratio,
                  ok and deterministic and untouched, note=note.strip())
        if timed:
            ctx.add(row, lambda: k(*apply),
                    lambda: lamb_shard_apply_reference(torch, param, m, v, ids, decay, active,
                                                       scale, *hyper64),
                    nbytes=n * 4 * 4)  # read param, m, v; write new_param
        else:
            ctx.add(row)


# --------------------------------------------------------------------------------------------
# Bias + GELU / GeGLU.
# --------------------------------------------------------------------------------------------


def gelu_shapes(args):
    """(rows, cols): for GeGLU cols is half_cols (x is [rows, 2 * cols]). Odd widths take the
    GELU backward's one-column-per-thread kernel, even ones its two-column kernel (a partial
    last block of columns: 66 and 2050)."""
    small = ([(13 * 7, 37), (3, 1), (5, 33), (2, 4099), (7, 66), (3, 2050)]
             if args.shapes in ("small", "all") else [])
    # BERT's intermediate layer: [B * S, 4 * hidden].
    bert = ([(8 * s, 4 * h) for s in (128, 512) for h in (1024, 2048)]
            if args.shapes in ("bert", "all") else [])
    return [(r, c, False) for r, c in small] + [(r, c, True) for r, c in bert]


def geglu_reference(F, x, bias, half_cols, approximate):
    """y = gelu(gate + bias_gate) * (value + bias_value), x = [gate | value] (gelu_launch.h)."""
    z = x + bias
    return F.gelu(z[:, :half_cols], approximate=approximate) * z[:, half_cols:]


def check_gelu(ctx: Context, k: Kernels):
    torch, F = ctx.torch, ctx.torch.nn.functional
    for dtype in DTYPES:
        sfx = SUFFIX[dtype]
        for kind in ("gelu", "geglu"):
            k.require(f"tfbert_bias_{kind}_forward_{sfx}", "p,p,ll,i,i,p,s")
            k.require(f"tfbert_bias_{kind}_backward_{sfx}", "p,p,p,ll,i,i,p,p,p,s")
    for kind in ("gelu", "geglu"):
        for rows, cols, bert in gelu_shapes(ctx.args):
            x_cols = 2 * cols if kind == "geglu" else cols  # x's last dimension
            for dtype in DTYPES:
                # BERT times the exact GELU only (its default); both forms are checked.
                for approximate in (("none",) if bert else ("none", "tanh")):
                    tol, size = TOLERANCE[dtype], 2 if dtype != "float32" else 4
                    x = ctx.randn((rows, x_cols), dtype, scale=2.0)
                    bias = ctx.randn((x_cols,), dtype, scale=0.5)
                    y_cols = cols
                    dy = ctx.randn((rows, y_cols), dtype)
                    y = torch.empty((rows, y_cols), dtype=x.dtype, device="cuda")
                    fwd = f"tfbert_bias_{kind}_forward_{SUFFIX[dtype]}"
                    bwd = f"tfbert_bias_{kind}_backward_{SUFFIX[dtype]}"
                    flag = 1 if approximate == "tanh" else 0
                    fwd_args = (ptr(x), ptr(bias), rows, cols, flag, ptr(y), ctx.stream())
                    k(fwd, *fwd_args)
                    torch.cuda.synchronize()

                    x64 = x.double().requires_grad_(True)
                    b64 = bias.double().requires_grad_(True)
                    if kind == "gelu":
                        y64 = F.gelu(x64 + b64, approximate=approximate)
                    else:
                        y64 = geglu_reference(F, x64, b64, cols, approximate)
                    err, worst, ok, ratio = ctx.compare([("y", y, y64.detach(), tol)])
                    op = f"bias_{kind}" + ("_tanh" if flag else "")
                    shape = shape_str(rows, x_cols)
                    row = Row(op + "_fwd", dtype, shape, err, worst, ratio, ok)
                    if bert:
                        if kind == "gelu":
                            theirs = lambda: F.gelu(x + bias, approximate=approximate)  # noqa: E731
                        else:
                            theirs = lambda: geglu_reference(F, x, bias, cols, approximate)  # noqa: E731
                        nbytes = (rows * x_cols + rows * y_cols + x_cols) * size
                        ctx.add(row, lambda: k(fwd, *fwd_args), theirs, nbytes)
                    else:
                        ctx.add(row)

                    dx = torch.empty_like(x)
                    dbias = torch.empty_like(bias)
                    workspace = torch.empty(
                        k.inline("tfbert_bias_gelu_grad_workspace_floats", rows, x_cols),
                        device="cuda")
                    bwd_args = (ptr(dy), ptr(x), ptr(bias), rows, cols, flag, ptr(dx),
                                ptr(dbias), ptr(workspace), ctx.stream())
                    k(bwd, *bwd_args)
                    torch.cuda.synchronize()
                    dx64, db64 = torch.autograd.grad(y64, (x64, b64), dy.double())
                    err, worst, ok, ratio = ctx.compare([("dx", dx, dx64, tol),
                                                         ("dbias", dbias, db64, tol)])
                    row = Row(op + "_bwd", dtype, shape, err, worst, ratio, ok)
                    if bert:
                        z = x + bias  # the unfused backward starts from the saved x + bias

                        def theirs():
                            if kind == "gelu":
                                g = torch.ops.aten.gelu_backward(dy, z, approximate=approximate)
                            else:
                                gate, value = z[:, :cols], z[:, cols:]
                                g = torch.cat([torch.ops.aten.gelu_backward(
                                    dy * value, gate, approximate=approximate),
                                    dy * F.gelu(gate, approximate=approximate)], dim=1)
                            return g, g.sum(0)

                        nbytes = (2 * rows * x_cols + rows * y_cols + 2 * x_cols) * size
                        ctx.add(row, lambda: k(bwd, *bwd_args), theirs, nbytes)
                    else:
                        ctx.add(row)


def check_gelu_saved(ctx: Context, k: Kernels):
    """--gelu_save_derivative: tfbert_bias_gelu_forward_save_* writes y and gelu'(x + bias),
    tfbert_bias_gelu_backward_saved_* multiplies dy by that derivative (dx) and sums dx over the
    rows (dbias); against float64 autograd. The backward's dx must equal dy * derivative in
    float32 rounded once, bit for bit (the note column)."""
    torch, F = ctx.torch, ctx.torch.nn.functional
    for dtype in DTYPES:
        k.require(f"tfbert_bias_gelu_forward_save_{SUFFIX[dtype]}", "p,p,ll,i,i,p,p,s")
        k.require(f"tfbert_bias_gelu_backward_saved_{SUFFIX[dtype]}", "p,p,ll,i,p,p,p,s")
    for rows, cols, bert in gelu_shapes(ctx.args):
        for dtype in DTYPES:
            for approximate in (("none",) if bert else ("none", "tanh")):
                tol, size = TOLERANCE[dtype], 2 if dtype != "float32" else 4
                x = ctx.randn((rows, cols), dtype, scale=2.0)
                bias = ctx.randn((cols,), dtype, scale=0.5)
                dy = ctx.randn((rows, cols), dtype)
                y, derivative = torch.empty_like(x), torch.empty_like(x)
                flag = 1 if approximate == "tanh" else 0
                fwd = f"tfbert_bias_gelu_forward_save_{SUFFIX[dtype]}"
                bwd = f"tfbert_bias_gelu_backward_saved_{SUFFIX[dtype]}"
                fwd_args = (ptr(x), ptr(bias), rows, cols, flag, ptr(y), ptr(derivative),
                            ctx.stream())
                k(fwd, *fwd_args)
                torch.cuda.synchronize()
                z64 = (x.double() + bias.double()).requires_grad_(True)
                y64 = F.gelu(z64, approximate=approximate)
                (d64,) = torch.autograd.grad(y64.sum(), (z64,))
                err, worst, ok, ratio = ctx.compare([("y", y, y64.detach(), tol),
                                                     ("derivative", derivative, d64, tol)])
                op = "bias_gelu_save" + ("_tanh" if flag else "")
                row = Row(op + "_fwd", dtype, shape_str(rows, cols), err, worst, ratio, ok)
                if bert:
                    ctx.add(row, lambda: k(fwd, *fwd_args),
                            lambda: F.gelu(x + bias, approximate=approximate),
                            (3 * rows * cols + cols) * size)
                else:
                    ctx.add(row)

                dx, dbias = torch.empty_like(x), torch.empty_like(bias)
                workspace = torch.empty(
                    k.inline("tfbert_bias_gelu_grad_workspace_floats", rows, cols), device="cuda")
                bwd_args = (ptr(dy), ptr(derivative), rows, cols, ptr(dx), ptr(dbias),
                            ptr(workspace), ctx.stream())
                k(bwd, *bwd_args)
                torch.cuda.synchronize()
                exact = (dy.float() * derivative.float()).to(x.dtype)
                bits = torch.int16 if size == 2 else torch.int32
                mismatches = int((dx.view(bits) != exact.view(bits)).sum())
                grad64 = dy.double() * derivative.double()
                err, worst, ok, ratio = ctx.compare([("dx", dx, grad64, tol),
                                                     ("dbias", dbias, grad64.sum(0), tol)])
                row = Row(op + "_bwd", dtype, shape_str(rows, cols), err, worst, ratio,
                          ok and mismatches == 0,
                          note=f"{mismatches} dx differ from dy * derivative" if mismatches
                          else "dx bit-identical to dy * derivative")
                if bert:
                    def theirs():  # the multiply and column sum the recomputing backward avoids
                        g = dy * derivative
                        return g, g.float().sum(0)

                    ctx.add(row, lambda: k(bwd, *bwd_args), theirs, 3 * rows * cols * size)
                else:
                    ctx.add(row)


# --------------------------------------------------------------------------------------------
# Fused bias + split heads.
# --------------------------------------------------------------------------------------------


def split_heads_shapes(args):
    """(B, S, n, H, bert): odd sizes, one head, a head size of 1; BERT-large's attention at
    sequence 128 and 512."""
    small = ([(3, 7, 5, 3), (2, 5, 1, 8), (4, 3, 2, 1), (1, 1, 1, 1)]
             if args.shapes in ("small", "all") else [])
    bert = [(32, 128, 16, 64), (8, 512, 16, 64)] if args.shapes in ("bert", "all") else []
    return [s + (False,) for s in small] + [s + (True,) for s in bert]


def check_split_heads(ctx: Context, k: Kernels):
    """query/key/value = (x + bias) split into heads (tfbert_bias_split_heads_forward_*): bit
    for bit the float32 sum rounded once, moved; the backward's dx bit for bit the gradients
    moved back, dbias vs their float64 sum."""
    torch = ctx.torch
    for dtype in DTYPES:
        k.require(f"tfbert_bias_split_heads_forward_{SUFFIX[dtype]}", "p,p,ll,ll,i,i,p,p,p,s")
        k.require(f"tfbert_bias_split_heads_backward_{SUFFIX[dtype]}",
                  "p,p,p,ll,ll,i,i,p,p,p,s")
    for batch, seq, heads, head_size, bert in split_heads_shapes(ctx.args):
        cols = 3 * heads * head_size
        for dtype in DTYPES:
            tdt, size = getattr(torch, dtype), 2 if dtype != "float32" else 4
            bits = torch.int16 if size == 2 else torch.int32
            x = ctx.randn((batch, seq, cols), dtype, scale=3.0)
            bias = ctx.randn((cols,), dtype)
            parts = [torch.full((batch, heads, seq, head_size), float("nan"), device="cuda",
                                dtype=tdt) for _ in range(3)]
            fwd = f"tfbert_bias_split_heads_forward_{SUFFIX[dtype]}"
            fwd_args = (ptr(x), ptr(bias), batch, seq, heads, head_size,
                        *(ptr(p) for p in parts), ctx.stream())
            k(fwd, *fwd_args)
            torch.cuda.synchronize()

            def split(t):  # [B, S, 3D] -> 3 x [B, n, S, H]
                return t.view(batch, seq, 3, heads, head_size).permute(2, 0, 3, 1, 4)

            exact = split((x.float() + bias.float()).to(tdt))
            mismatches = sum(int((p.view(bits) != e.contiguous().view(bits)).sum())
                             for p, e in zip(parts, exact))
            ref64 = split(x.double() + bias.double())
            err, worst, ok, ratio = ctx.compare(
                [(name, p, r, TOLERANCE[dtype])
                 for name, p, r in zip(("query", "key", "value"), parts, ref64)])
            shape = shape_str(batch, seq, cols)
            row = Row("bias_split_heads_fwd", dtype, shape, err, worst, ratio,
                      ok and mismatches == 0,
                      note=f"{mismatches} elements differ" if mismatches else "bit-identical")
            if bert:
                ctx.add(row, lambda: k(fwd, *fwd_args),
                        lambda: split(x + bias).contiguous(), 2 * x.numel() * size)
            else:
                ctx.add(row)

            grads = [ctx.randn((batch, heads, seq, head_size), dtype) for _ in range(3)]
            dx = torch.full_like(x, float("nan"))
            dbias = torch.full_like(bias, float("nan"))
            workspace = torch.empty(
                k.inline("tfbert_split_heads_grad_workspace_floats", batch * seq, cols),
                device="cuda")
            bwd = f"tfbert_bias_split_heads_backward_{SUFFIX[dtype]}"
            bwd_args = (*(ptr(g) for g in grads), batch, seq, heads, head_size, ptr(dx),
                        ptr(dbias), ptr(workspace), ctx.stream())
            k(bwd, *bwd_args)
            torch.cuda.synchronize()
            gathered = torch.stack(grads).permute(1, 3, 0, 2, 4).reshape(batch, seq, cols)
            mismatches = int((dx.view(bits) != gathered.contiguous().view(bits)).sum())
            err, worst, ok, ratio = ctx.compare(
                [("dbias", dbias, gathered.double().sum((0, 1)), TOLERANCE[dtype])])
            row = Row("bias_split_heads_bwd", dtype, shape, err, worst, ratio,
                      ok and mismatches == 0,
                      note=f"{mismatches} dx differ" if mismatches else "dx bit-identical")
            if bert:
                def theirs():
                    g = torch.stack(grads).permute(1, 3, 0, 2, 4).reshape(batch, seq, cols)
                    return g, g.float().sum((0, 1))

                ctx.add(row, lambda: k(bwd, *bwd_args), theirs, 3 * x.numel() * size)
            else:
                ctx.add(row)


# --------------------------------------------------------------------------------------------
# Softmax cross-entropy.
# --------------------------------------------------------------------------------------------


def softmax_xent_shapes(args):
    """(rows, cols, bert): odd widths below and above the forward block's 256 threads, one class,
    a vocabulary; BERT's masked-LM head: batch 32 x 80 predictions over 30522 tokens."""
    small = ([(13, 37), (3, 1), (5, 300), (70, 30522), (129, 7)]
             if args.shapes in ("small", "all") else [])
    bert = [(32 * 80, 30522)] if args.shapes in ("bert", "all") else []
    return [(r, c, False) for r, c in small] + [(r, c, True) for r, c in bert]


def check_softmax_xent(ctx: Context, k: Kernels):
    """loss, log_sum_exp and argmax of logits + bias (tfbert_softmax_xent_forward_*) and the
    gradient (..._backward_*) against float64 torch; the argmax exactly against torch.argmax of
    the float32 sum (the first of equal maxima, which the rounded 16-bit logits make common)."""
    torch, F = ctx.torch, ctx.torch.nn.functional
    for dtype in DTYPES:
        k.require(f"tfbert_softmax_xent_forward_{SUFFIX[dtype]}", "p,p,p,ll,i,p,p,p,s")
        k.require(f"tfbert_softmax_xent_backward_{SUFFIX[dtype]}", "p,p,p,p,p,ll,i,p,p,p,s")
    for rows, cols, bert in softmax_xent_shapes(ctx.args):
        for dtype in DTYPES:
            tol, size = TOLERANCE[dtype], 2 if dtype != "float32" else 4
            logits = ctx.randn((rows, cols), dtype, scale=4.0)
            bias = ctx.randn((cols,), "float32")
            labels = torch.randint(0, cols, (rows,), device="cuda", dtype=torch.int32,
                                   generator=ctx.generator)
            dloss = ctx.randn((rows,), "float32")
            loss, lse = (torch.full((rows,), float("nan"), device="cuda") for _ in range(2))
            predicted = torch.full((rows,), -1, device="cuda", dtype=torch.int32)
            fwd, bwd = (f"tfbert_softmax_xent_{d}_{SUFFIX[dtype]}" for d in ("forward", "backward"))
            fwd_args = (ptr(logits), ptr(bias), ptr(labels), rows, cols, ptr(loss), ptr(lse),
                        ptr(predicted), ctx.stream())
            k(fwd, *fwd_args)
            torch.cuda.synchronize()
            z64 = (logits.double() + bias.double()).requires_grad_(True)
            lse64 = torch.logsumexp(z64, dim=1)
            loss64 = lse64 - z64.gather(1, labels.long()[:, None])[:, 0]
            wrong = int((predicted != (logits.float() + bias).argmax(1).int()).sum())
            # The losses are float32 from the same rounded logits: float32's tolerance.
            err, worst, ok, ratio = ctx.compare([("loss", loss, loss64.detach(), 1e-5),
                                                 ("log_sum_exp", lse, lse64.detach(), 1e-5)])
            row = Row("softmax_xent_fwd", dtype, shape_str(rows, cols), err, worst, ratio,
                      ok and wrong == 0, note=f"{wrong} argmax differ" if wrong else "")
            if bert:
                def theirs():
                    z = logits.float() + bias
                    return F.cross_entropy(z, labels.long(), reduction="none"), z.argmax(1)

                ctx.add(row, lambda: k(fwd, *fwd_args), theirs, rows * cols * size)
            else:
                ctx.add(row)

            dlogits = torch.full_like(logits, float("nan"))
            dbias = torch.full_like(bias, float("nan"))
            workspace = torch.empty(
                k.inline("tfbert_softmax_xent_grad_workspace_floats", rows, cols), device="cuda")
            bwd_args = (ptr(dloss), ptr(logits), ptr(bias), ptr(labels), ptr(lse), rows, cols,
                        ptr(dlogits), ptr(dbias), ptr(workspace), ctx.stream())
            k(bwd, *bwd_args)
            torch.cuda.synchronize()
            (dz64,) = torch.autograd.grad(loss64, (z64,), dloss.double())
            err, worst, ok, ratio = ctx.compare([("dlogits", dlogits, dz64, tol),
                                                 ("dbias", dbias, dz64.sum(0), 1e-5)])
            row = Row("softmax_xent_bwd", dtype, shape_str(rows, cols), err, worst, ratio, ok)
            if bert:
                def theirs_backward():  # from the saved float32 softmax, as PyTorch keeps it
                    z = logits.float() + bias
                    g = (torch.softmax(z, 1) - F.one_hot(labels.long(), cols)) * dloss[:, None]
                    return g.to(logits.dtype), g.sum(0)

                ctx.add(row, lambda: k(bwd, *bwd_args), theirs_backward,
                        2 * rows * cols * size)
            else:
                ctx.add(row)

    # A label outside [0, cols): a NaN loss, as TensorFlow's GPU kernel gives.
    logits = ctx.randn((2, 9), "float32")
    bias = torch.zeros(9, device="cuda")
    labels = torch.tensor([9, 3], device="cuda", dtype=torch.int32)
    loss, lse = torch.zeros(2, device="cuda"), torch.zeros(2, device="cuda")
    predicted = torch.zeros(2, device="cuda", dtype=torch.int32)
    k("tfbert_softmax_xent_forward_f32", ptr(logits), ptr(bias), ptr(labels), 2, 9, ptr(loss),
      ptr(lse), ptr(predicted), ctx.stream())
    torch.cuda.synchronize()
    nan_ok = bool(torch.isnan(loss[0])) and bool(torch.isfinite(loss[1]))
    ctx.add(Row("softmax_xent_bad_label", "float32", "[2,9]", passed=nan_ok,
                note="NaN loss for label 9 of 9 classes" if nan_ok else f"loss {loss.tolist()}"))


CHECKS = {
    "layer_norm": check_layer_norm,
    "attention_softmax": check_attention_softmax,
    "gelu": lambda ctx, k: (check_gelu(ctx, k), check_gelu_saved(ctx, k)),
    "dropout": check_dropout,
    "lamb": lambda ctx, k: (check_lamb(ctx, k), check_lamb_multi(ctx, k)),
    "lamb_shard": check_lamb_shard,
    "softmax_xent": check_softmax_xent,
    "split_heads": check_split_heads,
}


# --------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------

COLUMNS = ["op", "dtype", "shape", "max error", "pass", "our ms", "torch ms", "ratio", "GB/s",
           "% of peak", "note"]


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def row_cells(row: Row) -> list:
    ratio = row.torch_ms / row.ours_ms if row.ours_ms and row.torch_ms else None
    err = "" if row.max_error is None else f"{row.max_error:.3g}" + (f" ({row.worst})" if row.worst else "")
    return [row.op, row.dtype, row.shape, err, row.status, _fmt(row.ours_ms, ".4f"),
            _fmt(row.torch_ms, ".4f"), _fmt(ratio, ".2f"), _fmt(row.gbps, ".0f"),
            _fmt(row.peak_pct, ".1f"), row.note]


def markdown(rows) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in row_cells(row)) + " |")
    return "\n".join(lines)


def write_csv(path, rows, device_name, peak_gbps):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["op", "dtype", "shape", "max_error", "worst_output", "error_over_allowed",
                         "pass", "our_ms",
                         "torch_ms", "ratio_torch_over_ours", "gbps", "peak_pct", "peak_gbps",
                         "device", "note"])
        for row in rows:
            ratio = row.torch_ms / row.ours_ms if row.ours_ms and row.torch_ms else None
            writer.writerow([row.op, row.dtype, row.shape, row.max_error, row.worst, row.ratio,
                             row.status,
                             row.ours_ms, row.torch_ms, ratio, row.gbps, row.peak_pct, peak_gbps,
                             device_name, row.note])


# --------------------------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build_dir", default=None, help="where to build (default: a temp dir)")
    parser.add_argument("--arch", default=None,
                        help="nvcc arch flags (default: the GPU's, e.g. "
                             "'-gencode arch=compute_90,code=sm_90')")
    parser.add_argument("--csv", default=DEFAULT_CSV, help="CSV output path")
    parser.add_argument("--peak_gbps", type=float, default=DEFAULT_PEAK_GBPS,
                        help="the device's peak memory bandwidth in GB/s (H100 SXM: 3350)")
    parser.add_argument("--shapes", choices=("small", "bert", "all"), default="all")
    parser.add_argument("--ops", default="", help="comma-separated ops to check (default: all)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--no_timing", action="store_true", help="correctness only")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("check_kernels: skipped: PyTorch is not installed (this harness needs a GPU "
              "machine with PyTorch and nvcc)")
        return 0
    if not torch.cuda.is_available():
        print("check_kernels: skipped: no CUDA GPU is visible to PyTorch")
        return 0
    props = torch.cuda.get_device_properties(0)
    device_name = props.name
    print(f"device: {device_name}, compute capability {props.major}.{props.minor}, "
          f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs; "
          f"peak bandwidth taken as {args.peak_gbps:.0f} GB/s (--peak_gbps)")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    if _nvcc() is None:
        print("check_kernels: FAILED: a GPU is present but nvcc is not found")
        return 1

    arch = args.arch or default_arch()
    build_dir = args.build_dir or tempfile.mkdtemp(prefix="tfbert_kernels_")
    print(f"building custom_ops/cuda/*.cu with {arch} into {build_dir}", flush=True)
    build = build_library(build_dir, arch)
    lib = ctypes.CDLL(build.library)
    lib.tfbert_harness_error_string.argtypes = [ctypes.c_int]
    lib.tfbert_harness_error_string.restype = ctypes.c_char_p

    ctx = Context(torch, args, args.peak_gbps)
    for source, log in build.errors.items():
        print(f"BUILD FAILED: {source}\n{log}")
        ctx.rows.append(Row(f"build {source}", "", "", passed=False, note="does not compile"))

    wanted = {o for o in args.ops.split(",") if o}
    for op, header in build.headers.items():
        if wanted and op not in wanted:
            continue
        print(f"{op}:", flush=True)
        try:
            if f"{op}.cu" not in build.compiled:
                raise MissingOp(f"{op}.cu is missing or did not compile")
            if op not in CHECKS:
                raise MissingOp(f"no checks for {op} in this harness")
            CHECKS[op](ctx, Kernels(lib, header))
        except MissingOp as e:
            ctx.add(Row(op, "", "", passed=None, note=str(e)))
        except AttributeError as e:  # a declared symbol is not in the library
            ctx.add(Row(op, "", "", passed=None, note=f"symbol missing: {e}"))
        except Exception as e:  # a launch error or a CUDA fault: this op fails, go on
            traceback.print_exc()
            ctx.add(Row(op, "", "", passed=False, note=f"{type(e).__name__}: {e}"[:300]))
            try:
                torch.cuda.synchronize()
            except Exception:  # a sticky CUDA error: nothing else can run in this process
                print("the CUDA context is broken; stopping")
                break
    for op in wanted - set(build.headers):
        ctx.add(Row(op, "", "", passed=None, note=f"no custom_ops/cuda/{op}_launch.h"))

    print()
    print(f"## tfbert CUDA kernels on {device_name} (peak {args.peak_gbps:.0f} GB/s)")
    print()
    print(markdown(ctx.rows))
    write_csv(args.csv, ctx.rows, device_name, args.peak_gbps)
    failed = [r for r in ctx.rows if r.passed is False]
    skipped = [r for r in ctx.rows if r.passed is None]
    print(f"\n{len(ctx.rows) - len(failed) - len(skipped)} passed, {len(failed)} failed, "
          f"{len(skipped)} skipped; CSV: {args.csv}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
