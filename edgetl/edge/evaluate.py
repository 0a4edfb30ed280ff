"""Top-1 predictions for a folder of images (class-per-folder or flat) and accuracy against the labels.

Paths in the results are relative to the folder, so a run on the device and one on the host can be
compared entry by entry.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from edgetl.edge.images import IMAGE_EXTENSIONS, ImageError, decode_image, is_image_file
from edgetl.errors import EdgetlError

CHUNK = 32


class ImageFolderError(EdgetlError, ValueError):
    """An images folder that does not fit either layout, or class folders that the labels do not name."""


def collect_images(folder) -> Tuple[str, List[Tuple[str, Optional[str]]]]:
    """('class_folders' | 'flat', [(path relative to folder, class name or None)]), sorted.

    Class folders are the visible subfolders (their images found recursively); flat means image files
    directly in the folder. A folder mixing both is ambiguous and rejected.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ImageFolderError(f"{root}: images folder not found")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p for p in root.iterdir() if p.is_file() and is_image_file(p))
    if subdirs and loose:
        raise ImageFolderError(
            f"{root}: has both images ({loose[0].name}, ...) and subfolders ({subdirs[0].name}, ...); "
            "use one class folder per class, or only images"
        )
    if subdirs:
        items = [
            (path.relative_to(root).as_posix(), sub.name)
            for sub in subdirs for path in sorted(sub.rglob("*")) if path.is_file() and is_image_file(path)
        ]
        layout = "class_folders"
    else:
        items = [(path.name, None) for path in loose]
        layout = "flat"
    if not items:
        raise ImageFolderError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    return layout, items


def evaluate_images(runner, folder, labels: Optional[List[str]], size: int, resize: str = "plain") -> dict:
    """Decode every image with Pillow, predict in chunks, and score class folders against `labels`.

    Returns {"layout", "count", "skipped": [{"path", "reason"}], "predictions": [{"path", "top1",
    "label", "score", "expected"?, "correct"?}], "accuracy": float | None}.
    """
    layout, items = collect_images(folder)
    root = Path(folder)
    index = _class_index(root, items, labels) if layout == "class_folders" else {}
    predictions, skipped = [], []
    for start in range(0, len(items), CHUNK):
        decoded = _decode_chunk(root, items[start:start + CHUNK], size, resize, skipped)
        if not decoded:
            continue
        probs = runner.predict(np.stack([pixels for _, _, pixels in decoded]))
        for (rel, cls, _), row in zip(decoded, probs):
            top1 = int(np.argmax(row))
            entry = {"path": rel, "top1": top1, "label": labels[top1] if labels and top1 < len(labels) else None,
                     "score": float(row[top1])}
            if cls is not None and index:
                entry["expected"] = cls
                entry["correct"] = top1 == index[cls]
            predictions.append(entry)
    scored = [p["correct"] for p in predictions if "correct" in p]
    return {
        "layout": layout, "count": len(predictions), "skipped": skipped, "predictions": predictions,
        "accuracy": float(np.mean(scored)) if scored else None,
    }


def _class_index(root: Path, items, labels: Optional[List[str]]) -> dict:
    """Class folder name -> label index; every folder must be a label (else accuracy would be wrong)."""
    if not labels:
        return {}
    folders = sorted({cls for _, cls in items})
    unknown = [name for name in folders if name not in labels]
    if unknown:
        raise ImageFolderError(
            f"{root}: class folders {', '.join(unknown)} are not among the model's labels "
            f"({', '.join(labels[:10])}{', ...' if len(labels) > 10 else ''}); rename them or pass --labels"
        )
    return {name: labels.index(name) for name in folders}


def _decode_chunk(root: Path, items, size: int, resize: str, skipped: list):
    """[(rel, class, pixels)] for the images that decode; the others are appended to `skipped`."""
    decoded = []
    for rel, cls in items:
        try:
            decoded.append((rel, cls, decode_image(root / rel, size, resize)))
        except ImageError as exc:
            skipped.append({"path": rel, "reason": exc.reason})
    return decoded
