"""Recipe loading: defaults, overrides, and error messages that name the file, key and fix."""
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetl.cli import cli
from edgetl.recipe import Recipe, RecipeError, explain, load_recipe, recipe_from_dict

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert recipe.train.stage1.epochs > 0


def test_required_recipes_are_shipped():
    names = {p.stem for p in RECIPES.glob("*.yaml")}
    assert {"demo", "flowers_mobilenet_v2", "flowers_efficientnet_b0", "flowers_mobilenet_v3_small"} <= names


def test_empty_recipe_gets_documented_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, ""))
    assert recipe == Recipe(name="r")
    assert recipe.data.batch_size == 32 and recipe.export.opset == 17


def test_typo_suggests_nearest_key(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, "train:\n  stage1:\n    epoch: 3\n"))
    msg = str(err.value)
    assert "r.yaml" in msg and "train.stage1" in msg and "Did you mean 'epochs'?" in msg


def test_wrong_type_names_key_and_expected_type(tmp_path):
    with pytest.raises(RecipeError, match=r"data\.batch_size must be an integer, got str"):
        load_recipe(write(tmp_path, "data:\n  batch_size: lots\n"))


def test_out_of_range_lists_allowed_range(tmp_path):
    with pytest.raises(RecipeError, match=r"augment\.rotation = 0\.9 is out of range; allowed: \[0, 0\.5\]"):
        load_recipe(write(tmp_path, "augment:\n  rotation: 0.9\n"))


def test_bad_choice_lists_allowed_values(tmp_path):
    with pytest.raises(RecipeError, match="allowed values: plain, center_crop.*Did you mean 'center_crop'"):
        load_recipe(write(tmp_path, "data:\n  resize: centre_crop\n"))


def test_cosine_schedule_conflicts_with_plateau_halving(tmp_path):
    with pytest.raises(RecipeError, match=r"r\.yaml: train\.stage2\.reduce_lr_on_plateau cannot be combined with "
                                          r"train\.stage2\.schedule: cosine"):
        load_recipe(write(tmp_path, "train:\n  stage2: {schedule: cosine, reduce_lr_on_plateau: true}\n"))
    assert load_recipe(write(tmp_path, "train:\n  stage2: {schedule: cosine}\n")).train.stage2.schedule == "cosine"
    with pytest.raises(RecipeError, match=r"train\.stage1\.schedule: cosine is not supported with adapt\.target_data"):
        load_recipe(write(tmp_path, "adapt: {target_data: /x}\ntrain:\n  stage1: {schedule: cosine}\n"))


def test_unknown_export_variant_lists_valid_ones(tmp_path):
    with pytest.raises(RecipeError, match="unknown variant 'int4'.*fp32, fp16, dynamic, int8, qat_int8, pruned_int8"):
        load_recipe(write(tmp_path, "export:\n  tflite: [fp32, int4]\n"))


def test_unknown_backbone_suggests(tmp_path):
    with pytest.raises(RecipeError, match="Did you mean 'mobilenet_v2'"):
        load_recipe(write(tmp_path, "model:\n  backbone: mobilenet_2\n"))


def test_int_accepted_for_float_and_bool_rejected_for_int(tmp_path):
    assert load_recipe(write(tmp_path, "train:\n  stage1:\n    learning_rate: 1\n")).train.stage1.learning_rate == 1.0
    with pytest.raises(RecipeError, match="must be an integer, got bool"):
        recipe_from_dict({"seed": True})


def test_overrides_apply_and_are_checked(tmp_path):
    path = write(tmp_path, "train:\n  stage1:\n    epochs: 9\n")
    recipe = load_recipe(path, ["train.stage1.epochs=3", "model.weights=null", "export.tflite=[fp32]"])
    assert recipe.train.stage1.epochs == 3 and recipe.model.weights is None and recipe.export.tflite == ["fp32"]
    with pytest.raises(RecipeError, match="Did you mean 'stage1'"):
        load_recipe(path, ["train.stage_1.epochs=3"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(path, ["train.stage1.epochs"])


def test_fingerprint_changes_with_content():
    a, b = recipe_from_dict({}), recipe_from_dict({"seed": 1})
    assert a.fingerprint() == recipe_from_dict({}).fingerprint() != b.fingerprint()


def test_resolved_yaml_round_trips(tmp_path):
    recipe = load_recipe(RECIPES / "flowers_mobilenet_v2.yaml")
    again = load_recipe(write(tmp_path, recipe.to_yaml()))
    assert again.to_dict() == {**recipe.to_dict(), "name": recipe.name}


def test_every_field_is_documented():
    rows = explain()
    assert len(rows) > 40
    assert all(text for _, _, text in rows), [key for key, _, text in rows if not text]


def test_cli_recipe_show(tmp_path):
    runner = CliRunner()
    out = tmp_path / "r.json"
    result = runner.invoke(cli, ["recipe", "show", str(RECIPES / "demo.yaml"), "--set", "data.batch_size=64",
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "batch_size: 64" in result.output and out.exists()
    bad = runner.invoke(cli, ["recipe", "show", str(RECIPES / "demo.yaml"), "--set", "data.batchsize=1"])
    assert bad.exit_code == 1 and "Did you mean 'batch_size'" in bad.output


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, "data: {batch_size: -3, imgae_size: 96}\nmodel: {backbone: mobilenet_v9}\n"
                           "train: {stage1: {epochs: ten}}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert len(err.value.problems) == 4
    msg = str(err.value)
    assert msg.startswith("4 problems in the recipe:")
    for part in ("'imgae_size' in data. Did you mean 'image_size'?", "data.batch_size = -3 is out of range",
                 "model.backbone = 'mobilenet_v9'", "train.stage1.epochs must be an integer"):
        assert part in msg
    assert all(p.startswith(f"{path}:") for p in err.value.problems)


def test_cli_shows_expected_errors_in_one_line_and_tracebacks_with_debug(tmp_path):
    path = write(tmp_path, "model: {backbone: mobilenet_v9}\n")
    plain = CliRunner().invoke(cli, ["recipe", "show", str(path)])
    assert plain.exit_code == 1 and "Traceback" not in plain.output
    assert plain.output.startswith("Error: ") and "is not a known backbone" in plain.output
    debug = CliRunner().invoke(cli, ["--debug", "recipe", "show", str(path)])
    assert isinstance(debug.exception, RecipeError)
