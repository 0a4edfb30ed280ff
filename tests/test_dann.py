"""Domain adaptation: gradient reversal, what DANN training changes, a DANN run on a colour-inverted target, shifts."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import make_image_folder, tiny_recipe_dict
from PIL import Image, ImageOps

from edgetl.shift import SHIFT_KINDS, shift_dataset


def test_gradient_reversal_flips_and_scales_without_retracing():
    import tensorflow as tf

    from edgetl.training.dann import GradientReversal

    grl = GradientReversal(0.5)
    x = tf.constant([[1.0, -2.0, 3.0]])
    upstream = tf.constant([[2.0, 3.0, -1.0]])

    @tf.function
    def forward_and_grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = grl(x)
            loss = tf.reduce_sum(y * upstream)
        return y, tape.gradient(loss, x)

    y, grad = forward_and_grad(x)
    np.testing.assert_array_equal(y, x)  # identity forward
    np.testing.assert_array_equal(grad, -0.5 * upstream.numpy())
    grl.coefficient.assign(2.0)
    y, grad = forward_and_grad(x)
    np.testing.assert_array_equal(grad, -2.0 * upstream.numpy())
    assert forward_and_grad.experimental_get_tracing_count() == 1
    assert not grl.trainable_weights


def test_grl_ramp_and_learning_rate_decay():
    from edgetl.training.dann import annealed_learning_rate, grl_coefficient

    ramp = [grl_coefficient(p / 10, grl_max=0.5) for p in range(11)]
    assert ramp[0] == 0.0 and all(a < b for a, b in zip(ramp, ramp[1:]))
    assert ramp[-1] == pytest.approx(0.5 * (2 / (1 + math.exp(-10)) - 1))
    assert annealed_learning_rate(1e-3, 0.0) == 1e-3
    assert annealed_learning_rate(1e-3, 1.0) == pytest.approx(1e-3 / 11 ** 0.75)


def _inverted_folder(root, seed):
    """Tiny coloured-shape classes with inverted colours: a strong, known domain shift."""
    make_image_folder(root, per_class=6, seed=seed)
    for path in root.rglob("*.png"):
        ImageOps.invert(Image.open(path).convert("RGB")).save(path)
    return root


@pytest.fixture(scope="module")
def dann_run(tmp_path_factory, tiny_data):
    """A DANN run through `edgetl.training.train`, which dispatches on `adapt.target_data`."""
    from edgetl.recipe import recipe_from_dict
    from edgetl.training import train

    base = tmp_path_factory.mktemp("dann")
    target = _inverted_folder(base / "target", seed=1)
    target_test = _inverted_folder(base / "target_test", seed=2)
    raw = tiny_recipe_dict(tiny_data, model={"backbone": "test_cnn"}, train={"stage1": {"epochs": 3}},
                           adapt={"target_data": str(target), "target_test": str(target_test),
                                  "bottleneck_units": 16, "domain_hidden_units": 16})
    log = []
    result = train(recipe_from_dict(raw), run_dir=base / "run", echo=log.append)
    return result, log


def test_dann_run_exports_a_plain_one_output_classifier(dann_run):
    import tf_keras as keras

    from edgetl.data import decode_images, load_splits
    from edgetl.rundir import RunDir

    result, log = dann_run
    run = RunDir(result.run_dir)
    for path in (run.recipe_path, run.labels_path, run.history_path, run.manifest_path,
                 run.path / "target_confusion_matrix.png"):
        assert path.exists()
    model = run.load_model()
    assert len(model.outputs) == 1 and model.output_shape == (None, 3)
    assert not [layer for layer in model.layers if "domain" in layer.name or "grl" in layer.name]
    assert any(isinstance(layer, keras.Model) for layer in model.layers)  # nested backbone, as usual
    # the saved image model reproduces the metrics computed on cached features
    splits = load_splits(run.load_recipe())
    images, labels = decode_images([s.path for s in splits.test], 32), np.array([s.label for s in splits.test])
    top1 = np.mean(model.predict(images.astype(np.float32), verbose=0).argmax(1) == labels)
    assert top1 == pytest.approx(result.metrics["test"]["top1"])
    assert any("train.stage2" in line for line in log)  # the skipped fine-tuning stage is said


def test_dann_metrics_compare_with_source_only_baseline(dann_run):
    result, _ = dann_run
    adapt = json.loads((result.run_dir / "metrics.json").read_text())["adapt"]
    assert adapt["epochs"] == 3 and adapt["target_images"] == 18 and adapt["target_test_images"] == 18
    for name in ("dann", "source_only"):
        assert set(adapt[name]) == {"source_test_top1", "source_test_top5", "target_test_top1", "target_test_top5"}
    assert adapt["target_gain_pp"] == pytest.approx(
        100 * (adapt["dann"]["target_test_top1"] - adapt["source_only"]["target_test_top1"]), abs=0.01)
    history = json.loads((result.run_dir / "history.json").read_text())
    assert len(history["stage1"]["domain_loss"]) == 3 and len(history["source_only"]["loss"]) == 3
    assert history["stage1"]["grl_coefficient"][-1] > history["stage1"]["grl_coefficient"][0] > 0


def test_domain_loss_weight_zero_is_source_only():
    """Weight 0 must leave the classifier exactly as plain source training: GRL and domain head inert.

    No global reseed between the two fits: the heads' initializers, dropout and batches are seeded themselves,
    which is what lets `DannTrainer.adapt` compare its two heads after one seeding of the run.
    """
    from edgetl.recipe import recipe_from_dict
    from edgetl.training.dann import fit_dann_head

    rng = np.random.default_rng(0)
    source, labels = rng.normal(size=(40, 12)).astype(np.float32), rng.integers(0, 2, 40)
    recipe = recipe_from_dict({"seed": 1, "data": {"batch_size": 16}, "train": {"stage1": {"epochs": 2}},
                               "adapt": {"bottleneck_units": 8, "domain_hidden_units": 8}})
    assert recipe.model.dropout > 0  # dropout is active, and seeded
    heads = [fit_dann_head(recipe, source, labels, source + target_shift, 2, 0.0, echo=lambda *_: None)
             for target_shift in (0.0, 5.0)]
    for a, b in zip(*(head.classifier.get_weights() for head in heads)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    domain = [layer.name for layer in heads[0].trainer.layers if layer.name.startswith("domain")]
    untrained = build_head_like(recipe, heads[0])
    for name in domain:  # weight 0: no gradient reaches the domain classifier
        for a, b in zip(heads[0].trainer.get_layer(name).get_weights(), untrained.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)


def build_head_like(recipe, head):
    """A freshly initialised DANN head of the same shape (the seeded starting point of every fit)."""
    from edgetl.training.dann import build_dann_head

    features, classes = head.classifier.input_shape[1], head.classifier.output_shape[1]
    return build_dann_head(features, classes, recipe).trainer


def _bottleneck(head, x):
    import tf_keras as keras

    model = keras.Model(head.classifier.input, head.classifier.get_layer("bottleneck").output)
    return model.predict(x, batch_size=256, verbose=0)


def _domain_gap(source_z, target_z) -> float:
    """Distance between the source and target means of bottleneck activations, in pooled standard deviations
    (a linear-kernel discrepancy): what domain-adversarial training is there to shrink."""
    spread = np.sqrt((source_z.var(0) + target_z.var(0)) / 2 + 1e-6)
    return float(np.linalg.norm((source_z.mean(0) - target_z.mean(0)) / spread))


def test_dann_trains_a_domain_classifier_and_shrinks_the_domain_gap():
    """What DANN must change: its domain classifier trains (the baseline's stays at its initial weights), and
    the bottleneck shared with the class head carries much less of the domain than the source-only one.

    Synthetic pooled features: 4 dimensions carry the class, 4 others only the domain (target = source + 2).
    """
    from edgetl.recipe import recipe_from_dict
    from edgetl.training.dann import fit_dann_head

    rng = np.random.default_rng(0)
    n, centers = 160, np.array([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0]])

    def domain(shift):
        labels = rng.integers(0, 3, n)
        x = np.concatenate([centers[labels] + rng.normal(0, 0.5, (n, 4)), rng.normal(shift, 1.0, (n, 4))], axis=1)
        return x.astype(np.float32), labels

    (source, labels), (target, target_labels) = domain(0.0), domain(2.0)
    recipe = recipe_from_dict({"seed": 3, "data": {"batch_size": 16}, "model": {"dropout": 0.0},
                               "train": {"stage1": {"epochs": 40, "learning_rate": 0.01}},
                               "adapt": {"bottleneck_units": 16, "domain_hidden_units": 16}})
    heads = {weight: fit_dann_head(recipe, source, labels, target, 3, weight, echo=lambda *_: None)
             for weight in (0.0, 1.0)}
    start = build_head_like(recipe, heads[1.0]).get_layer("domain_logit").get_weights()[0]
    assert not np.allclose(heads[1.0].trainer.get_layer("domain_logit").get_weights()[0], start, atol=1e-3)
    np.testing.assert_array_equal(heads[0.0].trainer.get_layer("domain_logit").get_weights()[0], start)
    gap = {w: _domain_gap(_bottleneck(h, source), _bottleneck(h, target)) for w, h in heads.items()}
    assert gap[1.0] < 0.8 * gap[0.0], gap  # measured: 1.4 vs 3.1
    for head in heads.values():  # both still classify (chance is 1/3)
        assert np.mean(head.classifier.predict(source, verbose=0).argmax(1) == labels) > 0.9
        assert np.mean(head.classifier.predict(target, verbose=0).argmax(1) == target_labels) > 0.8


def test_dann_needs_target_data(tiny_data):
    from edgetl.recipe import recipe_from_dict
    from edgetl.training.dann import train_dann

    with pytest.raises(ValueError, match="adapt.target_data"):
        train_dann(recipe_from_dict(tiny_recipe_dict(tiny_data)))


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory):
    """train/ and test/ class folders, a text file and one unreadable image."""
    root = tmp_path_factory.mktemp("shift_src")
    make_image_folder(root / "train", per_class=2, size=48, seed=3)
    make_image_folder(root / "test", per_class=1, size=48, seed=4, ext="jpg")
    (root / "ATTRIBUTIONS.txt").write_text("credits\n")
    (root / "train" / "red" / "broken.png").write_bytes(b"not a png")
    return root


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("kind", list(SHIFT_KINDS))
def test_shift_changes_images_and_keeps_layout(split_folder, tmp_path, kind):
    out = tmp_path / "shifted"
    summary = shift_dataset(split_folder, out, kind, seed=0)
    files = sorted(p.relative_to(split_folder) for p in split_folder.rglob("*") if p.is_file())
    copied = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.name != "SHIFT.md")
    assert copied == [f for f in files if f.name != "broken.png"]
    assert summary["images"] == 9 and [s["path"].endswith("broken.png") for s in summary["skipped"]] == [True]
    assert "simulation" in (out / "SHIFT.md").read_text()
    for rel in (r for r in copied if r.suffix in (".png", ".jpg")):
        before, after = _pixels(split_folder / rel), _pixels(out / rel)
        assert after.shape == before.shape and np.abs(after - before).mean() > 2, rel
        if kind == "grayscale" and rel.suffix == ".png":
            assert (after[..., 0] == after[..., 1]).all() and (after[..., 1] == after[..., 2]).all()
    again = shift_dataset(split_folder, tmp_path / "again", kind, seed=0)
    assert again["images"] == summary["images"]
    assert all((out / r).read_bytes() == (tmp_path / "again" / r).read_bytes() for r in copied)  # deterministic
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_shift_refuses_to_overwrite(split_folder, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        shift_dataset(split_folder, tmp_path / "out", "blur")
    with pytest.raises(ValueError, match="unknown shift kind"):
        shift_dataset(split_folder, tmp_path / "new", "sepia")
    with pytest.raises(ValueError, match="inside the source"):
        shift_dataset(split_folder, split_folder / "shifted", "noise")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x" and not (tmp_path / "new").exists()
