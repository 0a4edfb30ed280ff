"""The run directory: the contract between stages (paths, loaders, and the Keras model loader).

Layout of `models/<recipe-name>/<run-id>/`: recipe.yaml, labels.txt (labels_<head>.txt per head of a
multi-task recipe), model.keras, history.json,
metrics.json, manifest.json, plots; `exports/` (export stage) and `validation/` (validation stage).
Each stage reads what the previous one wrote and writes its own files through `atomic_path`, so an
interrupted stage never leaves a half-written file that a later stage could mistake for output.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edgetl.errors import EdgetlError
from edgetl.io import RunPaths, read_labels


def load_keras_model(path: str | os.PathLike):
    """An uncompiled tf_keras model from a `.keras` file, with its weights file read from disk.

    `keras.models.load_model` lets h5py read the weights inside the zip archive, and Python 3.11's zipfile
    re-reads a member from its start on every backward seek: 16 s for MobileNetV2 here. Extracting the
    weights file first and loading it with `load_weights` gives the same model in a fraction of that.
    A file that is neither a zip archive nor HDF5 (a truncated copy loses the zip directory at its end), or an
    archive that cannot be read, raises EdgetlError naming the file.
    """
    import h5py
    import tf_keras as keras

    damaged, fix = f"{path} is damaged or not a Keras model", "train the run again, or copy the whole file"
    if not zipfile.is_zipfile(path):
        if os.path.isfile(path) and not h5py.is_hdf5(path):
            raise EdgetlError(f"{damaged}: a .keras file is a zip archive, and this one has no zip directory (a "
                              f"truncated or overwritten copy?); {fix}")
        return keras.models.load_model(path, compile=False)  # a legacy HDF5 model (or Keras's file-not-found)
    with tempfile.TemporaryDirectory(prefix="edgetl-model.") as tmp:
        try:
            with zipfile.ZipFile(path) as archive:
                edgetl_layout = {"config.json", "model.weights.h5"} <= set(archive.namelist())
                if edgetl_layout:
                    config = json.loads(archive.read("config.json"))
                    weights = archive.extract("model.weights.h5", tmp)
        except (zipfile.BadZipFile, ValueError) as exc:  # a bad CRC, or a config.json that is not JSON
            raise EdgetlError(f"{damaged} ({type(exc).__name__}: {exc}); {fix}") from exc
        if not edgetl_layout:
            return keras.models.load_model(path, compile=False)  # another layout: let Keras read it
        config["compile_config"] = None
        model = keras.saving.deserialize_keras_object(config)
        model.load_weights(weights)
    return model


class RunDirError(EdgetlError, FileNotFoundError):
    """A file an earlier stage should have written is missing."""


@dataclass(frozen=True)
class RunDir(RunPaths):
    """Paths and loaders for one run directory."""

    def require(self, *paths: Path) -> None:
        """Fail with a clear message if a file an earlier stage should have written is missing."""
        for p in paths:
            if not p.exists():
                raise RunDirError(
                    f"{p} is missing: {self.path} is not a finished training run "
                    f"(run `edgetl train RECIPE` first, or point at the run directory it printed)"
                )

    def labels(self) -> list[str]:
        """Class names in index order."""
        self.require(self.labels_path)
        return read_labels(self.labels_path)

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
