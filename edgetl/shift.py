"""Simulated dataset shift: a copy of an image folder with one deterministic corruption per image.

For trying domain adaptation and robustness checks when no real deployment images exist yet. The
copy keeps the folder layout (class folders, train/ test/ val/), so it can serve as `adapt.target_data`
or `adapt.target_test`. A simulation is no substitute for images from the real camera.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from edgetl.edge.images import ImageError, is_image_file, load_rgb
from edgetl.errors import EdgetlError


# kind -> (default strength, what the strength means)
class ShiftError(EdgetlError, ValueError):
    """The source folder, output folder or shift kind cannot be used."""


SHIFT_KINDS = {
    "blur": (1.5, "Gaussian blur radius, percent of the shorter image side (defocus, cheap optics)"),
    "grayscale": (1.0, "mix towards luma (1 = fully gray, stored as 3-channel RGB: a monochrome sensor)"),
    "color": (0.3, "white-balance cast: red gain 1+s, blue gain 1-s (other lighting or sensor)"),
    "noise": (25.0, "standard deviation of Gaussian pixel noise on 0-255 (low light, small sensor)"),
    "jpeg": (8.0, "JPEG quality of one lossy round trip (heavy compression on the device path)"),
}
_SAVE_OPTIONS = {".jpg": {"quality": 95}, ".jpeg": {"quality": 95}}  # keep the copy's own loss small


def shift_image(img: Image.Image, kind: str, strength: float, rng: np.random.Generator) -> Image.Image:
    """Apply one shift to an RGB image (rng is used only by `noise`)."""
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(strength / 100.0 * min(img.size)))
    if kind == "grayscale":
        gray = img.convert("L").convert("RGB")
        return Image.blend(img, gray, min(max(strength, 0.0), 1.0))
    arr = np.asarray(img, dtype=np.float32)
    if kind == "color":
        arr = arr * np.array([1.0 + strength, 1.0, 1.0 - strength], dtype=np.float32)
    elif kind == "noise":
        arr = arr + rng.normal(0.0, strength, arr.shape).astype(np.float32)
    elif kind == "jpeg":
        import io

        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(round(strength)))
        buf.seek(0)
        return load_rgb(buf)
    else:
        raise ShiftError(f"unknown shift kind {kind!r}; choose one of {', '.join(SHIFT_KINDS)}")
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")


def shift_dataset(src: str | os.PathLike, out: str | os.PathLike, kind: str, seed: int = 0,
                  strength: float | None = None) -> dict:
    """Copy the image folder `src` to `out` with `kind` applied to every image; returns a summary.

    Images keep their relative paths and file format; other files (e.g. attributions) are copied
    unchanged; unreadable images are left out and listed. The copy is built beside `out` and renamed
    into place at the end, so an interrupted run leaves no partial dataset.
    """
    if kind not in SHIFT_KINDS:
        raise ShiftError(f"unknown shift kind {kind!r}; choose one of {', '.join(SHIFT_KINDS)}")
    src, out = Path(src).resolve(), Path(out).resolve()
    strength = SHIFT_KINDS[kind][0] if strength is None else float(strength)
    if not src.is_dir():
        raise ShiftError(f"{src}: dataset folder not found")
    if out == src or src in out.parents:
        raise ShiftError(f"--out {out} is inside the source dataset {src}; choose a folder outside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ShiftError(f"--out {out} already exists and is not empty; remove it or choose another folder")
    files = sorted(p for p in src.rglob("*") if p.is_file() and not _hidden(p.relative_to(src)))
    images = [p for p in files if is_image_file(p)]
    others = [p for p in files if not is_image_file(p)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for path in others:
            target = tmp / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            errors = list(pool.map(lambda p: _shift_file(p, src, tmp, kind, strength, seed), images))
        skipped = [{"path": str(p), "reason": err} for p, err in zip(images, errors) if err]
        summary = {"source": str(src), "out": str(out), "kind": kind, "strength": strength, "seed": seed,
                   "images": len(images) - len(skipped), "other_files": len(others), "skipped": skipped}
        (tmp / "SHIFT.md").write_text(_shift_note(summary), encoding="utf-8")
        os.chmod(tmp, 0o777 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _shift_file(path: Path, src: Path, dst: Path, kind: str, strength: float, seed: int) -> str | None:
    """Shift one image into the copy; returns the reason when the file is unreadable."""
    rel = path.relative_to(src)
    try:
        img = load_rgb(path)
    except ImageError as exc:
        return exc.reason
    # A per-file seed: the same file gets the same noise whatever the thread order.
    digest = hashlib.sha256(f"{seed}:{rel.as_posix()}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    target = dst / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    shift_image(img, kind, strength, rng).save(target, **_SAVE_OPTIONS.get(path.suffix.lower(), {}))
    return None


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _shift_note(summary: dict) -> str:
    meaning = SHIFT_KINDS[summary["kind"]][1]
    return (f"# Simulated dataset shift: {summary['kind']}\n\n"
            f"This folder is a copy of `{summary['source']}` with a synthetic **{summary['kind']}** shift "
            f"applied to every image (strength {summary['strength']:g}: {meaning}; seed {summary['seed']}), "
            f"made by `edgetl shift`.\n\n"
            f"It is a **simulation** for trying domain adaptation and robustness checks. It is not a "
            f"substitute for images from the real deployment camera: real shifts combine many effects "
            f"(optics, sensor, lighting, framing, subjects) that a single transformation does not model.\n\n"
            f"- images: {summary['images']}\n- other files copied unchanged: {summary['other_files']}\n"
            f"- unreadable images left out: {len(summary['skipped'])}\n")
