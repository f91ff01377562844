"""Runs one `tfbert.run` job for a benchmark and returns its summary.json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_job(output_dir: str, flags: list[str], ranks: int = 1) -> dict:
    """`python -m tfbert.run --output_dir=... FLAGS`, under `horovodrun --gloo` for ranks > 1.

    Each job is its own process: precision policy, XLA and Horovod are process-wide.
    """
    command = [sys.executable, "-m", "tfbert.run", f"--output_dir={output_dir}", *flags]
    if ranks > 1:
        horovodrun = (shutil.which("horovodrun", path=os.path.dirname(sys.executable))
                      or shutil.which("horovodrun"))
        if horovodrun is None:
            raise RuntimeError("horovodrun is not installed (make setup builds Horovod)")
        command = [horovodrun, "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo", *command]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    with open(os.path.join(output_dir, "summary.json")) as f:
        return json.load(f)
