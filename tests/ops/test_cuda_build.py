"""The CUDA kernels compile, and a WITH_CUDA=1 library links and loads (no GPU needed).

A GPU machine runs the kernels themselves: see tests/gpu/.
"""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")

# One architecture keeps the check quick; `make ops WITH_CUDA=1` builds for several.
ONE_ARCH = "CUDA_ARCHS=-gencode arch=compute_80,code=sm_80"


def test_with_cuda_library_builds_links_and_loads(tmp_path):
    library = tmp_path / "libtfbert_ops_cuda.so"
    make = subprocess.run(
        ["make", "-C", "custom_ops", "WITH_CUDA=1", ONE_ARCH, f"BUILD={tmp_path / 'build'}",
         f"LIB={library}", f"PYTHON={sys.executable}", "-j2"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert make.returncode == 0, make.stdout[-3000:] + make.stderr[-3000:]
    cuda_sources = [f for f in os.listdir(os.path.join(REPO_ROOT, "custom_ops", "cuda"))
                    if f.endswith(".cu")]
    assert cuda_sources
    for source in cuda_sources:
        assert (tmp_path / "build" / "cuda" / (source + ".o")).exists(), source
    # Loaded in a fresh process: this library registers the same op names as the CPU build.
    load = subprocess.run(
        [sys.executable, "-c", "import sys, tensorflow as tf; "
         "print(tf.load_op_library(sys.argv[1]).tf_bert_built_with_cuda().numpy())", str(library)],
        capture_output=True, text=True, timeout=300)
    assert load.returncode == 0, load.stderr[-3000:]
    assert load.stdout.strip().endswith("True")
