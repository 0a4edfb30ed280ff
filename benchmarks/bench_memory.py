"""Memory benchmark (issue 7): peak memory of `edgetl train` must stay flat as the dataset grows.

Trains recipes/flowers_mobilenet_v2.yaml (shortened: 160 px, 2 cached stage-1 epochs, 1 fine-tuning
epoch) on flowers5 and on a copy 4x larger (every image repeated under new names, as hard links),
each in a fresh `edgetl train` process, for each requested `data.cache` mode. Peak RSS comes from
the run's manifest.json (what `edgetl train` prints) and, as a cross-check, from the kernel's
accounting of the whole child process (wait4). Target: 4x / 1x <= 1.2.

Usage: python benchmarks/bench_memory.py [--cache disk memory] [--size 160] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import edgetl  # noqa: F401  (sets TF_USE_LEGACY_KERAS first)
from edgetl.edge.images import is_image_file

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RECIPE = ROOT / "recipes" / "flowers_mobilenet_v2.yaml"
TARGET = 1.2


def repeat_dataset(src: Path, dst: Path, times: int) -> int:
    """Copy every image under `src` into `dst` `times` times under new names (hard links when possible)."""
    count = 0
    for path in sorted(src.rglob("*")):
        if not (path.is_file() and is_image_file(path)):
            continue
        folder = dst / path.parent.relative_to(src)
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(times):
            target = folder / f"{path.stem}_copy{k}{path.suffix}"
            try:
                os.link(path, target)
            except OSError:  # another filesystem, or links not allowed
                shutil.copyfile(path, target)
            count += 1
    return count


def train_once(data: Path, cache: str, size: int, work: Path) -> dict:
    """One `edgetl train` process; its peak RSS (manifest and wait4), wall time and training-set size."""
    out_root = work / "models"
    overrides = [f"data.image_size={size}", f"data.cache={cache}", "train.stage1.epochs=2",
                 "train.stage2.epochs=1", "train.early_stopping_patience=0"]
    cmd = [sys.executable, "-m", "edgetl.cli", "train", str(RECIPE), "--data", str(data), "--out", str(out_root)]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, "EDGETL_CACHE": str(work / "edgetl-cache")}  # a fresh disk cache, removed afterwards
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    log = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"edgetl train failed ({proc.returncode}):\n{log[-4000:]}")
    (run_dir,) = [p for p in (out_root / "flowers_mobilenet_v2").iterdir() if p.is_dir()]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    shutil.rmtree(out_root)
    shutil.rmtree(work / "edgetl-cache", ignore_errors=True)
    return {"peak_rss_mb": manifest["peak_rss_mb"], "process_peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "train_images": manifest["dataset"]["counts"]["train"]["total"], "wall_s": round(wall, 1),
            "timings_s": manifest["timings_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", nargs="+", default=["disk", "memory"], choices=["disk", "memory", "none"])
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    flowers = SHARED / "data" / "flowers5"
    if not flowers.is_dir():
        sys.exit(f"needs {flowers} (the project's ../shared folder)")
    results = {}
    with tempfile.TemporaryDirectory(prefix="edgetl-bench-memory-") as tmp:
        work = Path(tmp)
        n4 = repeat_dataset(flowers, work / "flowers5x4", 4)
        print(f"datasets: {flowers} and a 4x copy ({n4} images) at {args.size}px; "
              f"recipe {RECIPE.name} with 2 + 1 epochs")
        for cache in args.cache:
            runs = {name: train_once(data, cache, args.size, work)
                    for name, data in (("1x", flowers), ("4x", work / "flowers5x4"))}
            one, four = runs["1x"], runs["4x"]
            ratio = four["peak_rss_mb"] / one["peak_rss_mb"]
            extra = four["train_images"] - one["train_images"]
            pixels_mb = extra * args.size * args.size * 3 / 2**20
            print(f"cache {cache}: peak RSS 1x {one['peak_rss_mb']:.0f} MiB ({one['train_images']} train images, "
                  f"{one['wall_s']:.0f}s), 4x {four['peak_rss_mb']:.0f} MiB ({four['train_images']}, "
                  f"{four['wall_s']:.0f}s) -> ratio {ratio:.2f} (target <= {TARGET}) "
                  f"{'PASS' if ratio <= TARGET else 'FAIL'}")
            print(f"  growth {four['peak_rss_mb'] - one['peak_rss_mb']:+.0f} MiB for {extra} more training images "
                  f"(their decoded pixels: {pixels_mb:.0f} MiB); whole-process peak (wait4) "
                  f"{one['process_peak_rss_mb']:.0f} -> {four['process_peak_rss_mb']:.0f} MiB")
            results[cache] = {**runs, "ratio": ratio, "extra_train_images": extra,
                              "extra_decoded_mb": round(pixels_mb, 1)}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
