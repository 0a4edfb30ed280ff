"""Image decoding shared by training, validation and the edge runner (Pillow + NumPy only).

Every stage decodes through `decode_image`, so the Keras model, its exports and the on-device
runner all see exactly the same pixels for the same file.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edgetl.errors import EdgetlError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
RESIZE_MODES = ("plain", "center_crop")


class ImageError(EdgetlError, ValueError):
    """A file that cannot be used as an image; `reason` says why in a few words."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def is_image_file(path: str | os.PathLike) -> bool:
    """True for the file endings edgetl reads (case-insensitive); hidden files are not images."""
    name = Path(path).name
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open any supported file as an 8-bit RGB image: first GIF frame, EXIF orientation applied."""
    try:
        with Image.open(path) as img:
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return _to_rgb8(img)
    except UnidentifiedImageError:
        raise ImageError(path, "not an image Pillow can identify") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(path, f"unreadable or truncated ({exc})") from None


def _to_rgb8(img: Image.Image) -> Image.Image:
    """Convert grayscale, 16-bit, palette, RGBA/LA (composited on black) and CMYK to 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "I;16N"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr * 255.0 / peak + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (0, 0, 0))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB") if img.mode != "RGB" else img


def resize(img: Image.Image, size: int, mode: str = "plain") -> Image.Image:
    """Resize to size x size: `plain` stretches, `center_crop` keeps the aspect ratio and crops."""
    if mode not in RESIZE_MODES:
        raise ImageError(f"resize mode {mode!r} is not one of {', '.join(RESIZE_MODES)}")
    if mode == "center_crop":
        return ImageOps.fit(img, (size, size), method=Image.BILINEAR)
    return img.resize((size, size), Image.BILINEAR)


def decode_image(path: str | os.PathLike, size: int, mode: str = "plain") -> np.ndarray:
    """Read a file into a (size, size, 3) uint8 RGB array; raises ImageError for unusable files."""
    return np.asarray(resize(load_rgb(path), size, mode), dtype=np.uint8)


def decode_images(paths, size: int, mode: str = "plain") -> np.ndarray:
    """Decode many files into one (N, size, size, 3) uint8 batch."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = decode_image(path, size, mode)
    return out
