"""Training benchmarks (issue 2), ratios measured in one run:

1. stage 1 for 10 epochs with cached backbone features vs end to end through the frozen backbone
   (target: cached >= 5x faster);
2. training throughput through the real input pipeline (Pillow decode -> cache -> batch -> prefetch)
   vs the same steps on in-memory tensors (target: >= 0.9).

Uses flowers5 and the offline ImageNet MobileNetV2 weights when ../shared is present, else digits
with random weights. Usage: python benchmarks/bench_train.py [--size 160] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import edgetl  # noqa: F401  (sets TF_USE_LEGACY_KERAS first)

import numpy as np

from edgetl.data import load_arrays, load_splits, make_dataset
from edgetl.recipe import recipe_from_dict
from edgetl.train import Trainer

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def bench_recipe(size: int, epochs: int):
    data = SHARED / "data" / "flowers5"
    weights = SHARED / "weights" / "mobilenet_v2_1.0_224_imagenet_notop_bncal.h5"
    have_shared = data.is_dir() and weights.is_file()
    raw = {"name": "bench", "data": {"source": str(data) if have_shared else "digits", "image_size": size,
                                     "batch_size": 32},
           "model": {"weights": str(weights) if have_shared else None},
           "train": {"stage1": {"epochs": epochs}, "stage2": {"epochs": 0}, "early_stopping_patience": 0}}
    return recipe_from_dict(raw)


def time_stage1(recipe, cached: bool) -> float:
    recipe.train.stage1.cache_features = cached
    trainer = Trainer(recipe, load_splits(recipe), echo=lambda *_: None)
    t0 = time.perf_counter()
    trainer.stage1()
    return time.perf_counter() - t0


def throughput(recipe, epochs: int = 3) -> dict:
    """Images/s of fine-tuning steps fed by the real pipeline vs by in-memory tensors (same model)."""
    import tensorflow as tf

    splits = load_splits(recipe)
    trainer = Trainer(recipe, splits, echo=lambda *_: None)
    trainer.recipe.train.stage2.epochs = 1
    from edgetl.backbones import unfreeze
    from edgetl.train import _compile

    unfreeze(trainer.clf.backbone, fraction=0.3)
    _compile(trainer.clf.model, 1e-5, 0.0)
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
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    recipe = bench_recipe(args.size, args.epochs)
    print(f"data: {recipe.data.source}, weights: {recipe.model.weights}, {args.size}px, {args.epochs} epochs")
    uncached = time_stage1(bench_recipe(args.size, args.epochs), cached=False)
    cached = time_stage1(bench_recipe(args.size, args.epochs), cached=True)
    speedup = uncached / cached
    print(f"stage 1, {args.epochs} epochs: end to end {uncached:.1f}s, cached features {cached:.1f}s "
          f"-> {speedup:.1f}x faster (target >= 5x) {'PASS' if speedup >= 5 else 'FAIL'}")
    tp = throughput(bench_recipe(args.size, args.epochs))
    print(f"fine-tuning throughput: pipeline {tp['pipeline']['images_per_s']:.1f} img/s, in-memory "
          f"{tp['in_memory']['images_per_s']:.1f} img/s -> ratio {tp['ratio']:.2f} (target >= 0.9) "
          f"{'PASS' if tp['ratio'] >= 0.9 else 'FAIL'}")
    if args.json:
        args.json.write_text(json.dumps({"stage1_uncached_s": uncached, "stage1_cached_s": cached,
                                         "cache_speedup": speedup, "throughput": tp}, indent=2))


if __name__ == "__main__":
    main()
