"""Intermediate-layer features: layer listing, pooled extraction, .npz round trip, logistic probe."""
from __future__ import annotations

import numpy as np
import pytest

from edgetl.backbones import get_spec
from edgetl.data import decode_images
from edgetl.features import (
    backbone_layers,
    default_layers,
    extract_features,
    feature_model,
    list_layers,
    load_features,
    probe,
    save_features,
)
from edgetl.rundir import RunDir

LAYERS = ["block_1_expand_relu", "out_relu"]


@pytest.fixture(scope="module")
def model(tiny_run):
    return RunDir(tiny_run.run_dir).load_model()


@pytest.fixture(scope="module")
def feats(tiny_run):
    return extract_features(tiny_run.run_dir, LAYERS + ["out_relu"])  # the repeat is dropped


def test_list_layers_names_and_shapes(tiny_run, model):
    layers = dict(list_layers(tiny_run.run_dir))
    assert list(layers.items()) == backbone_layers(model)
    assert set(get_spec("mobilenet_v2").feature_layers) <= set(layers)
    assert default_layers(tiny_run.run_dir) == list(get_spec("mobilenet_v2").feature_layers)
    assert layers["block_1_expand_relu"] == (None, 16, 16, 48)  # alpha 0.35 at 32 px
    assert layers["out_relu"] == (None, 1, 1, 1280)


def test_features_have_one_pooled_vector_per_image(tiny_run, model, feats):
    import tf_keras as keras

    shapes = dict(backbone_layers(model))
    assert list(feats["layers"]) == LAYERS
    assert list(feats["class_names"]) == RunDir(tiny_run.run_dir).labels()
    for split in ("train", "test"):
        n = len(feats[f"{split}/labels"])
        assert n == len(feats[f"{split}/paths"]) > 0
        for layer in LAYERS:
            assert feats[f"{split}/{layer}"].shape == (n, shapes[layer][-1])
    # the last layer, pooled, must equal the classifier's own pooled features (same decoding, preprocessing)
    pooled = keras.Model(model.input, model.get_layer("pool").output)
    images = decode_images(list(feats["test/paths"][:4]), 32).astype(np.float32)
    np.testing.assert_allclose(feats["test/out_relu"][:4], pooled.predict(images, verbose=0), rtol=1e-4, atol=1e-5)


def test_features_save_load_round_trip(feats, tmp_path):
    path = save_features(feats, tmp_path / "feats.npz")
    back = load_features(path)
    assert set(back) == set(feats)
    np.testing.assert_array_equal(back["train/out_relu"], feats["train/out_relu"])
    assert [p.name for p in tmp_path.iterdir()] == ["feats.npz"]  # no temp file left behind
    with pytest.raises(ValueError, match=r"\.npz"):
        save_features(feats, tmp_path / "feats.txt")


def test_probe_scores_each_layer(feats):
    rows = probe(feats)
    assert [r["layer"] for r in rows] == LAYERS
    for row in rows:
        assert row["n_test"] == len(feats["test/labels"]) and row["dim"] == feats[f"train/{row['layer']}"].shape[1]
        assert 0.0 <= row["test_top1"] <= 1.0
    assert rows[0]["test_top1"] >= 0.8  # colour classes: linearly separable from early pooled activations
    only_train = {k: v for k, v in feats.items() if not k.startswith("test/")}
    with pytest.raises(ValueError, match="train and test"):
        probe(only_train)


def test_unknown_layer_names_close_matches(model):
    with pytest.raises(ValueError, match=r"block_1_expand_relu.*--list-layers"):
        feature_model(model, ["block_1_expand_rel"])
