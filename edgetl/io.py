"""TensorFlow-free file helpers shared by every stage and by the device side: atomic writes, JSON, label files.

Everything here imports only the standard library, so `edgetl.edge` and the zipapp runner can use it on boards
without TensorFlow. Every stage writes through `atomic_path`: an interrupted write never leaves a half-written file.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path` (same suffix); rename it onto `path` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON atomically (NumPy scalars and paths are converted)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def embedded_labels_name(output: str) -> str:
    """File name of one output's class names inside a .tflite's metadata (labels_<output>.txt, name made file-safe)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", output).strip("_.") or "output"
    return f"labels_{stem}.txt"


def head_labels_name(head: str) -> str:
    """File name of a multi-task head's class names."""
    return f"labels_{head}.txt"


def write_labels(folder: str | os.PathLike, primary: list[str], heads: dict[str, list[str]]) -> dict[str, str]:
    """Write labels.txt and one labels_<head>.txt per multi-task head into `folder`; returns {head: file name}."""
    folder = Path(folder)
    atomic_write_text(folder / "labels.txt", "\n".join(primary) + "\n")
    files = {head: head_labels_name(head) for head in heads}
    for head, names in heads.items():
        atomic_write_text(folder / files[head], "\n".join(names) + "\n")
    return files


def parse_labels(text: str) -> list[str]:
    """Class names in index order from a labels file's text: one per line, surrounding blanks and empty lines dropped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_labels(path: str | os.PathLike) -> list[str]:
    """Class names in index order from a labels file (one per line)."""
    return parse_labels(Path(path).read_text(encoding="utf-8"))


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def package_versions(distributions: Sequence[str]) -> dict:
    """{distribution: installed version or None} for `distributions`, plus python and edgetl."""
    from importlib.metadata import PackageNotFoundError, version

    from edgetl import __version__

    out: dict = {"python": platform.python_version(), "edgetl": __version__}
    for name in distributions:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


@dataclass(frozen=True)
class RunPaths:
    """Where each stage's files live in one run directory (paths only; `edgetl.rundir.RunDir` adds the loaders)."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    recipe_path = property(lambda self: self.path / "recipe.yaml")
    labels_path = property(lambda self: self.path / "labels.txt")
    model_path = property(lambda self: self.path / "model.keras")
    history_path = property(lambda self: self.path / "history.json")
    metrics_path = property(lambda self: self.path / "metrics.json")
    manifest_path = property(lambda self: self.path / "manifest.json")
    exports_dir = property(lambda self: self.path / "exports")
    validation_dir = property(lambda self: self.path / "validation")

    def head_labels_path(self, head: str) -> Path:
        """labels_<head>.txt: one multi-task head's class names in index order."""
        return self.path / head_labels_name(head)
