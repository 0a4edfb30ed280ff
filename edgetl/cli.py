"""The `edgetl` command line: a map of the tool, one command per stage of the pipeline."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from edgetl.recipe import RecipeError, explain, load_recipe

RECIPE = click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
RUN_DIR = click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
DATA = click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
                    help="Dataset folder; overrides the recipe's data.source.")
SET = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                   help="Override a recipe value, e.g. --set train.stage1.epochs=3 (repeatable).")
OUT = click.option("--out", "out_root", type=click.Path(file_okay=False, path_type=Path), default=Path("models"),
                   show_default=True, help="Output root; runs go to OUT/<recipe-name>/<run-id>/.")
JSON_OUT = click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
                        help="Also write the result as JSON to this file.")


def friendly_errors(fn):
    """Turn expected user errors into one clear message and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from edgetl.backbones import WeightsError
        from edgetl.data import DatasetError

        try:
            return fn(*args, **kwargs)
        except (RecipeError, DatasetError, WeightsError, FileNotFoundError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def write_json(path: Path | None, obj) -> None:
    """Write the machine-readable twin of a command's summary, when asked for."""
    if path is not None:
        from edgetl.rundir import atomic_write_json

        atomic_write_json(path, obj)
        click.echo(f"JSON written to {path}")


def echo(msg: str = "") -> None:
    click.echo(msg)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="edgetl")
def cli():
    """edgetl: from an image-classification dataset to a validated edge model.

    \b
    The pipeline, one command per stage (each reads the run directory the previous wrote):
      train     two-stage transfer training  -> models/<recipe>/<run-id>/
      export    TFLite / ONNX variants (PTQ, QAT, pruning) -> <run>/exports/
      validate  Keras vs TFLite vs ONNX Runtime: accuracy, agreement, latency, gates -> <run>/validation/
      run       all three in one go, resuming finished stages (the main job)
    \b
    Shipping and devices:
      embed     C header of a .tflite for microcontrollers; show a model's metadata
      bench     TensorFlow-free latency/accuracy runner, locally, on a run, or over SSH
    \b
    Reference:
      recipe show   the fully resolved recipe (--explain documents every key)
      backbones     architectures with input size, parameters, MACs
      datasets      built-in datasets and the folder layouts edgetl reads
    \b
    Start with:  edgetl run recipes/demo.yaml
    """


@cli.command()
@RECIPE
@DATA
@OUT
@SET
@friendly_errors
def train(recipe: Path, data_dir, out_root: Path, overrides):
    """Train a transfer model from RECIPE (feature extraction, then fine-tuning).

    \b
    Example:
      edgetl train recipes/flowers_mobilenet_v2.yaml --data ../shared/data/flowers5 --set train.stage2.epochs=3
    """
    from edgetl.train import train as run_training

    rec = load_recipe(recipe, overrides)
    result = run_training(rec, data_dir=data_dir, out_root=out_root, echo=echo)
    m = result.metrics
    echo("")
    echo(f"test top-1 {m['test']['top1']:.2%}  top-5 {m['test']['top5']:.2%}  ({m['test']['n']} images)")
    for stage, sm in m["stages"].items():
        echo(f"  after {stage}: top-1 {sm['top1']:.2%}")
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    echo(f"peak memory {manifest['peak_rss_mb']:.0f} MiB, wall {manifest['timings_s']['total_s']:.0f}s")
    if result.warning:
        echo(result.warning)
    echo(f"run directory: {result.run_dir}  (metrics.json, manifest.json, training_curves.png)")


@cli.group()
def recipe():
    """Inspect recipes."""


@recipe.command("show")
@RECIPE
@SET
@click.option("--explain", "explain_keys", is_flag=True, help="List every key with its default and meaning instead.")
@JSON_OUT
@friendly_errors
def recipe_show(recipe: Path, overrides, explain_keys: bool, json_out):
    """Print the fully resolved RECIPE (defaults filled in, overrides applied).

    \b
    Example:
      edgetl recipe show recipes/demo.yaml --set data.batch_size=64
    """
    rec = load_recipe(recipe, overrides)
    if explain_keys:
        rows = explain()
        width = max(len(k) for k, _, _ in rows)
        for key, default, text in rows:
            echo(f"{key:<{width}}  {default:<22} {text}" if default else f"{key:<{width}}  {'':<22} {text}")
        return
    echo(rec.to_yaml().rstrip())
    write_json(json_out, rec.to_dict())


@cli.command()
@JSON_OUT
def backbones(json_out):
    """List the backbone architectures: input size, parameters, multiply-accumulates.

    Parameters and MACs are counted on each headless backbone built at its default size.

    \b
    Example:
      edgetl backbones --json backbones.json
    """
    from edgetl.backbones import BACKBONES, describe

    rows = [describe(name) for name in BACKBONES]
    echo(f"{'name':<20} {'input':>5} {'params':>10} {'MMACs':>8}  preprocessing")
    for r in rows:
        echo(f"{r['name']:<20} {r['input_size']:>5} {r['params'] / 1e6:>9.2f}M {r['macs'] / 1e6:>8.0f}  {r['preprocessing']}")
    write_json(json_out, rows)


@cli.command()
@JSON_OUT
def datasets(json_out):
    """List built-in datasets and the folder layouts edgetl reads.

    \b
    Example:
      edgetl datasets
    """
    from edgetl.data import BUILTIN_DATASETS

    for name, text in BUILTIN_DATASETS.items():
        echo(f"{name:<11} {text}")
    echo("")
    echo("Folders (data.source: PATH or --data PATH):")
    echo("  PATH/train/<class>/*.jpg + PATH/test/<class>/*.jpg [+ PATH/val/<class>/]  splits as given")
    echo("  PATH/<class>/*.jpg                                  split by data.test_split / data.val_split")
    echo("  Formats: JPEG, PNG, BMP, GIF (first frame); any mode becomes 8-bit RGB; EXIF orientation applied.")
    echo("  Unreadable files are skipped and listed in the run's manifest.json.")
    write_json(json_out, {"builtin": BUILTIN_DATASETS})


def main():
    """Console-script entry point."""
    cli(prog_name="edgetl")


if __name__ == "__main__":
    sys.exit(main())
