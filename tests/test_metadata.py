"""TFLite metadata: round trip, unchanged inference, and MediaPipe's ImageClassifier naming the classes."""
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from ai_edge_litert import schema_py_generated as tfl
from ai_edge_litert.interpreter import Interpreter
from export_support import tflite_bytes

from edgetl.export.metadata import MetadataError, MetadataWarning, add_metadata, read_metadata

CLASSES = ["red", "green", "blue"]
META = dict(name="tiny colours", description="Tells red, green and blue images apart.", version="3")
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "tf2_mobilenet_v2_1.0_224_ptq.tflite"


def colour_images(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """32x32 images whose class channel is bright (180..255) over dark noise (0..60): pixels span 0..255."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 61, (3 * n_per_class, 32, 32, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(3), n_per_class)
    for i, c in enumerate(labels):
        images[i, :, :, c] = rng.integers(180, 256, (32, 32), dtype=np.uint8)
    return images, labels


def run_tflite(model: bytes, images: np.ndarray) -> list[np.ndarray]:
    """Every output of the model for each raw-pixel image (dequantized), stacked per output."""
    interpreter = Interpreter(model_content=model)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    results = []
    for image in images:
        interpreter.set_tensor(inp["index"], image[None].astype(inp["dtype"]))
        interpreter.invoke()
        outs = []
        for out in interpreter.get_output_details():
            value = interpreter.get_tensor(out["index"])[0].astype(np.float32)
            scale, zero_point = out["quantization"]
            outs.append(scale * (value - zero_point) if scale else value)
        results.append(outs)
    return [np.stack(per_output) for per_output in zip(*results)]


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, bytes]:
    """A tiny trained colour classifier (raw 0..255 input) as fp32 and as full-int8 with uint8 input/output."""
    keras.utils.set_random_seed(0)
    images, labels = colour_images(20, seed=0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    model.compile(keras.optimizers.Adam(0.02), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(images.astype(np.float32), labels, epochs=15, batch_size=12, verbose=0)
    test_images, test_labels = colour_images(5, seed=1)
    assert (model.predict(test_images.astype(np.float32), verbose=0).argmax(1) == test_labels).all()

    return {"fp32": tflite_bytes(model), "uint8": tflite_bytes(model, images)}


def with_metadata(model: bytes, **overrides) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("error", MetadataWarning)
        return add_metadata(model, **{"labels": CLASSES, **META, **overrides})


@pytest.mark.parametrize("kind", ["fp32", "uint8"])
def test_metadata_round_trips_and_leaves_inference_unchanged(tiny_models, kind):
    plain = tiny_models[kind]
    model = with_metadata(plain, license="Apache-2.0")
    meta = read_metadata(model)
    assert {k: meta[k] for k in META} == META
    assert meta["labels"] == CLASSES
    assert (meta["author"], meta["license"], meta["min_parser_version"]) == ("edgetl", "Apache-2.0", "1.0.0")
    assert (meta["input_mean"], meta["input_std"]) == ([0.0], [1.0])
    assert (meta["input_min"], meta["input_max"]) == ([0.0], [255.0])
    assert meta["outputs"] == [{"name": "probability", "label_file": "labels.txt", "labels": CLASSES}]
    assert meta["associated_files"] == ["labels.txt"]
    assert json.loads(json.dumps(meta)) == meta  # ready for `edgetl embed --show` and reports

    images, _ = colour_images(3, seed=2)
    for before, after in zip(run_tflite(plain, images), run_tflite(model, images)):
        np.testing.assert_array_equal(before, after)


def test_weights_stay_16_byte_aligned(tiny_models):
    """TensorFlow Lite Micro reads weights in place; the schema asks Buffer.data to be 16-byte aligned."""
    model = tfl.Model.GetRootAs(with_metadata(tiny_models["uint8"]), 0)
    starts = [model.Buffers(i)._tab.Vector(4) for i in range(model.BuffersLength()) if model.Buffers(i).DataLength()]
    assert len(starts) > 3 and all(start % 16 == 0 for start in starts)


def test_adding_again_replaces_the_metadata(tiny_models):
    once = with_metadata(tiny_models["fp32"], labels=["r", "g", "b"], version="4")
    again = with_metadata(with_metadata(tiny_models["fp32"]), labels=["r", "g", "b"], version="4")
    assert again == once
    meta = read_metadata(again)
    assert (meta["labels"], meta["version"], meta["associated_files"]) == (["r", "g", "b"], "4", ["labels.txt"])


def test_bad_input_is_refused_with_clear_errors(tiny_models, tmp_path):
    with pytest.raises(MetadataError, match="2 class names given for output .* which has 3 classes"):
        with_metadata(tiny_models["fp32"], labels=["red", "green"])
    with pytest.raises(MetadataError, match="one-line"):
        with_metadata(tiny_models["fp32"], labels=["red", "gr\neen", "blue"])
    with pytest.raises(MetadataError, match="1 or 3 values"):
        with_metadata(tiny_models["fp32"], input_mean=(0, 0))
    with pytest.raises(MetadataError, match="TFL3"):
        add_metadata(b"not a model at all", labels=CLASSES, **META)
    (tmp_path / "plain.tflite").write_bytes(tiny_models["fp32"])
    with pytest.raises(MetadataError, match="no TFLite metadata"):
        read_metadata(tmp_path / "plain.tflite")


def test_warns_when_uint8_input_does_not_take_raw_pixels(tiny_models):
    with pytest.warns(MetadataWarning, match="scale 0.00784"):
        add_metadata(tiny_models["uint8"], labels=CLASSES, input_mean=[127.5], input_std=[127.5], **META)


def test_each_output_head_gets_its_own_label_file():
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, [keras.layers.Dense(3, activation="softmax", name="colour")(x),
                                 keras.layers.Dense(2, activation="softmax", name="light")(x)])
    plain = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    tagged = with_metadata(plain, labels={"light": ["dark", "bright"], "colour": CLASSES})
    interpreter = Interpreter(model_content=plain)
    sizes = [int(o["shape"][-1]) for o in interpreter.get_output_details()]
    expected = {3: ("colour", CLASSES), 2: ("light", ["dark", "bright"])}
    outputs = read_metadata(tagged)["outputs"]
    assert outputs == [
        {"name": expected[n][0], "label_file": f"labels_{expected[n][0]}.txt", "labels": expected[n][1]} for n in sizes
    ]
    by_index = with_metadata(plain, labels={sizes.index(2): ["dark", "bright"]})
    assert [o["labels"] for o in read_metadata(by_index)["outputs"]] == [
        ["dark", "bright"] if n == 2 else None for n in sizes
    ]
    with pytest.raises(MetadataError, match="not an output of the model"):
        with_metadata(plain, labels={"hue": CLASSES})
    with pytest.raises(MetadataError, match="single-output model, or a dict"):
        with_metadata(plain)
    # Untrained heads give mid-range scores: a wrong input normalization in MediaPipe would show here.
    images, _ = colour_images(1, seed=4)
    direct = run_tflite(tagged, images)
    for i, heads in enumerate(mediapipe_heads(tagged, images)):
        assert [name for name, _ in heads] == [expected[n][0] for n in sizes]
        for (_, scores), n, probs in zip(heads, sizes, direct):
            np.testing.assert_allclose([scores[c] for c in expected[n][1]], probs[i], atol=1e-5)


@pytest.mark.integration
def test_reads_googles_reference_metadata():
    if not REFERENCE.exists():
        pytest.skip(f"{REFERENCE} is absent")
    meta = read_metadata(REFERENCE)
    assert meta["name"] == "ImageClassifier"
    assert (meta["input_mean"], meta["input_std"]) == ([127.5], [127.5])
    assert len(meta["labels"]) == 1001 and meta["labels"][:2] == ["background", "tench, Tinca tinca"]


# MediaPipe lives in a venv of its own (`make install` creates it: its absl-py pin conflicts with tfmot's).
MEDIAPIPE_PYTHON = Path(sys.prefix) / "mediapipe" / "bin" / "python"
MEDIAPIPE_SCRIPT = """
import json, sys
import mediapipe as mp
import numpy as np
from mediapipe.tasks.python import BaseOptions, vision

model, images = sys.argv[1], np.load(sys.argv[2])
options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=model))
with vision.ImageClassifier.create_from_options(options) as classifier:
    results = [classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image)))
               for image in images]
json.dump([[(h.head_name, {c.category_name: c.score for c in h.categories}) for h in r.classifications]
           for r in results], sys.stdout)
"""


def mediapipe_heads(model: bytes, images: np.ndarray) -> list[list[tuple[str, dict[str, float]]]]:
    """MediaPipe ImageClassifier's (head name, {category name: score}) per head, for each image."""
    if not MEDIAPIPE_PYTHON.exists():
        pytest.skip(f"{MEDIAPIPE_PYTHON} is absent: `make install` creates MediaPipe's own venv")
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "model.tflite").write_bytes(model)
        np.save(Path(tmp, "images.npy"), images)
        done = subprocess.run([str(MEDIAPIPE_PYTHON), "-c", MEDIAPIPE_SCRIPT, str(Path(tmp, "model.tflite")),
                               str(Path(tmp, "images.npy"))], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return [[(name, scores) for name, scores in heads] for heads in json.loads(done.stdout)]


@pytest.mark.parametrize("kind", ["fp32", "uint8"])
def test_mediapipe_image_classifier_names_the_classes(tiny_models, kind):
    """MediaPipe's ImageClassifier (the task API Android/iOS/web apps use) needs nothing but the file."""
    model = with_metadata(tiny_models[kind])
    images, labels = colour_images(1, seed=3)
    expected = run_tflite(model, images)[0]
    for (head,), label, probs in zip(mediapipe_heads(model, images), labels, expected):
        name, scores = head
        assert name == "probability"
        assert max(scores, key=scores.get) == CLASSES[label]
        np.testing.assert_allclose([scores[c] for c in CLASSES], probs, atol=1e-5)
