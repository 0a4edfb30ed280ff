"""Training benchmarks (issue 2), ratios measured in one run:

1. stage 1 for 10 epochs with cached backbone features vs end to end through the frozen backbone
   (target: cached >= 5x faster);
2. training throughput through the real input pipeline (Pillow decode -> cache -> batch -> prefetch)
   vs the same steps on in-memory tensors (target: >= 0.9).

Uses flowers5 and the offline ImageNet MobileNetV2 weights when ../shared is present, else digits
with random weights. Each stage-1 time is the best of `--repeat` runs (other processes on a shared
machine only ever add time); CPU seconds of this process are reported beside the wall times.
Usage: python benchmarks/bench_train.py [--size 160] [--repeat 1] [--skip-throughput] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import edgetl  # noqa: F401  (sets TF_USE_LEGACY_KERAS first)
from edgetl.data import load_arrays, load_splits, make_dataset
from edgetl.recipe import recipe_from_dict
from edgetl.training.supervised import Trainer, compile_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def bench_recipe(size: int, epochs: int, cached: bool | None = None):
    data = SHARED / "data" / "flowers5"
    weights = SHARED / "weights" / "mobilenet_v2_1.0_224_imagenet_notop_bncal.h5"
    have_shared = data.is_dir() and weights.is_file()
    raw = {"name": "bench", "data": {"source": str(data) if have_shared else "digits", "image_size": size,
                                     "batch_size": 32},
           "model": {"weights": str(weights) if have_shared else None},
           "train": {"stage1": {"epochs": epochs, "cache_features": cached}, "stage2": {"epochs": 0},
                     "early_stopping_patience": 0}}
    return recipe_from_dict(raw)


def time_stage1(recipe) -> dict:
    """Wall and CPU seconds of stage 1 (the trainer is built outside the timing), and of its feature extraction."""
    trainer = Trainer(recipe, load_splits(recipe), echo=lambda *_: None)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.stage1()
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "feature_extraction_s": trainer.timings.get("feature_extraction_s")}


def best_stage1(size: int, epochs: int, cached: bool, repeat: int) -> dict:
    """The fastest of `repeat` stage-1 runs."""
    return min((time_stage1(bench_recipe(size, epochs, cached)) for _ in range(repeat)), key=lambda r: r["wall_s"])


def throughput(recipe, epochs: int = 3) -> dict:
    """Images/s of fine-tuning steps fed by the real pipeline vs by in-memory tensors (same model)."""
    import tensorflow as tf

    from edgetl.backbones import unfreeze

    splits = load_splits(recipe)
    trainer = Trainer(recipe, splits, echo=lambda *_: None)
    unfreeze(trainer.clf.backbone, fraction=0.3)
    compile_model(trainer.clf.model, 1e-5, 0.0)
    size, n, bs = trainer.size, len(splits.train), recipe.data.batch_size
    pipeline = make_dataset(splits.train, size, recipe.data.resize, bs, shuffle=True, seed=0)
    pipeline = pipeline.map(lambda x, y: (x, tf.one_hot(y, splits.num_classes)))
    images, labels = load_arrays(splits.train, size, recipe.data.resize)
    memory = tf.data.Dataset.from_tensor_slices((images.astype(np.float32), tf.one_hot(labels, splits.num_classes)))
    memory = memory.shuffle(n, seed=0).batch(bs).prefetch(tf.data.AUTOTUNE)
    out = {}
    for name, ds in (("pipeline", pipeline), ("in_memory", memory)):
        t0 = time.perf_counter()
        trainer.clf.model.fit(ds, epochs=1, verbose=0)  # warm-up: tracing, and the pipeline fills its cache
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        trainer.clf.model.fit(ds, epochs=epochs, verbose=0)
        out[name] = {"images_per_s": n * epochs / (time.perf_counter() - t0), "first_epoch_s": first}
    out["ratio"] = out["pipeline"]["images_per_s"] / out["in_memory"]["images_per_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=1, help="Stage-1 runs per mode; the fastest counts.")
    parser.add_argument("--skip-throughput", action="store_true", help="Only the stage-1 cache comparison.")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    recipe = bench_recipe(args.size, args.epochs)
    print(f"data: {recipe.data.source}, weights: {recipe.model.weights}, {args.size}px, {args.epochs} epochs")
    uncached = best_stage1(args.size, args.epochs, False, args.repeat)
    cached = best_stage1(args.size, args.epochs, True, args.repeat)
    speedup = uncached["wall_s"] / cached["wall_s"]
    print(f"stage 1, {args.epochs} epochs: end to end {uncached['wall_s']:.1f}s ({uncached['cpu_s']:.1f} CPU s), "
          f"cached features {cached['wall_s']:.1f}s ({cached['cpu_s']:.1f} CPU s, of which feature extraction "
          f"{cached['feature_extraction_s']:.1f}s) -> {speedup:.1f}x faster (target >= 5x) "
          f"{'PASS' if speedup >= 5 else 'FAIL'}")
    out = {"stage1_uncached": uncached, "stage1_cached": cached, "cache_speedup": speedup}
    if not args.skip_throughput:
        tp = out["throughput"] = throughput(bench_recipe(args.size, args.epochs))
        print(f"fine-tuning throughput: pipeline {tp['pipeline']['images_per_s']:.1f} img/s, in-memory "
              f"{tp['in_memory']['images_per_s']:.1f} img/s -> ratio {tp['ratio']:.2f} (target >= 0.9) "
              f"{'PASS' if tp['ratio'] >= 0.9 else 'FAIL'}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
