"""The run directory: the contract between stages, and atomic file writing for all of them.

Layout of `models/<recipe-name>/<run-id>/`: recipe.yaml, labels.txt (labels_<head>.txt per head of a
multi-task recipe), model.keras, history.json,
metrics.json, manifest.json, plots; `exports/` (export stage) and `validation/` (validation stage).
Each stage reads what the previous one wrote and writes its own files through `atomic_path`, so an
interrupted stage never leaves a half-written file that a later stage could mistake for output.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator


def load_keras_model(path: str | os.PathLike):
    """An uncompiled tf_keras model from a `.keras` file, with its weights file read from disk.

    `keras.models.load_model` lets h5py read the weights inside the zip archive, and Python 3.11's zipfile
    re-reads a member from its start on every backward seek: 16 s for MobileNetV2 here. Extracting the
    weights file first and loading it with `load_weights` gives the same model in a fraction of that.
    """
    import tf_keras as keras

    if not zipfile.is_zipfile(path):
        return keras.models.load_model(path, compile=False)  # not an archive: Keras's own error names the file
    with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory(prefix="edgetl-model.") as tmp:
        if not {"config.json", "model.weights.h5"} <= set(archive.namelist()):
            return keras.models.load_model(path, compile=False)  # another layout: let Keras read it
        config = json.loads(archive.read("config.json"))
        config["compile_config"] = None
        model = keras.saving.deserialize_keras_object(config)
        model.load_weights(archive.extract("model.weights.h5", tmp))
    return model


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


def read_labels(path: Path) -> list[str]:
    """Class names in index order from a labels file (one per line)."""
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line]


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class RunDir:
    """Paths and loaders for one run directory."""

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

    def require(self, *paths: Path) -> None:
        """Fail with a clear message if a file an earlier stage should have written is missing."""
        for p in paths:
            if not p.exists():
                raise FileNotFoundError(
                    f"{p} is missing: {self.path} is not a finished training run "
                    f"(run `edgetl train RECIPE` first, or point at the run directory it printed)"
                )

    def labels(self) -> list[str]:
        """Class names in index order."""
        self.require(self.labels_path)
        return read_labels(self.labels_path)

    def head_labels_path(self, head: str) -> Path:
        """labels_<head>.txt: one multi-task head's class names in index order."""
        return self.path / head_labels_name(head)

    def head_labels(self) -> dict[str, list[str]]:
        """{head: class names} of a multi-task run (recipe `model.heads`), in output order; {} for one head."""
        names = [h.name for h in self.load_recipe().model.heads]
        self.require(*(self.head_labels_path(n) for n in names))
        return {n: read_labels(self.head_labels_path(n)) for n in names}

    def load_recipe(self):
        """The resolved recipe this run was trained with."""
        from edgetl.recipe import load_recipe

        self.require(self.recipe_path)
        return load_recipe(self.recipe_path)

    def load_model(self):
        """The trained tf_keras model (uncompiled: later stages compile what they need)."""
        self.require(self.model_path)
        return load_keras_model(self.model_path)
