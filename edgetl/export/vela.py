"""Arm Ethos-U NPU estimate: compile an int8 .tflite with Arm's Vela compiler and read Vela's own report.

`vela_report(MODEL, "ethos-u55-128")` runs `ethos-u-vela` (in a subprocess: Vela is a command-line tool that
exits and prints) for the named accelerator configuration, with Vela's default system configuration and
memory mode for it unless given, and returns what Vela reports: SRAM and flash use, estimated cycles and
inference time, and the ops that fall back to the CPU (those left outside the ethos-u custom op in the
compiled model, which TensorFlow Lite Micro then runs). These are compiler estimates from Vela's performance
model, not a measurement on a board.
"""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from edgetl.errors import EdgetlError
from edgetl.io import atomic_write_text

VELA_TIMEOUT_S = 600
ESTIMATE_NOTE = ("Vela's compiler estimates (its performance model of the NPU and memory system), not a "
                 "measurement on a board")
NPU_OP = "ethos-u"  # the custom op that carries the NPU command stream in a compiled model
_KIB = 1024


class VelaError(EdgetlError, RuntimeError):
    """Vela is missing, or refused or failed to compile the model; the message carries Vela's own words."""


def accelerators() -> list[str]:
    """The accelerator configurations this Vela knows (ethos-u55-32 ... ethos-u85-2048)."""
    try:
        from ethosu.vela.architecture_features import Accelerator
    except ImportError:
        raise VelaError("Arm's Vela compiler is not installed: pip install 'edgetl[micro]' "
                        "(or pip install ethos-u-vela)") from None
    return [member.value for member in Accelerator]


def vela_version() -> str:
    from importlib.metadata import version

    return version("ethos-u-vela")


def _number(row: dict, key: str) -> Optional[float]:
    value = row.get(key)
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def _stdout_value(text: str, label: str) -> Optional[str]:
    match = re.search(rf"^{re.escape(label)}\s+(.+?)\s*$", text, re.MULTILINE)
    return match.group(1) if match else None


def _op_counts(text: str) -> dict:
    counts = {}
    for kind in ("CPU", "NPU"):
        match = re.search(rf"^{kind} operators = (\d+)", text, re.MULTILINE)
        counts[kind.lower()] = int(match.group(1)) if match else None
    return counts


def parse_report(summary_csv: Path, stdout: str, compiled: Path) -> dict:
    """Vela's summary CSV and printed summary, plus the CPU ops of the compiled model, as one dict (bytes,
    cycles, seconds)."""
    from edgetl.export.micro import model_ops

    with open(summary_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise VelaError(f"{summary_csv}: Vela's summary CSV has no rows")
    row = rows[0]
    kib = {key: _number(row, f"{key}_memory_used") for key in ("sram", "dram", "on_chip_flash", "off_chip_flash")}
    as_bytes = {key: None if value is None else int(round(value * _KIB)) for key, value in kib.items()}
    inference_s = _number(row, "inference_time")
    cpu_ops = [use for use in model_ops(compiled.read_bytes()) if use.name != NPU_OP]
    counts = _op_counts(stdout)
    return {
        "accelerator": row.get("accelerator_configuration"),
        "system_config": row.get("system_config"),
        "memory_mode": row.get("memory_mode"),
        "core_clock_hz": _number(row, "core_clock"),
        "sram_bytes": as_bytes["sram"],
        "dram_bytes": as_bytes["dram"],
        "flash_bytes": sum(v for v in (as_bytes["on_chip_flash"], as_bytes["off_chip_flash"]) if v is not None),
        "weights_in": row.get("weights_storage_area"),
        "feature_maps_in": row.get("feature_map_storage_area"),
        "cycles_total": _number(row, "cycles_total"),
        "cycles_npu": _number(row, "cycles_npu"),
        "inference_time_ms": None if inference_s is None else inference_s * 1000.0,
        "inferences_per_second": _number(row, "inferences_per_second"),
        "nn_macs": _number(row, "nn_macs"),
        "original_weights_bytes": _number(row, "total_original_weights"),
        "npu_encoded_weights_bytes": _number(row, "total_npu_encoded_weights"),
        "npu_operators": counts["npu"],
        "cpu_operators": counts["cpu"],
        "cpu_ops": [{"op": use.name, "count": use.count} for use in cpu_ops],
        "cpu_fallback_lines": re.findall(r"^\s*CPU: (.+)$", stdout, re.MULTILINE),
        "compiled_bytes": compiled.stat().st_size,
        "note": ESTIMATE_NOTE,
    }


def vela_report(model_path: str | os.PathLike, accelerator: str = "ethos-u55-128",
                out_dir: str | os.PathLike | None = None, system_config: Optional[str] = None,
                memory_mode: Optional[str] = None, timeout_s: float = VELA_TIMEOUT_S) -> dict:
    """Compile `model_path` for `accelerator`; the compiled model and Vela's summary CSV go to `out_dir`
    (default: beside the model, in vela-<accelerator>/). Returns parse_report's dict plus the file paths."""
    model_path = Path(model_path)
    known = accelerators()
    if accelerator not in known:
        raise VelaError(f"--vela {accelerator!r} is not an Ethos-U configuration Vela knows; choose one of "
                        f"{', '.join(known)}")
    if not model_path.is_file():
        raise VelaError(f"{model_path}: model file not found")
    out_dir = Path(out_dir) if out_dir else model_path.parent / f"vela-{accelerator}"
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "ethosu.vela", str(model_path), "--accelerator-config", accelerator,
               "--show-cpu-operations"]
    if system_config or memory_mode:
        command += ["--config", "Arm/vela.ini"]
    if system_config:
        command += ["--system-config", system_config]
    if memory_mode:
        command += ["--memory-mode", memory_mode]
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".vela-") as work:
        try:
            done = subprocess.run(command + ["--output-dir", work], capture_output=True, text=True,
                                  timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise VelaError(f"{model_path}: Vela did not finish within {timeout_s:.0f} s") from None
        if done.returncode != 0:
            said = (done.stderr.strip() or done.stdout.strip()).splitlines()[-8:]
            raise VelaError(f"{model_path}: Vela could not compile it for {accelerator} (exit "
                            f"{done.returncode}):\n  " + "\n  ".join(said))
        work_dir = Path(work)
        compiled = next(work_dir.glob("*_vela.tflite"), None)
        summary = next(work_dir.glob("*_summary_*.csv"), None)
        if compiled is None or summary is None:
            raise VelaError(f"{model_path}: Vela exited 0 but wrote no compiled model or summary CSV in {work}")
        report = parse_report(summary, done.stdout, compiled)
        paths = {}
        for produced in (compiled, summary):
            target = out_dir / produced.name
            os.replace(produced, target)  # same folder tree: an atomic rename
            paths[produced.suffix.lstrip(".")] = str(target)
    atomic_write_text(out_dir / "vela_stdout.txt", done.stdout)
    report.update({"model": str(model_path), "compiled_model": paths["tflite"], "summary_csv": paths["csv"],
                   "vela_version": vela_version(), "command": " ".join(command[2:])})
    return report


def format_vela(report: dict) -> str:
    """Vela's figures as a short text block, with the estimate note."""
    def kib(value):
        return "-" if value is None else f"{value / _KIB:,.1f} KiB"

    cpu = ", ".join(f"{o['op']} x{o['count']}" for o in report["cpu_ops"]) or "none"
    time_ms = report["inference_time_ms"]
    lines = [
        f"Vela {report['vela_version']}: {report['accelerator']} ({report['system_config']}, {report['memory_mode']}, "
        f"{(report['core_clock_hz'] or 0) / 1e6:.0f} MHz)",
        f"  SRAM {kib(report['sram_bytes'])}, flash {kib(report['flash_bytes'])}"
        + (f", DRAM {kib(report['dram_bytes'])}" if report["dram_bytes"] else "")
        + f"; weights in {report['weights_in']}, feature maps in {report['feature_maps_in']}",
        f"  {report['cycles_total']:,.0f} cycles, {'-' if time_ms is None else f'{time_ms:.3f}'} ms per inference "
        f"({report['inferences_per_second'] or 0:,.1f}/s), {report['nn_macs'] or 0:,.0f} MACs",
        f"  ops on the NPU {report['npu_operators']}, on the CPU {report['cpu_operators']}: {cpu}",
        f"  compiled model {report['compiled_model']} ({report['compiled_bytes']:,} bytes)",
        f"  ({report['note']})",
    ]
    return "\n".join(lines)
