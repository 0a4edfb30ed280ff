"""The backbone registry: each family's preprocessing is baked in exactly as Keras defines it, and survives saving."""
import numpy as np
import pytest

from edgetl.backbones import BACKBONES, PREPROCESSING, build_classifier, describe, preprocessing_layer
from edgetl.rundir import load_keras_model

KERAS_PREPROCESS = {"resnet50": "resnet50", "vgg16": "vgg16", "densenet121": "densenet", "inception_v3": "inception_v3",
                    "xception": "xception", "mobilenet_v2": "mobilenet_v2"}


@pytest.mark.parametrize("name", sorted(KERAS_PREPROCESS))
def test_baked_preprocessing_equals_keras_preprocess_input(name):
    import tf_keras as keras

    pixels = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    reference = getattr(keras.applications, KERAS_PREPROCESS[name]).preprocess_input(pixels.copy())
    ours = preprocessing_layer(BACKBONES[name].preprocessing)(pixels).numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_every_registry_row_names_a_known_preprocessing():
    assert {spec.preprocessing for spec in BACKBONES.values()} <= set(PREPROCESSING)
    assert {"resnet50", "inception_v3", "xception", "densenet121", "vgg16"} <= set(BACKBONES)


@pytest.mark.parametrize("kind", ["caffe", "torch"])
def test_preprocessing_layers_survive_save_and_load(tmp_path, kind):
    import tf_keras as keras

    image = keras.Input((8, 8, 3))
    model = keras.Model(image, keras.layers.GlobalAveragePooling2D()(preprocessing_layer(kind)(image)))
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    model.save(tmp_path / "m.keras")
    loaded = load_keras_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded.predict(pixels, verbose=0), model.predict(pixels, verbose=0), atol=1e-5)
    assert loaded.get_layer("preprocess").trainable_weights == []  # fine-tuning never moves it


def test_build_classifier_puts_the_preprocessing_in_front():
    clf = build_classifier(3, backbone="resnet50", image_size=32, weights=None)
    assert isinstance(clf.model.get_layer("preprocess"), __import__("tf_keras").layers.Conv2D)


def test_describe_marks_edge_sized_backbones():
    assert describe("mobilenet_v2")["edge_sized"] is True
    vgg = describe("vgg16")
    assert vgg["edge_sized"] is False and vgg["macs"] > 10e9  # 15.3 G multiply-accumulates at 224 px


def test_test_cnn_refuses_pretrained_weights():
    from edgetl.backbones import WeightsError, create_backbone

    with pytest.raises(WeightsError, match="test_cnn"):
        create_backbone("test_cnn", 32, weights="imagenet")
    assert create_backbone("test_cnn", 32, weights=None).model.output_shape == (None, 16, 16, 32)
