"""int8 latency and size ratios of issue 16 in one run, side by side, with the CPU model and flags recorded.

1. edgetl tflite-int8 (uint8 io) of MobileNetV2 1.0 at 224 (ImageNet backbone, 1001-way head like the reference;
   the run of bench_export.py) vs Google's int8 `tf2_mobilenet_v2_1.0_224_ptq.tflite`. Target <= 1.00. A copy of the
   reference is timed with them: its ratio to the reference is the noise floor of this machine and run.
2. With --run RUN (a trained run, e.g. flowers): whatever its exports/ holds of tflite-int8_repaired,
   onnx-int8 and onnx-int8_repaired, against its full int8: repaired vs full int8 of the same format
   (targets: latency <= 1.3x, size <= 1.5x) and onnx-int8 vs tflite-int8 (target: latency <= 1.5x).

Each thread count (--threads, default 1 and 2) times every model of a table in interleaved rounds on edgetl's
runner (LiteRT with XNNPACK, ONNX Runtime); ratios are of medians over all timed invokes.

    .venv/bin/python benchmarks/bench_int8.py [--run models/flowers_mobilenet_v2/RUN] [--threads 1 2] [--json F]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from bench_export import Timed, interleave, make_run, timing_arguments
from bench_serve import cpu_facts

# CPU features that decide which int8 kernels run (x86 VNNI/AMX dot products; Arm dot product and i8mm).
INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "asimddp", "i8mm")

# (artifact, baseline, latency target, size target) for the run's exports: None = not a target.
PAIRS = (("tflite-int8_repaired", "tflite-int8", 1.3, 1.5), ("onnx-int8_repaired", "onnx-int8", 1.3, 1.5),
         ("onnx-int8", "tflite-int8", 1.5, None))


def input_note(path: Path) -> str:
    """An artifact's input type and quantization, and the ops ahead of its first convolution."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    detail = interpreter.get_input_details()[0]
    ops = [op["op_name"] for op in interpreter._get_ops_details()]
    head = ops[:ops.index("CONV_2D")] if "CONV_2D" in ops else ops[:3]
    scale, zero_point = detail["quantization"]
    return f"{detail['dtype'].__name__} input, scale {scale:.6g}, zero point {zero_point}; before the first conv: {head}"


def table(rows: list[tuple[str, Path, Path]], threads: list[int], args) -> list[dict]:
    """Latency (at each thread count) and size of each (name, artifact, baseline), timed together; printed."""
    paths = list(dict.fromkeys(p for _, a, b in rows for p in (a, b)))
    results = []
    for count in threads:
        timed = {path: Timed(path.name, path, count) for path in paths}
        interleave(list(timed.values()), args.rounds, args.runs, args.warmup)
        for name, artifact, baseline in rows:
            a, b = timed[artifact], timed[baseline]
            results.append({"pair": name, "threads": count, "artifact_ms": a.median, "baseline_ms": b.median,
                            "latency_ratio": a.median / b.median,
                            "size_ratio": artifact.stat().st_size / baseline.stat().st_size,
                            "artifact_bytes": artifact.stat().st_size, "baseline_bytes": baseline.stat().st_size})
    for r in results:
        print(f"  {r['pair']:<40} {r['threads']} thr  {r['artifact_ms']:7.2f} / {r['baseline_ms']:7.2f} ms = "
              f"{r['latency_ratio']:.3f}x latency   size {r['artifact_bytes'] / 1e6:.2f} / {r['baseline_bytes'] / 1e6:.2f} MB"
              f" = {r['size_ratio']:.3f}x")
    return results


def verdict(value: float, target: float | None) -> str:
    return "" if target is None else f"(target <= {target}: {'PASS' if value <= target else 'FAIL'})"


def main() -> None:
    parser = timing_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--run", type=Path, default=None, help="a trained run whose exports/ to compare")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args()

    from edgetl.export import export_run

    host = cpu_facts(INT8_FLAGS)
    print(f"machine: {host['cpu']}, {host['cores']} cores, int8 flags: {' '.join(host['flags']) or 'none'}")
    report = {"machine": host, "threads": args.threads, "reference": [], "run": []}
    root = Path(tempfile.mkdtemp(prefix="bench-int8-"))
    try:
        t0 = time.perf_counter()
        run_dir = make_run(root, args.data, args.samples)
        result = export_run(run_dir, tflite=["int8"], onnx=[], echo=lambda _: None)
        if result.failed:
            raise SystemExit(f"export failed: {[a['error'] for a in result.manifest['artifacts'] if a['error']]}")
        int8 = run_dir / "exports" / "tflite-int8.tflite"
        print(f"reference-size export: {time.perf_counter() - t0:.0f} s")
        print(f"  edgetl:    {input_note(int8)}\n  reference: {input_note(args.reference)}")
        # A byte-identical copy of the reference timed alongside: how far from 1.00 noise alone puts a ratio.
        copy = root / f"copy-{args.reference.name}"
        shutil.copyfile(args.reference, copy)
        print(f"\n[1] edgetl tflite-int8 vs {args.reference.name}")
        report["reference"] = table([("tflite-int8 / reference", int8, args.reference),
                                     ("reference copy / reference (noise)", copy, args.reference)], args.threads, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    if args.run is not None:
        exports = args.run / "exports"
        files = {p.stem: p for p in exports.iterdir() if p.suffix in (".tflite", ".onnx")}
        rows = [(f"{a} / {b}", files[a], files[b]) for a, b, _, _ in PAIRS if a in files and b in files]
        missing = [f"{a} / {b}" for a, b, _, _ in PAIRS if a not in files or b not in files]
        print(f"\n[2] {exports}" + (f" (not in it: {', '.join(missing)})" if missing else ""))
        report["run"] = table(rows, args.threads, args) if rows else []

    targets = {f"{a} / {b}": (lat, size) for a, b, lat, size in PAIRS} | {"tflite-int8 / reference": (1.0, None),
                                                                          "reference copy / reference (noise)": (None, None)}
    print("\nratios (artifact / baseline):")
    for r in report["reference"] + report["run"]:
        latency, size = targets[r["pair"]]
        print(f"  {r['pair']:<40} {r['threads']} thr  latency {r['latency_ratio']:.3f} {verdict(r['latency_ratio'], latency)}"
              f"  size {r['size_ratio']:.3f} {verdict(r['size_ratio'], size)}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
