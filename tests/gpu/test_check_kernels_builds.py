"""The GPU harness (check_kernels.py) builds its kernel library and is harmless without a GPU.

No GPU needed: the kernels themselves run only under `python tests/gpu/check_kernels.py` on a
GPU machine (see README.md here).
"""

import ctypes
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "check_kernels.py")
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
CUDA_DIR = os.path.join(REPO_ROOT, "custom_ops", "cuda")

# The launch functions whose headers are complete; ops added later are checked through their
# headers (every declared prototype must be exported).
CORE_SYMBOLS = [
    f"tfbert_{name}_{suffix}"
    for name in ("layer_norm_forward", "layer_norm_backward", "attention_softmax_forward",
                 "attention_softmax_backward")
    for suffix in ("f32", "f16", "bf16")
] + ["tfbert_dropout_keep_mask", "tfbert_lamb_update_f32", "tfbert_lamb_multi_update_f32"]


def _harness():
    spec = importlib.util.spec_from_file_location("check_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


def test_harness_imports_and_parses_the_headers():
    harness = _harness()
    headers = harness.discover_headers()
    assert {"layer_norm", "attention_softmax"} <= set(headers)
    ln = headers["layer_norm"].prototypes["tfbert_layer_norm_forward_f16"]
    assert ",".join(ln.codes) == "p,p,p,ll,i,f,p,p,p,s"
    assert "tfbert_layer_norm_grad_workspace_floats" in headers["layer_norm"].inline
    declared = {name for h in headers.values() for name in h.prototypes}
    assert set(CORE_SYMBOLS) <= declared
    # Every op with a header has checks in the harness (or says it has none: a SKIP row).
    for op in headers:
        assert op in harness.CHECKS, f"check_kernels.py has no checks for {op}"


def test_every_signature_the_harness_requires_is_the_headers():
    """The checks are written against launch signatures (`Kernels.require`); on a GPU machine a
    mismatch only turns that op's rows into SKIPs, so compare them with the headers here."""
    harness = _harness()
    declared = {name: ",".join(proto.codes) for header in harness.discover_headers().values()
                for name, proto in header.prototypes.items()}
    with open(SCRIPT) as f:
        required = re.findall(r'require\(\s*f?"([^"]+)",\s*"([^"]+)"\)', f.read())
    assert len(required) >= 12
    for name, codes in required:
        # An f-string's placeholder ({SUFFIX[dtype]}, {kind}) stands for one word.
        pattern = re.compile(re.sub(r"\\\{.*?\\\}", "[a-z0-9]+", re.escape(name)) + "$")
        matches = {n: c for n, c in declared.items() if pattern.match(n)}
        assert matches, f"{name}: no such launch function in custom_ops/cuda/*_launch.h"
        for function, declared_codes in matches.items():
            assert declared_codes == codes, (function, declared_codes, codes)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_build_library_exports_the_launch_functions(tmp_path):
    harness = _harness()
    build = harness.build_library(str(tmp_path), "-gencode arch=compute_80,code=sm_80")
    assert os.path.exists(build.library)
    assert build.errors == {}, "\n".join(f"{k}:\n{v}" for k, v in build.errors.items())
    assert sorted(build.compiled) == sorted(f for f in os.listdir(CUDA_DIR) if f.endswith(".cu"))
    nm = subprocess.run(["nm", "-D", "--defined-only", build.library], capture_output=True,
                        text=True, check=True)
    exported = {line.split()[-1] for line in nm.stdout.splitlines() if line.strip()}
    expected = set(CORE_SYMBOLS) | {"tfbert_harness_error_string"}
    for op, header in build.headers.items():
        expected |= {harness.INLINE_PREFIX + name for name in header.inline}
        # A header whose .cu is not written yet (another developer's op in progress): the
        # harness skips that op; its launch functions cannot be exported.
        if os.path.exists(os.path.join(CUDA_DIR, f"{op}.cu")):
            expected |= set(header.prototypes)
    missing = sorted(expected - exported)
    assert not missing, f"not exported by {build.library}: {missing}"
    # The runtime is static: the library loads without this toolkit's libcudart on the path,
    # and the header's inline workspace sizes are callable (no GPU needed for either).
    lib = ctypes.CDLL(build.library)
    kernels = harness.Kernels(lib, build.headers["layer_norm"])
    assert kernels.inline("tfbert_layer_norm_grad_workspace_floats", 4096, 1024) == 2 * 64 * 1024
    assert kernels.inline("tfbert_layer_norm_grad_row_blocks", 10**6) == 512
    # The multi-tensor LAMB workspace: 2 partials per block + the ratio, for each tensor with
    # layer adaptation (blocks of 1024 elements, at most 1024 blocks), read from a ctypes table.
    lamb = harness.Kernels(lib, build.headers["lamb"])
    table = (harness.LambTensorStruct * 3)(
        harness.LambTensorStruct(None, None, None, None, 5000, 1, 1),
        harness.LambTensorStruct(None, None, None, None, 10**9, 0, 1),
        harness.LambTensorStruct(None, None, None, None, 2 * 10**6, 1, 0))
    assert lamb.inline("tfbert_lamb_multi_workspace_floats", table, 3) == (2 * 5 + 1) + (
        2 * 1024 + 1)


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_numpy_dropout_hash_matches_dropout_rng_h(tmp_path):
    """The harness compares the GPU mask with a numpy port of dropout_rng.h; check the port
    against the header itself, compiled for the CPU."""
    source = tmp_path / "keep.cc"
    source.write_text('#include "dropout_rng.h"\n'
                      'extern "C" void keep_mask(long long n, float rate, long long s0, '
                      'long long s1, unsigned char* out) {\n'
                      '  const uint64_t key = tfbert_dropout_key(s0, s1);\n'
                      '  for (long long i = 0; i < n; ++i) out[i] = tfbert_dropout_keep(key, i, rate);\n'
                      '}\n')
    library = tmp_path / "libkeep.so"
    subprocess.run(["c++", "-O2", "-shared", "-fPIC", "-I", CUDA_DIR, str(source), "-o",
                    str(library)], check=True)
    keep_mask = ctypes.CDLL(str(library)).keep_mask
    keep_mask.argtypes = [ctypes.c_longlong, ctypes.c_float, ctypes.c_longlong,
                          ctypes.c_longlong, ctypes.c_char_p]
    harness = _harness()
    for n, rate, s0, s1 in [(4099, 0.1, 1234, -5678), (1000, 0.5, 0, 0),
                            (65537, 0.25, -1, 2**62), (100, 0.0, 7, 8)]:
        out = ctypes.create_string_buffer(n)
        keep_mask(n, rate, s0, s1, out)
        ours = [bool(b) for b in out.raw]
        ref = harness.dropout_keep_reference(n, rate, s0, s1).tolist()
        assert ours == ref, (n, rate, s0, s1)


def test_script_without_a_gpu_says_skipped_and_exits_0(tmp_path):
    # No visible GPU whatever this machine has (and here no torch at all): the skip path.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, SCRIPT, "--csv", str(tmp_path / "out.csv")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipped" in proc.stdout
