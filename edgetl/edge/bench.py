"""`edgetl-bench MODEL`: latency, load time, memory and (optionally) accuracy of one artifact on this machine.

Runs where only NumPy, Pillow and one runtime are installed (a board, or the zipapp runner), prints a
short table and writes a JSON document that the host can compare against its own run.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import edgetl
from edgetl.edge.evaluate import evaluate_images
from edgetl.edge.images import RESIZE_MODES
from edgetl.edge.runtime import RUNTIMES, ModelError, RuntimeMissingError, model_labels, open_model, peak_rss_mb, resolve_runtime
from edgetl.errors import EdgetlError
from edgetl.io import atomic_write_json

XNNPACK_MODES = {"on": (True,), "off": (False,), "both": (True, False)}
EXIT_FAILED, EXIT_USAGE, EXIT_ENVIRONMENT = 1, 2, 3


class BenchError(EdgetlError, ValueError):
    """A bench option the runner cannot use."""


@dataclass(frozen=True)
class BenchOptions:
    """What to measure: thread counts, timed/warm-up runs, batch, XNNPACK modes (LiteRT), optional images, runtime."""

    threads: Tuple[int, ...] = (1, 2, 4)
    runs: int = 50
    warmup: int = 5
    batch: int = 1
    xnnpack: str = "both"
    images: Optional[str] = None
    labels: Optional[str] = None
    resize: str = "plain"
    runtime: str = "auto"

    def to_args(self) -> List[str]:
        """The edgetl-bench command-line options that reproduce these options (for the runner elsewhere)."""
        args = ["--threads", ",".join(map(str, self.threads)), "--runs", str(self.runs),
                "--warmup", str(self.warmup), "--batch", str(self.batch), "--xnnpack", self.xnnpack,
                "--resize", self.resize, "--runtime", self.runtime]
        if self.images:
            args += ["--images", str(self.images)]
        if self.labels:
            args += ["--labels", str(self.labels)]
        return args


def run_bench(model_path, options: BenchOptions = BenchOptions()) -> dict:
    """Benchmark one artifact: a latency row per (threads, XNNPACK) and predictions for `options.images`."""
    path = Path(model_path)
    modes = XNNPACK_MODES[options.xnnpack] if resolve_runtime(path, options.runtime) == "litert" else (None,)
    latency, doc = [], {}
    for threads in options.threads:
        for xnnpack in modes:
            runner = open_model(path, threads=threads, xnnpack=xnnpack is not False, runtime=options.runtime)
            stats = runner.time_invoke(batch=options.batch, runs=options.runs, warmup=options.warmup)
            latency.append({"threads": threads, "xnnpack": xnnpack, "load_time_s": runner.load_time_s, **stats.to_dict()})
            if not doc:
                doc = _describe(runner, options)
    doc["latency"] = latency
    doc["peak_rss_mb"] = peak_rss_mb()
    return doc


def _describe(runner, options: BenchOptions) -> dict:
    """Device and model facts plus, with images, the predictions of this (first) runner."""
    labels, labels_source = model_labels(runner.path, options.labels)
    doc = {
        "tool": "edgetl-bench", "edgetl_version": edgetl.__version__,
        "device": device_facts(runner.runtime_name, runner.runtime_version),
        "model": {**runner.describe(), "labels": labels_source, "num_labels": len(labels) if labels else None},
        "settings": {**asdict(options), "threads": list(options.threads)},
        "images": None, "predictions": [], "accuracy": None,
    }
    if options.images:
        height, width = runner.input_shape[:2]
        if height != width:
            raise ModelError(f"{runner.path}: input is {height}x{width}; image decoding needs a square input")
        result = evaluate_images(runner, options.images, labels, height, options.resize)
        doc["predictions"] = result.pop("predictions")
        doc["accuracy"] = result.pop("accuracy")
        doc["images"] = {"dir": str(options.images), "size": height, "resize": options.resize, **result}
    return doc


def device_facts(runtime_name: Optional[str] = None, runtime_version: Optional[str] = None) -> dict:
    """Machine, OS, CPU, Python and library versions of the machine this runs on."""
    import numpy
    import PIL

    return {
        "hostname": platform.node(), "machine": platform.machine(), "system": platform.system(),
        "os": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "python_executable": sys.executable,
        "numpy": numpy.__version__, "pillow": PIL.__version__,
        "runtime": runtime_name, "runtime_version": runtime_version,
    }


def _cpu_model() -> Optional[str]:
    """CPU name from /proc/cpuinfo (x86 'model name', ARM boards 'Model'), else platform.processor()."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    for key in ("model name", "Model", "Hardware"):
        for line in lines:
            name, _, value = line.partition(":")
            if name.strip() == key and value.strip():
                return value.strip()
    return platform.processor() or None


def format_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """Columns two spaces apart; numeric columns right-aligned, text columns left-aligned."""
    numeric = [all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in col)
               for col in zip(*rows)] if rows else [False] * len(headers)
    cells = [list(map(str, headers))] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.rjust(w) if right else c.ljust(w) for c, w, right in zip(row, widths, numeric)).rstrip()
        for row in cells
    )


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def format_report(doc: dict) -> str:
    """The short human-readable summary of a benchmark document."""
    model, device = doc["model"], doc["device"]
    shape = "x".join(map(str, model["input_shape"]))
    lines = [
        f"model   {model['name']}  {model['kind']}  {model['input_dtype']} {shape}  "
        f"{model['size_bytes'] / 1024:.1f} KB  {model['runtime']} {model['runtime_version']}",
        f"device  {device['machine']}  {device['os']}  Python {device['python']}  {device['cpu_count']} CPUs",
        "",
        format_table(
            ["threads", "xnnpack", "load ms", "mean ms", "p50 ms", "p90 ms", "p99 ms", "std ms"],
            [[r["threads"], r["xnnpack"], r["load_time_s"] * 1000, r["mean_ms"], r["p50_ms"], r["p90_ms"],
              r["p99_ms"], r["std_ms"]] for r in doc["latency"]],
        ),
        "",
        f"batch {doc['settings']['batch']}, {doc['settings']['runs']} timed runs after "
        f"{doc['settings']['warmup']} warm-up; peak RSS {_cell(doc['peak_rss_mb'])} MB",
    ]
    images = doc.get("images")
    if images:
        accuracy = "no accuracy (flat folder)" if images["layout"] == "flat" else (
            "no accuracy (no labels: put labels.txt beside the model or pass --labels)"
            if doc["accuracy"] is None else f"accuracy {doc['accuracy'] * 100:.1f}%")
        lines.append(f"images  {images['count']} predicted, {len(images['skipped'])} skipped, {accuracy}")
    return "\n".join(lines)


def parse_threads(text: str) -> Tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); ValueError naming the expected form otherwise."""
    try:
        threads = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        threads = ()
    if not threads or min(threads) < 1:
        raise BenchError(f"{text!r} is not a comma-separated list of thread counts >= 1, e.g. 1,2,4")
    return threads


def _thread_list(text: str) -> Tuple[int, ...]:
    try:
        return parse_threads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    defaults = BenchOptions()
    parser = argparse.ArgumentParser(
        prog="edgetl-bench", description="Benchmark a .tflite or .onnx model on this machine (no TensorFlow needed).")
    parser.add_argument("model", help="path to a .tflite or .onnx file")
    parser.add_argument("--threads", type=_thread_list, default=defaults.threads,
                        help="comma-separated CPU thread counts to time (default 1,2,4)")
    parser.add_argument("--runs", type=_positive, default=defaults.runs, help="timed runs per setting (default 50)")
    parser.add_argument("--warmup", type=_non_negative, default=defaults.warmup, help="untimed runs first (default 5)")
    parser.add_argument("--batch", type=_positive, default=defaults.batch, help="batch size to time (default 1)")
    parser.add_argument("--xnnpack", choices=sorted(XNNPACK_MODES), default=defaults.xnnpack,
                        help="LiteRT: time with the XNNPACK delegate on, off or both (default both)")
    parser.add_argument("--runtime", choices=RUNTIMES, default=defaults.runtime,
                        help="auto (default): LiteRT for .tflite, ONNX Runtime for .onnx; openvino reads both")
    parser.add_argument("--images", help="folder of images: one subfolder per class (accuracy) or flat")
    parser.add_argument("--labels", help="labels file, one class per line (default: model metadata, else labels.txt beside it)")
    parser.add_argument("--resize", choices=RESIZE_MODES, default=defaults.resize, help="how images are resized (default plain)")
    parser.add_argument("--json", dest="json_out", help="also write the full results as JSON to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the top-1 prediction of every image")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point; exit 0 ok, 1 failed (bad model/images), 2 usage, 3 no runtime installed."""
    args = build_parser().parse_args(argv)
    options = BenchOptions(threads=args.threads, runs=args.runs, warmup=args.warmup, batch=args.batch,
                           xnnpack=args.xnnpack, images=args.images, labels=args.labels, resize=args.resize,
                           runtime=args.runtime)
    try:
        doc = run_bench(args.model, options)
    except RuntimeMissingError as exc:
        print(f"edgetl-bench: error: {exc}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except (ValueError, OSError) as exc:  # ModelError, ImageFolderError, wrong shapes; unreadable files
        print(f"edgetl-bench: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(format_report(doc))
    if args.verbose and doc["predictions"]:
        print(format_table(["image", "top-1", "score", "expected"],
                           [[p["path"], p["label"] or p["top1"], p["score"], p.get("expected")] for p in doc["predictions"]]))
    if args.json_out:
        atomic_write_json(args.json_out, doc)
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
