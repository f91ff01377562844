"""Runs one `tfbert.run` job for a benchmark and returns its summary.json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class JobFailed(RuntimeError):
    """A job exited non-zero. `config_error` is True for tfbert's start-up errors ("tfbert:
    error: ..." and exit 2, which horovodrun turns into 1): a setting that cannot work here,
    e.g. a feature that is not built. `message` is that error, else the end of stderr."""

    def __init__(self, command: list[str], returncode: int, stderr: str):
        self.returncode = returncode
        errors = [line.split("tfbert: error:", 1)[1].strip() for line in stderr.splitlines()
                  if "tfbert: error:" in line]
        self.config_error = bool(errors)
        self.message = errors[-1] if errors else stderr[-3000:]
        super().__init__(f"{' '.join(command)} failed ({returncode}):\n{stderr[-3000:]}")


def horovodrun_command(ranks: int) -> list[str]:
    horovodrun = (shutil.which("horovodrun", path=os.path.dirname(sys.executable))
                  or shutil.which("horovodrun"))
    if horovodrun is None:
        raise RuntimeError("horovodrun is not installed (make setup builds Horovod)")
    return [horovodrun, "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo"]


def run_job(output_dir: str, flags: list[str], ranks: int = 1,
            horovodrun: bool | None = None) -> dict:
    """`python -m tfbert.run --output_dir=... FLAGS`, under `horovodrun --gloo` when
    `horovodrun` is True (default: when ranks > 1). Raises JobFailed if the job fails.

    Each job is its own process: precision policy, XLA and Horovod are process-wide.
    """
    command = [sys.executable, "-m", "tfbert.run", f"--output_dir={output_dir}", *flags]
    if horovodrun or (horovodrun is None and ranks > 1):
        command = horovodrun_command(ranks) + command
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise JobFailed(command, result.returncode, result.stderr)
    with open(os.path.join(output_dir, "summary.json")) as f:
        return json.load(f)
