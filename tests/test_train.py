"""Two-stage training: feature-cache equivalence, what fine-tuning unfreezes, the run directory, the CLI.

The tests train the registry's `test_cnn` backbone (a 3-layer CNN with MobileNet's ingredients) wherever
MobileNetV2 itself is not under test; `tiny_run` (conftest) is the shared MobileNetV2 run.
"""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import SHARED, tiny_recipe_dict

from edgetl.backbones import WeightsError, build_classifier, create_backbone, unfreeze
from edgetl.cli import cli
from edgetl.data import load_splits
from edgetl.recipe import load_recipe, recipe_from_dict
from edgetl.rundir import RunDir
from edgetl.training.supervised import Trainer

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


CNN = {"backbone": "test_cnn"}


def quiet(*_):
    pass


def cnn_recipe(source, **sections):
    """The tiny recipe on the test_cnn backbone."""
    return recipe_from_dict(tiny_recipe_dict(source, model=CNN, **sections))


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory, tiny_data):
    """One train() of test_cnn given `data_dir` (over a recipe naming the digits), with the recipe's state before."""
    from edgetl.training import train

    recipe = cnn_recipe("digits", train={"stage1": {"epochs": 6, "learning_rate": 0.05}})
    before = recipe.to_dict()
    result = train(recipe, data_dir=tiny_data, run_dir=tmp_path_factory.mktemp("cnn_run") / "run", echo=quiet)
    return {"result": result, "recipe": recipe, "before": before}


def test_feature_cache_matches_end_to_end_frozen_training(tiny_data):
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    recipe = cnn_recipe(tiny_data, data={"batch_size": 8}, train={"stage1": {"epochs": 3, "learning_rate": 0.05}})
    trainer = Trainer(recipe, load_splits(recipe), quiet)
    start = [w.copy() for w in trainer.clf.head.get_weights()]
    trainer.stage1()  # cached features (no augmentation)
    cached = trainer.clf.head.get_weights()
    assert trainer.use_feature_cache()
    trainer.clf.head.set_weights(start)
    stage1 = dataclasses.replace(recipe.train.stage1, cache_features=False)
    trainer.recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, stage1=stage1))
    assert not trainer.use_feature_cache()
    trainer.stage1()  # end to end through the frozen backbone
    end_to_end = trainer.clf.head.get_weights()
    assert not np.allclose(start[0], cached[0], atol=1e-3)  # training moved the head
    for a, b in zip(cached, end_to_end):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_unfreeze_counts_and_batchnorm_stays_in_inference_mode():
    import tf_keras as keras

    clf = build_classifier(3, "test_cnn", 32, weights=None, dropout=0.0)
    base = clf.backbone
    assert not any(layer.trainable for layer in base.layers) and not base.trainable_weights
    start = unfreeze(base, layers=7)
    assert start == len(base.layers) - 7
    top = base.layers[start:]
    bn = keras.layers.BatchNormalization
    assert [layer.trainable for layer in base.layers[:start]] == [False] * start
    assert all(layer.trainable == (not isinstance(layer, bn)) for layer in top)
    assert not any(layer.trainable for layer in base.layers if isinstance(layer, bn))
    assert any(isinstance(layer, bn) for layer in top)  # the rule above was really exercised
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(clf.model(x, training=True).numpy(), clf.model(x, training=False).numpy(), atol=1e-6)
    assert unfreeze(base, from_layer="block2_dw") == [layer.name for layer in base.layers].index("block2_dw")
    assert unfreeze(base, fraction=0.5) == round(len(base.layers) * 0.5)
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        unfreeze(base, from_layer="nope")


def test_stage2_trains_only_unfrozen_layers(tiny_data):
    recipe = cnn_recipe(tiny_data, train={"stage1": {"epochs": 0}, "stage2": {"epochs": 1, "learning_rate": 0.01,
                                                                               "unfreeze_layers": 7}})
    trainer = Trainer(recipe, load_splits(recipe), quiet)
    base = trainer.clf.backbone
    before = {w.name: w.numpy().copy() for w in base.weights}
    trainer.stage2()
    changed = {w.name for w in base.weights if not np.array_equal(before[w.name], w.numpy())}
    top_names = {w.name for layer in base.layers[-7:] for w in layer.trainable_weights}
    assert changed and changed <= top_names
    assert not any("moving" in name for name in changed)
    assert not {w.name for w in base.get_layer("block1_conv").weights} & changed  # below the unfrozen top


def test_training_learns_a_learnable_dataset_and_leaves_the_callers_recipe_alone(cnn_run, tiny_data):
    """Three colour classes are easy: the test top-1 must be far above chance (1/3), every stage and the final
    metrics agree with their confusion matrix, and the caller's recipe still names the digits."""
    result, recipe = cnn_run["result"], cnn_run["recipe"]
    test = result.metrics["test"]
    matrix = np.array(test["confusion_matrix"])
    assert test["top1"] >= 0.9, test["top1"]
    assert test["n"] == matrix.sum() == len(load_splits(recipe, tiny_data).test)
    assert test["top1"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert set(result.metrics["stages"]) == {"stage1", "stage2"}
    assert recipe.to_dict() == cnn_run["before"] and recipe.data.source == "digits"
    saved = RunDir(result.run_dir).load_recipe()
    assert saved.data.source == str(tiny_data) and saved.model.backbone == "test_cnn"


def test_load_model_equals_keras_loader(cnn_run):
    import tf_keras as keras

    run = RunDir(cnn_run["result"].run_dir)
    fast, reference = run.load_model(), keras.models.load_model(run.model_path, compile=False)
    assert [w.name for w in fast.weights] == [w.name for w in reference.weights]
    assert all(np.array_equal(a, b) for a, b in zip(fast.get_weights(), reference.get_weights()))
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(fast(x, training=False), reference(x, training=False))
    assert fast.optimizer is None


def test_run_directory_contents(tiny_run):
    run = RunDir(tiny_run.run_dir)
    for name in ("recipe.yaml", "labels.txt", "model.keras", "history.json", "metrics.json", "manifest.json",
                 "training_curves.png", "confusion_matrix.png"):
        assert (run.path / name).is_file(), name
    assert not list(run.path.glob(".*tmp*")), "temp files left behind"
    assert run.labels() == ["blue", "green", "red"]
    metrics = json.loads(run.metrics_path.read_text())
    assert set(metrics["stages"]) == {"stage1", "stage2"}
    matrix = np.array(metrics["test"]["confusion_matrix"])
    assert matrix.shape == (3, 3) and metrics["test"]["n"] == matrix.sum() == len(load_splits(run.load_recipe()).test)
    assert metrics["test"]["top1"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert set(metrics["test"]["per_class"]) == {"blue", "green", "red"}
    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["dataset"]["counts"]["test"]["total"] == len(load_splits(run.load_recipe()).test)
    assert manifest["model"]["weights_source"] == "random" and manifest["versions"]["tensorflow"].startswith("2.21")
    assert {"stage1_s", "stage2_s", "total_s"} <= set(manifest["timings_s"])
    history = json.loads(run.history_path.read_text())
    assert len(history["stage1"]["loss"]) == 4 and len(history["stage2"]["loss"]) == 1
    assert history["stage1"]["loss"][-1] < history["stage1"]["loss"][0]  # the head learned something
    model = run.load_model()
    x = np.zeros((1, 32, 32, 3), "float32")
    assert model.predict(x, verbose=0).shape == (1, 3)
    assert yaml.safe_load(run.recipe_path.read_text())["model"]["alpha"] == 0.35


def test_missing_imagenet_weights_is_a_clear_error(monkeypatch, tmp_path):
    import tf_keras as keras

    real = keras.applications.MobileNetV2

    def offline(*args, weights=None, **kwargs):
        if weights == "imagenet":
            raise Exception("URL fetch failure: no network")
        return real(*args, weights=weights, **kwargs)

    monkeypatch.setattr(keras.applications, "MobileNetV2", offline)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as err:
        create_backbone("mobilenet_v2", 96, alpha=0.5)
    msg = str(err.value)
    assert str(tmp_path / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_96_no_top.h5") in msg
    assert "model.weights" in msg
    result = create_backbone("mobilenet_v2", 96, alpha=0.5, weights_fallback="random")
    assert result.weights_source.startswith("random") and "RANDOM" in result.warning


def test_cli_train_prints_summary_and_writes_run(tiny_data, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_data, model=CNN)))
    result = CliRunner().invoke(cli, ["train", str(recipe), "--out", str(tmp_path / "out"),
                                      "--set", "train.stage1.epochs=1", "--set", "train.stage2.epochs=0"])
    assert result.exit_code == 0, result.output
    assert "test top-1" in result.output and "run directory:" in result.output
    runs = list((tmp_path / "out" / "tiny").iterdir())
    assert len(runs) == 1 and (runs[0] / "model.keras").exists()
    bad = CliRunner().invoke(cli, ["train", str(recipe), "--set", "train.stage1.epochz=1"])
    assert bad.exit_code == 1 and "Did you mean 'epochs'" in bad.output


@pytest.mark.integration
def test_flowers5_with_offline_imagenet_weights(tmp_path):
    """Real photos + ImageNet features: a short cached stage 1 at 96 px must beat chance by far."""
    data, weights = SHARED / "data" / "flowers5", SHARED / "weights" / "mobilenet_v2_1.0_224_imagenet_notop_bncal.h5"
    if not (data.is_dir() and weights.is_file()):
        pytest.skip(f"needs {data} and {weights} (the project's ../shared folder)")
    from edgetl.training import train

    recipe = load_recipe(RECIPES / "flowers_mobilenet_v2.yaml", ["data.image_size=96", f"model.weights={weights}",
                                                                  "train.stage1.epochs=10", "train.stage2.epochs=0",
                                                                  "data.max_per_class=40"])
    result = train(recipe, data_dir=data, run_dir=tmp_path / "run", echo=quiet)
    assert result.metrics["weights_source"] == str(weights)
    assert result.metrics["test"]["top1"] >= 0.6, result.metrics["test"]["top1"]  # chance is 0.2


def test_stage_patience_overrides_the_recipe_default(tiny_data):
    from edgetl.training.supervised import _callbacks

    recipe = recipe_from_dict(tiny_recipe_dict(str(tiny_data), train={
        "early_stopping_patience": 4, "stage2": {"epochs": 1, "early_stopping_patience": 0}}))
    stage1 = _callbacks(recipe, recipe.train.stage1, has_val=True)
    assert [type(c).__name__ for c in stage1] == ["EarlyStopping"] and stage1[0].patience == 4
    assert stage1[0].restore_best_weights
    assert _callbacks(recipe, recipe.train.stage2, has_val=True) == []
    assert _callbacks(recipe, recipe.train.stage1, has_val=False) == []


def test_cosine_schedule_decays_to_zero_over_exactly_the_stage(tiny_data):
    """Both stages' cosine schedules span their epochs' optimizer steps: the rate reaches 0 at the last step."""
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    recipe = cnn_recipe(tiny_data, train={
        "stage1": {"epochs": 2, "learning_rate": 0.01, "schedule": "cosine"},
        "stage2": {"epochs": 2, "learning_rate": 1e-3, "schedule": "cosine"}})
    trainer = Trainer(recipe, load_splits(recipe), quiet)
    for stage, model, lr in ((trainer.stage1, trainer.clf.head, 0.01), (trainer.stage2, trainer.clf.model, 1e-3)):
        stage()
        opt = model.optimizer
        steps = int(opt.iterations.numpy())
        batches = -(-len(trainer.splits.train) // recipe.data.batch_size)
        assert steps == 2 * batches
        schedule = opt.get_config()["learning_rate"]
        assert schedule["class_name"] == "CosineDecay"
        assert schedule["config"]["initial_learning_rate"] == pytest.approx(lr)
        assert schedule["config"]["decay_steps"] == steps  # reaches 0 exactly at the stage's last step
        assert float(opt.learning_rate) < lr * 0.2  # the rate the last steps ran at
