"""Deployment targets (`export.target`): the ONNX int8 types each CPU family runs fast and without saturation.

One row per target, as onnxruntime's quantize_static guidance (and Optimum's AutoQuantizationConfig) gives
them: x86 without VNNI multiplies u8 x s8 with vpmaddubsw, whose 16-bit sums saturate unless the weights keep
7 bits (reduce_range); VNNI (vpdpbusd) accumulates u8 x s8 in 32 bits, so the weights keep all 8; Arm's dot
product (sdot) takes signed activations. `auto` reads the exporting machine's CPU. TFLite int8 has one scheme
on every target (symmetric int8 weights, asymmetric int8 activations), so the target only shapes ONNX.
Measured on flowers5 MobileNetV2 on an AVX-512 VNNI machine (2 threads): u8s8 1.71 ms p50, the former u8u8
3.70 ms (onnxruntime has no fast u8u8 kernel), both within 2 of 168 images of the float model.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from edgetl.variants import ExportError


@dataclass(frozen=True)
class Target:
    """One CPU family's ONNX int8 settings and the reason for them."""

    name: str
    activation_type: str  # numpy name of the activations' integer type: "uint8" | "int8"
    weight_type: str
    reduce_range: bool  # 7-bit weights
    why: str


TARGETS: tuple[Target, ...] = (
    Target("x86_avx2", "uint8", "int8", True, "x86 without VNNI: u8s8, 7-bit weights so vpmaddubsw's 16-bit sums "
                                              "cannot saturate"),
    Target("x86_avx512_vnni", "uint8", "int8", False, "x86 with VNNI: vpdpbusd accumulates u8s8 in 32 bits, full "
                                                      "8-bit weights"),
    Target("arm64", "int8", "int8", False, "Arm: the int8 dot-product kernels (sdot) take signed activations"),
)
NAMES: tuple[str, ...] = ("auto",) + tuple(t.name for t in TARGETS)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")


def detect(machine: str | None = None, flags: set[str] | None = None) -> tuple[str, str]:
    """(target name, why) for this machine (or the given architecture and CPU flags)."""
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64"):
        return "arm64", f"auto: {machine} CPU"
    flags = cpu_flags() if flags is None else flags
    vnni = [f for f in VNNI_FLAGS if f in flags]
    if vnni:
        return "x86_avx512_vnni", f"auto: {vnni[0]} in the CPU flags"
    return "x86_avx2", "auto: no VNNI in the CPU flags"


def resolve(name: str) -> tuple[Target, str]:
    """The row for `name` ("auto" detects this machine's) and how it was chosen, for the manifest."""
    chosen, how = detect() if name == "auto" else (name, "export.target")
    for target in TARGETS:
        if target.name == chosen:
            return target, how
    raise ExportError(f"export.target {name!r} is not a target; use one of {', '.join(NAMES)}")


def cpu_flags() -> set[str]:
    """This machine's CPU feature flags (/proc/cpuinfo `flags`, Arm `Features`); empty where there is no cpuinfo."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text(errors="replace") if cpuinfo.exists() else ""
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.partition(":")[2].split())
    return set()
