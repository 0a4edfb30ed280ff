"""Fresh Python processes for measurements: start `python -m MODULE` on this edgetl and read its failure as one line.

Benchmarks and validation rows each run in their own interpreter, so load time and peak memory are those of
one runtime alone; both the sweep and the validation harness start them through here.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import edgetl


def child_env() -> dict:
    """This environment with the folder holding the edgetl package first on PYTHONPATH (no install needed)."""
    root = str(Path(edgetl.__file__).resolve().parent.parent)
    parts = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(parts)}


def run_module(module: str, args: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess:
    """Run `python -m module args` with this interpreter, output captured; raises subprocess.TimeoutExpired."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout_s,
                          env=child_env())


def error_line(proc: subprocess.CompletedProcess, who: str) -> str:
    """A failed child's last non-blank stderr line (its error), or `who` and its exit status when it printed none."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"{who} exit status {proc.returncode}"
