"""Intermediate-layer features of a trained run: pooled activations of named backbone layers.

For clustering, retrieval or a classical classifier, and for a quick probe of how transferable each
depth of the backbone is (a logistic regression per layer). Images are decoded exactly as in training,
with the run's recipe (size, resize mode) and splits.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

import numpy as np

from edgetl.errors import EdgetlError
from edgetl.io import atomic_path
from edgetl.rundir import RunDir


class FeaturesError(EdgetlError, ValueError):
    """A layer, split or output file the feature extraction cannot use."""


SPLITS = ("train", "test")


def _backbone(model):
    """The nested backbone Model inside a run's classifier."""
    import tf_keras as keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            return layer
    raise FeaturesError(f"model {model.name!r} has no nested backbone model; was it trained by edgetl?")


def list_layers(run_dir: str | os.PathLike) -> list[tuple[str, tuple]]:
    """(name, output shape) of every backbone layer of the run, input to output."""
    return backbone_layers(RunDir(run_dir).load_model())


def backbone_layers(model) -> list[tuple[str, tuple]]:
    """(name, output shape) of every layer of a classifier's nested backbone, input layer excluded."""
    return [(layer.name, tuple(_single(layer.output_shape))) for layer in _backbone(model).layers[1:]]


def default_layers(run_dir: str | os.PathLike) -> list[str]:
    """The backbone registry's suggested probe layers (early to last) for the run's architecture."""
    from edgetl.backbones import get_spec

    return list(get_spec(RunDir(run_dir).load_recipe().model.backbone).feature_layers)


def _single(shape):
    return shape[0] if isinstance(shape, list) else shape


def feature_model(model, layers: list[str]):
    """Raw image -> [globally average-pooled activation of each named backbone layer]."""
    import tf_keras as keras

    backbone = _backbone(model)
    names = [layer.name for layer in backbone.layers]
    for name in layers:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise FeaturesError(f"no layer named {name!r} in backbone {backbone.name!r}.{hint} "
                             f"List the names with `edgetl features RUN_DIR --list-layers`")
    taps = keras.Model(backbone.input, [backbone.get_layer(n).output for n in layers], name="taps")
    image = keras.Input(model.input_shape[1:], name="image")
    x = image
    for layer in model.layers[1:model.layers.index(backbone)]:  # baked-in preprocessing
        x = layer(x)
    outputs = taps(x, training=False)
    outputs = outputs if isinstance(outputs, list) else [outputs]
    pooled = [keras.layers.GlobalAveragePooling2D()(t) if len(t.shape) == 4 else t for t in outputs]
    return keras.Model(image, pooled, name="pooled_features")


def extract_features(run_dir: str | os.PathLike, layers: list[str], data_dir: str | os.PathLike | None = None,
                     split: str = "all", batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Pooled activations of `layers` for the run's train and/or test split.

    Returns flat arrays, as saved by `save_features`: `layers`, `class_names`, and per split
    `<split>/labels`, `<split>/paths` and `<split>/<layer>` (N, channels). `data_dir` defaults to the
    run's dataset; the split is the run's own (same seed and ratios).
    """
    from edgetl.data import load_splits, make_dataset

    if split not in ("all", *SPLITS):
        raise FeaturesError(f"split must be one of all, {', '.join(SPLITS)}; got {split!r}")
    if not layers:
        raise FeaturesError("name at least one layer (`edgetl features RUN_DIR --list-layers` shows them)")
    layers = list(dict.fromkeys(layers))  # a repeated name would collide in the saved keys
    run = RunDir(run_dir)
    recipe = run.load_recipe()
    model = run.load_model()
    extractor = feature_model(model, layers)
    size = int(model.input_shape[1])
    splits = load_splits(recipe, data_dir)
    if splits.class_names != run.labels():
        raise FeaturesError(f"{splits.root}: classes {splits.class_names} differ from the run's labels.txt "
                         f"{run.labels()}; use the dataset the run was trained on (same class folders)")
    out = {"layers": np.array(layers), "class_names": np.array(splits.class_names)}
    for name in SPLITS if split == "all" else (split,):
        samples = getattr(splits, name)
        ds = make_dataset(samples, size, recipe.data.resize, batch_size or recipe.data.batch_size, cache="none")
        feats = extractor.predict(ds, verbose=0)
        feats = feats if isinstance(feats, list) else [feats]
        out[f"{name}/labels"] = np.array([s.label for s in samples], dtype=np.int64)
        out[f"{name}/paths"] = np.array([s.path for s in samples])
        for layer, values in zip(layers, feats):
            out[f"{name}/{layer}"] = values.astype(np.float32)
    return out


def save_features(features: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Write the arrays of `extract_features` to one .npz file, atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        raise FeaturesError(f"{path}: the features file must end in .npz")
    with atomic_path(path) as tmp:
        np.savez(tmp, **features)
    return path


def load_features(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a features .npz back into a dict."""
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def probe(features: dict[str, np.ndarray], max_iter: int = 2000) -> list[dict]:
    """Fit a standardized logistic regression per layer on train features, score it on test.

    A linear probe: high test accuracy means the layer's pooled features already separate the
    classes, i.e. the layer transfers well to this dataset.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    missing = [f"{s}/labels" for s in SPLITS if f"{s}/labels" not in features]
    if missing:
        raise FeaturesError(f"the probe needs train and test features (missing {', '.join(missing)}); "
                         f"extract with split='all'")
    y_train, y_test = features["train/labels"], features["test/labels"]
    rows = []
    for layer in features["layers"]:
        layer = str(layer)
        x_train, x_test = features[f"train/{layer}"], features[f"test/{layer}"]
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
        clf.fit(x_train, y_train)
        rows.append({"layer": layer, "dim": int(x_train.shape[1]),
                     "train_top1": float(clf.score(x_train, y_train)),
                     "test_top1": float(clf.score(x_test, y_test)),
                     "n_train": int(len(y_train)), "n_test": int(len(y_test))})
    return rows
