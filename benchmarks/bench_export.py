"""Latency of edgetl's TFLite exports against two baselines, under one LiteRT interpreter and thread count.

1. int8 (uint8 I/O) export of MobileNetV2 1.0 at 224 (ImageNet backbone, 1001-way head like the
   reference) vs Google's int8 MobileNetV2 `tf2_mobilenet_v2_1.0_224_ptq.tflite`. Target ratio <= 1.00.
2. fp32 export (preprocessing baked in) vs a bare `TFLiteConverter.from_keras_model` of the same
   network without the Rescaling layer. Target ratio <= 1.05.

Both edgetl artifacts come from `edgetl.export.export_run` on a throw-away run directory (calibrated on
flowers5 training images). Models are timed on edgetl's runner in interleaved rounds so that machine noise
hits them alike; the ratio is of medians over all timed invocations. benchmarks/bench_int8.py reuses the
run and the timing for the int8 ratios at several thread counts. Needs the offline ImageNet weights in
~/.keras/models (see ../shared/weights/SOURCE.md).

    .venv/bin/python benchmarks/bench_export.py [--threads 1] [--rounds 15] [--runs 10]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import edgetl  # noqa: F401 - configures TensorFlow before it is imported

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
REFERENCE = SHARED / "reference" / "tf2_mobilenet_v2_1.0_224_ptq.tflite"
SIZE = 224


def make_run(root: Path, data: Path, samples: int) -> Path:
    """A run directory holding the ImageNet MobileNetV2 classifier (1001 classes; head weights untrained)."""
    from edgetl.backbones import build_classifier
    from edgetl.io import atomic_write_text
    from edgetl.recipe import recipe_from_dict
    from edgetl.rundir import RunDir

    recipe = recipe_from_dict({
        "name": "bench-mobilenet_v2", "data": {"source": str(data), "image_size": SIZE},
        "model": {"backbone": "mobilenet_v2", "alpha": 1.0, "weights": "imagenet"},
        "export": {"tflite": ["int8", "fp32"], "onnx": [], "io": "uint8", "representative_samples": samples}})
    clf = build_classifier(1001, "mobilenet_v2", SIZE, alpha=1.0, weights="imagenet")
    run = RunDir(root / "run")
    run.path.mkdir(parents=True)
    atomic_write_text(run.recipe_path, recipe.to_yaml())
    atomic_write_text(run.labels_path, "".join(f"class_{i}\n" for i in range(1001)))
    clf.model.save(run.model_path)
    return run.path


def bare_fp32(run_dir: Path) -> bytes:
    """The same trained network without the baked-in Rescaling, converted with default settings."""
    import tensorflow as tf
    import tf_keras as keras

    from edgetl.rundir import RunDir

    model = RunDir(run_dir).load_model()
    image = keras.Input((SIZE, SIZE, 3), name="image")
    x = image
    assert model.layers[1].name == "preprocess", [layer.name for layer in model.layers]
    for layer in model.layers[2:]:  # skip the input and the `preprocess` Rescaling layer
        x = layer(x, training=False) if isinstance(layer, keras.Model) else layer(x)
    return tf.lite.TFLiteConverter.from_keras_model(keras.Model(image, x)).convert()


class Timed:
    """One artifact on edgetl's runner (LiteRT for .tflite, ONNX Runtime for .onnx; what validate runs) with a fixed
    random input; `time(n, warmup)` appends n single-invoke latencies (ms).

    Its interpreter lives only while it is timed: two live interpreters' thread pools in one process slow each other
    (flowers5 tflite-int8_repaired, whose float layers split it into several partitions, measured 3.38 ms at 2
    threads next to a live tflite-int8 and 2.04 ms alone).
    """

    def __init__(self, name: str, path: Path, threads: int):
        self.name, self.path, self.threads = name, Path(path), threads
        self.ops = _ops(self.path)
        self.samples: list[float] = []

    def time(self, n: int, warmup: int) -> None:
        from edgetl.edge.runtime import open_model

        runner = open_model(self.path, threads=self.threads)
        for _ in range(warmup):
            runner.time_invoke(runs=1, warmup=0)
        self.samples += [runner.time_invoke(runs=1, warmup=0).p50_ms for _ in range(n)]

    @property
    def median(self) -> float:
        import numpy as np

        return float(np.median(self.samples))


def _ops(path: Path) -> Counter:
    """Op (TFLite) or node type (ONNX) counts of an artifact."""
    if path.suffix == ".onnx":
        import onnx

        return Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    return Counter(op["op_name"] for op in interpreter._get_ops_details() if op["op_name"] != "DELEGATE")


def interleave(models: list[Timed], rounds: int, runs: int, warmup: int) -> None:
    """Time `models` in interleaved rounds (machine noise hits them alike), each round after `warmup` untimed
    invokes of a freshly opened interpreter."""
    for _ in range(rounds):
        for model in models:
            model.time(runs, warmup)


def compare(a: Timed, b: Timed, rounds: int, runs: int, warmup: int) -> float:
    """Interleaved timing; prints both medians and op counts, returns median(a) / median(b)."""
    interleave([a, b], rounds, runs, warmup)
    for model in (a, b):
        print(f"  {model.name:<34} median {model.median:8.2f} ms  ops {dict(sorted(model.ops.items()))}")
    return a.median / b.median


def timing_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options this benchmark and bench_int8.py share: timing rounds, the int8 export's data, the reference."""
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--runs", type=int, default=10, help="invocations per model per round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--samples", type=int, default=100, help="calibration images for the int8 export")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "flowers5", help="calibration dataset")
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    return parser


def main() -> None:
    parser = timing_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--threads", type=int, default=1, help="interpreter threads (same for every model)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the throw-away run directory here")
    args = parser.parse_args()

    from edgetl.export import export_run

    root = Path(tempfile.mkdtemp(prefix="bench-export-")) if args.keep is None else args.keep
    try:
        t0 = time.perf_counter()
        run_dir = make_run(root, args.data, args.samples)
        result = export_run(run_dir, tflite=["int8", "fp32"], onnx=[], echo=lambda _: None)
        if result.failed:
            raise SystemExit(f"export failed: {[a['error'] for a in result.manifest['artifacts'] if a['error']]}")
        sizes = {a["variant"]: a["size_bytes"] for a in result.manifest["artifacts"]}
        exports = run_dir / "exports"
        bare = exports / "bare-fp32.tflite"
        bare.write_bytes(bare_fp32(run_dir))
        print(f"exports and bare conversion: {time.perf_counter() - t0:.0f} s; int8/fp32 size ratio "
              f"{sizes['int8'] / sizes['fp32']:.3f} ({sizes['int8'] / 1e6:.2f} MB / {sizes['fp32'] / 1e6:.2f} MB)")

        print(f"\n[1] int8 uint8-io export vs {args.reference.name} ({args.threads} thread(s))")
        int8_ratio = compare(Timed("edgetl tflite-int8", exports / "tflite-int8.tflite", args.threads),
                             Timed("reference int8", args.reference, args.threads),
                             args.rounds, args.runs, args.warmup)
        print(f"\n[2] fp32 export vs bare TFLiteConverter without baked preprocessing ({args.threads} thread(s))")
        fp32_ratio = compare(Timed("edgetl tflite-fp32", exports / "tflite-fp32.tflite", args.threads),
                             Timed("bare from_keras_model fp32", bare, args.threads),
                             args.rounds, args.runs, args.warmup)
        print(f"\nint8 latency ratio edgetl / reference: {int8_ratio:.3f}  (target <= 1.00: "
              f"{'PASS' if int8_ratio <= 1.0 else 'FAIL'})")
        print(f"fp32 latency ratio edgetl / bare:      {fp32_ratio:.3f}  (target <= 1.05: "
              f"{'PASS' if fp32_ratio <= 1.05 else 'FAIL'})")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
