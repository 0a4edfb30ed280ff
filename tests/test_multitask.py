"""Multi-task heads: two heads train on one backbone, export with one named output per head, validate per head.

Two module fixtures on generated images (colour from the class folders, brightness from a CSV): a real
two-head training run (MobileNetV2 at 32 px, random weights), and a run directory holding a tiny nested
two-head model, exported and validated once (a MobileNetV2 TFLite conversion alone takes ~30 s on 2 cores).
The CSV and recipe error tests need no training.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import COLORS, draw_image, tiny_recipe_dict
from PIL import Image

from edgetl.data import DatasetError, load_arrays, load_splits
from edgetl.io import atomic_write_text, read_json
from edgetl.recipe import RecipeError, load_recipe, recipe_from_dict
from edgetl.rundir import RunDir

HEADS = ["color", "brightness"]
SIZE = 32


def write_two_task_data(root: Path, per_class: int = 16, seed: int = 3) -> tuple[Path, Path]:
    """root/data/<colour>/<colour>_<i>.png, each image bright or dark; root/brightness.csv labels the latter."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, color in COLORS.items():
        (root / "data" / name).mkdir(parents=True)
        for i in range(per_class):
            bright = i % 2 == 0
            pixels = draw_image(color, rng, 40).astype(np.float32) * (1.0 if bright else 0.4)
            file = f"{name}_{i:03d}.png"
            Image.fromarray(pixels.astype(np.uint8)).save(root / "data" / name / file)
            # half the rows by bare file name, half by path relative to the data root
            rows.append((file if i % 4 < 2 else f"{name}/{file}", "bright" if bright else "dark"))
    write_csv(root / "brightness.csv", [("file", "brightness"), *rows])
    return root / "data", root / "brightness.csv"


def write_csv(path: Path, rows) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


def two_head_dict(data: Path, csv_path, **sections) -> dict:
    raw = tiny_recipe_dict(data, **sections)
    raw["model"]["heads"] = [{"name": "color"}, {"name": "brightness", "csv": str(csv_path), "loss_weight": 0.5}]
    return raw


@pytest.fixture(scope="module")
def two_task(tmp_path_factory):
    return write_two_task_data(tmp_path_factory.mktemp("two_task"))


@pytest.fixture(scope="module")
def trained(two_task, tmp_path_factory):
    """`edgetl train` of a two-head recipe whose CSV path is relative to the recipe file."""
    from edgetl.train import train

    data, csv_path = two_task
    raw = two_head_dict(data, csv_path.name, train={"stage1": {"epochs": 3, "learning_rate": 0.01},
                                                    "stage2": {"epochs": 1, "learning_rate": 1e-4}})
    recipe_path = csv_path.parent / "two_heads.yaml"
    recipe_path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    log: list[str] = []
    result = train(load_recipe(recipe_path), run_dir=tmp_path_factory.mktemp("trained") / "run", echo=log.append)
    return RunDir(result.run_dir), "\n".join(log)


def tiny_two_head_model():
    """Input -> Rescaling -> nested Conv-BN-ReLU backbone (training=False) -> pool -> `color` and `brightness`."""
    import tf_keras as keras

    L = keras.layers
    inp = keras.Input((SIZE, SIZE, 3))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(inp)))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same", use_bias=False)(x)))
    backbone = keras.Model(inp, L.Conv2D(16, 1, activation="relu")(x), name="tiny_backbone")
    image = keras.Input((SIZE, SIZE, 3), name="image")
    pooled = L.GlobalAveragePooling2D(name="pool")(backbone(L.Rescaling(1 / 127.5, offset=-1.0)(image), training=False))
    outputs = [L.Dense(3, activation="softmax", name="color")(pooled),
               L.Dense(2, activation="softmax", name="brightness")(pooled)]
    return keras.Model(image, outputs, name="tiny_two_heads")


@pytest.fixture(scope="module")
def exported(two_task, tmp_path_factory):
    """A run directory with a fitted tiny two-head model, exported and validated through `edgetl run`'s stages."""
    import tf_keras as keras

    from edgetl.export import export_run
    from edgetl.validate import validate_run

    data, csv_path = two_task
    recipe = recipe_from_dict(two_head_dict(
        data, csv_path, export={"tflite": ["fp32", "int8", "qat_int8"], "onnx": ["fp32"], "representative_samples": 16},
        validate={"runs": 3, "warmup": 1, "max_accuracy_drop": 100.0}))
    splits = load_splits(recipe)
    images, _ = load_arrays(splits.train, SIZE)
    keras.utils.set_random_seed(0)
    model = tiny_two_head_model()
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    model.fit(images.astype(np.float32), splits.targets(splits.train), epochs=10, batch_size=16, verbose=0)
    run = RunDir(tmp_path_factory.mktemp("exported") / "run")
    atomic_write_text(run.recipe_path, recipe.to_yaml())
    atomic_write_text(run.labels_path, "\n".join(splits.primary_class_names) + "\n")
    for head in splits.heads:
        atomic_write_text(run.head_labels_path(head.name), "\n".join(head.class_names) + "\n")
    model.save(run.model_path)
    export = export_run(run.path, echo=lambda *_: None, isolate=False)
    return run, export.manifest, validate_run(run.path, echo=lambda *_: None).report


def test_two_heads_train_with_their_own_labels(trained, two_task):
    run, log = trained
    metrics = read_json(run.metrics_path)
    heads = metrics["test"]["heads"]
    assert list(heads) == HEADS
    assert metrics["test"]["top1"] == heads["color"]["top1"]  # the primary head at the top level
    assert set(heads["brightness"]["per_class"]) == {"bright", "dark"} and heads["brightness"]["n"] == 12
    assert list(metrics["stages"]["stage2"]["heads"]) == HEADS
    assert run.labels() == sorted(COLORS) and run.head_labels() == {"color": sorted(COLORS),
                                                                    "brightness": ["bright", "dark"]}
    history = read_json(run.history_path)
    assert {"color_accuracy", "val_brightness_accuracy"} <= set(history["stage1"]) & set(history["stage2"])
    manifest = read_json(run.manifest_path)
    assert [h["name"] for h in manifest["model"]["heads"]] == HEADS
    assert manifest["model"]["heads"][1]["csv"] == str(two_task[1])  # resolved from the recipe's folder
    assert sum(manifest["dataset"]["heads"]["brightness"]["counts"]["test"].values()) == 12
    assert "head brightness: 2 classes (bright, dark)" in log
    model = run.load_model()
    assert model.output_names == HEADS and [o.shape[-1] for o in model.outputs] == [3, 2]


def test_exports_expose_one_named_output_per_head(exported):
    from edgetl.edge.runtime import open_model
    from edgetl.export.metadata import read_metadata

    run, manifest, _ = exported
    entries = {a["name"]: a for a in manifest["artifacts"]}
    for name in ("tflite-fp32", "tflite-int8", "onnx-fp32"):
        assert entries[name]["status"] == "ok", entries[name]["error"]
        assert [o["name"] for o in entries[name]["outputs"]] == HEADS
    assert entries["tflite-qat_int8"]["status"] == "not_supported"
    assert "not supported for multi-head recipes" in entries["tflite-qat_int8"]["error"]
    assert manifest["head_labels"] == {h: f"labels_{h}.txt" for h in HEADS}
    assert (run.exports_dir / "labels_brightness.txt").read_text() == "bright\ndark\n"
    meta = read_metadata(run.exports_dir / "tflite-int8.tflite")
    assert [(o["name"], o["label_file"], o["labels"]) for o in meta["outputs"]] == [
        ("color", "labels_color.txt", sorted(COLORS)), ("brightness", "labels_brightness.txt", ["bright", "dark"])]

    splits = load_splits(run.load_recipe())
    images, _ = load_arrays(splits.test, SIZE)
    keras_probs = dict(zip(HEADS, run.load_model().predict(images.astype(np.float32), verbose=0)))
    for name in ("tflite-fp32", "onnx-fp32"):
        runner = open_model(run.exports_dir / entries[name]["path"])
        assert runner.output_names == HEADS
        outputs = runner.predict_all(images)
        for head in HEADS:
            assert np.array_equal(outputs[head].argmax(1), keras_probs[head].argmax(1)), (name, head)
            assert np.abs(outputs[head] - keras_probs[head]).max() < 1e-4


def test_validation_reports_every_head(exported):
    from edgetl.validate import format_table

    run, _, report = exported
    assert report["data"]["heads"] == {"color": sorted(COLORS), "brightness": ["bright", "dark"]}
    rows = {r["name"]: r for r in report["artifacts"]}
    assert list(rows) == ["keras", "tflite-fp32", "tflite-int8", "onnx-fp32"]
    for row in rows.values():
        assert row["status"] == "ok" and list(row["heads"]) == HEADS
        assert row["top1"] == row["heads"]["color"]["top1"]
    assert rows["keras"]["heads"]["brightness"]["top1"] >= 0.75  # the CSV labels were learned
    for name in ("tflite-fp32", "onnx-fp32"):
        assert all(rows[name]["heads"][h]["agreement"] == 1.0 for h in HEADS)
    assert all(rows["tflite-int8"]["heads"][h]["agreement"] >= 0.75 for h in HEADS)
    header = format_table(report["artifacts"]).splitlines()[0]
    for column in ("color top-1", "color agree", "brightness top-1", "brightness vs keras", "brightness agree"):
        assert column in header
    assert "## Per-class recall (brightness)" in (run.validation_dir / "report.md").read_text()


def test_gates_apply_to_every_head():
    from edgetl.validate import check_gates

    def row(name, color, brightness):
        heads = {"color": {"top1": color, "agreement": 1.0}, "brightness": {"top1": brightness, "agreement": 0.5}}
        return {"name": name, "reference": name == "keras", "status": "ok", "top1": color, "agreement": 1.0,
                "heads": heads}

    failures = check_gates([row("keras", 0.9, 0.9), row("tflite-int8", 0.9, 0.7)], max_accuracy_drop=1.0,
                           min_agreement=0.9)
    assert {(f.head, f.gate) for f in failures} == {("brightness", "max_accuracy_drop"),
                                                     ("brightness", "min_agreement")}
    assert all(f.message.startswith("tflite-int8 [brightness]:") for f in failures)


# --- label sources: errors that name the file, the row and the fix ------------------------------------------


@pytest.fixture
def small_data(tmp_path):
    return write_two_task_data(tmp_path, per_class=4)


def _splits(data, csv_path, column=None):
    raw = two_head_dict(data, csv_path)
    if column:
        raw["model"]["heads"][1]["column"] = column
    return load_splits(recipe_from_dict(raw))


def test_csv_labels_align_with_the_file_list(small_data):
    data, csv_path = small_data
    splits = _splits(data, csv_path)
    assert [h.name for h in splits.heads] == HEADS
    labels = splits.targets(splits.train)
    expected = ["bright" if int(Path(s.path).stem.split("_")[1]) % 2 == 0 else "dark" for s in splits.train]
    assert [splits.heads[1].class_names[i] for i in labels["brightness"]] == expected
    assert list(labels["color"]) == [s.label for s in splits.train]
    assert splits.fingerprint()["heads"]["brightness"]["classes"] == ["bright", "dark"]


def test_missing_csv_is_named(small_data, tmp_path):
    with pytest.raises(DatasetError, match=r"model.heads 'brightness': .*nope.csv: CSV file not found"):
        _splits(small_data[0], tmp_path / "nope.csv")


def test_csv_row_naming_a_missing_file_is_named(small_data):
    data, csv_path = small_data
    with csv_path.open("a", newline="") as f:
        csv.writer(f).writerow(["red/ghost.png", "dark"])
    with pytest.raises(DatasetError, match=r"brightness.csv, row 14: 'red/ghost.png' is not an image under .*"
                                           r"Fix the path or delete the row"):
        _splits(data, csv_path)


def test_image_without_a_row_is_named(small_data):
    data, csv_path = small_data
    rows = list(csv.reader(csv_path.open()))
    write_csv(csv_path, [r for r in rows if r[0] not in ("blue_001.png", "blue/blue_001.png")])
    with pytest.raises(DatasetError, match=r"1 image\(s\) have no row, e.g. blue/blue_001.png. Add a row"):
        _splits(data, csv_path)


def test_csv_without_the_label_column_says_which_header(small_data, tmp_path):
    data, _ = small_data
    bad = write_csv(tmp_path / "bad.csv", [("path", "value"), ("red_000.png", "x")])
    with pytest.raises(DatasetError, match=r"header row \['path', 'value'\] has no column 'file' or 'brightness'"):
        _splits(data, bad)
    with pytest.raises(DatasetError, match=r"no column 'file' or 'shade'"):
        _splits(data, bad, column="shade")


def test_ambiguous_file_name_asks_for_a_path(small_data, tmp_path):
    data, csv_path = small_data
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(data / "green" / "red_000.png")
    with pytest.raises(DatasetError, match=r"file name 'red_000.png' matches 2 images .* write the path relative"):
        _splits(data, csv_path)


@pytest.mark.parametrize("heads, message", [
    ([{"name": "a"}, {"name": "a"}], r"model.heads\[1\].name = 'a' is used by an earlier head"),
    ([{"name": "two words"}], r"model.heads\[0\].name = 'two words': a head needs a name that starts with a letter"),
    ([{}], r"model.heads\[0\].name = '': a head needs a name"),
    ([{"name": "pool"}], r"'pool' is the name of a layer of the classifier"),
    ([{"name": "a", "los": "focal"}], r"unknown key 'los' in model.heads\[0\]. Did you mean 'loss'\?"),
    ([{"name": "a", "loss": "hinge"}], r"model.heads\[0\].loss = 'hinge' is not allowed"),
])
def test_bad_heads_are_recipe_errors(tmp_path, heads, message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"heads": heads}}))
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_heads_do_not_combine_with_class_weights():
    with pytest.raises(RecipeError, match=r"train.class_weight: balanced is not supported with model.heads"):
        recipe_from_dict({"model": {"heads": [{"name": "a"}]}, "train": {"class_weight": "balanced"}})
