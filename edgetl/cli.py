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
        from edgetl.io import atomic_write_json

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
    Techniques:
      features  pooled activations of backbone layers; logistic-regression probe per layer
      shift     simulated domain-shifted copy of a dataset (for adapt.target_data / DANN)
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
    if not result.chief:
        echo("worker finished; the chief (worker 0) wrote the run directory")
        return
    m = result.metrics
    echo("")
    echo(f"test top-1 {m['test']['top1']:.2%}  top-5 {m['test']['top5']:.2%}  ({m['test']['n']} images)")
    for head, hm in m["test"].get("heads", {}).items():
        echo(f"  head {head}: top-1 {hm['top1']:.2%}  top-5 {hm['top5']:.2%}")
    for stage, sm in m["stages"].items():
        echo(f"  after {stage}: top-1 {sm['top1']:.2%}")
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    echo(f"peak memory {manifest['peak_rss_mb']:.0f} MiB, wall {manifest['timings_s']['total_s']:.0f}s")
    if result.warning:
        echo(result.warning)
    echo(f"run directory: {result.run_dir}  (metrics.json, manifest.json, training_curves.png)")


@cli.command()
@RUN_DIR
@click.option("--formats", multiple=True, metavar="FORMAT:VARIANT[,VARIANT]",
              help="What to export instead of the recipe's export section, e.g. --formats tflite:fp32,int8 "
                   "--formats onnx:fp32 (repeatable).")
@friendly_errors
def export(run_dir: Path, formats):
    """Export a trained run to TFLite and ONNX variants (PTQ, QAT, pruning) in RUN_DIR/exports/.

    Each artifact is checked to load and run, carries its labels and metadata, and is listed in
    exports/manifest.json with sizes, gzip sizes, hashes and quantization parameters.

    \b
    Examples:
      edgetl export models/demo/run-1a2b3c
      edgetl export models/demo/run-1a2b3c --formats tflite:int8,qat_int8 --formats onnx:int8
    """
    from edgetl.export import export_run, parse_formats

    tflite, onnx = parse_formats(list(formats)) if formats else (None, None)
    result = export_run(run_dir, tflite=tflite, onnx=onnx, echo=echo)
    echo(f"manifest: {run_dir / 'exports' / 'manifest.json'}")
    if result.failed:
        raise click.ClickException(f"{len(result.failed)} variant(s) failed: {', '.join(result.failed)}")


GATE_OPTIONS = [
    click.option("--threads", type=click.IntRange(1), help="Interpreter threads for latency (recipe: validate.threads)."),
    click.option("--runs", type=click.IntRange(1), help="Timed runs per artifact."),
    click.option("--warmup", type=click.IntRange(0), help="Untimed warm-up runs."),
    click.option("--max-accuracy-drop", type=click.FloatRange(0), metavar="PP",
                 help="Gate: largest top-1 drop vs Keras in percentage points (default 1.0)."),
    click.option("--min-agreement", type=click.FloatRange(0, 1), metavar="FRACTION",
                 help="Gate: smallest top-1 agreement with Keras."),
    click.option("--budget-latency-ms", type=click.FloatRange(0), help="Recommend the best artifact within this p50 latency."),
    click.option("--budget-size-kb", type=click.FloatRange(0), help="Recommend the best artifact within this file size."),
]


def gate_options(fn):
    for option in reversed(GATE_OPTIONS):
        fn = option(fn)
    return fn


@cli.command()
@RUN_DIR
@DATA
@gate_options
@friendly_errors
def validate(run_dir: Path, data_dir, **options):
    """Compare the Keras model and every export on the held-out images; gate and recommend.

    Writes RUN_DIR/validation/report.json, report.md and plots; exits 1 when an artifact fails a gate.

    \b
    Examples:
      edgetl validate models/demo/run-1a2b3c
      edgetl validate models/demo/run-1a2b3c --min-agreement 0.98 --budget-latency-ms 2 --budget-size-kb 600
    """
    from edgetl.validate import validate_run

    result = validate_run(run_dir, data_dir=data_dir, echo=echo, **options)
    echo(f"report: {run_dir / 'validation' / 'report.md'} (JSON: report.json)")
    if not result.passed:
        sys.exit(1)


@cli.command("run")
@RECIPE
@DATA
@OUT
@SET
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory (default OUT/<recipe-name>/run-<recipe fingerprint>, so a re-run resumes).")
@friendly_errors
def run_cmd(recipe: Path, data_dir, out_root: Path, overrides, run_dir):
    """Train, export and validate RECIPE in one go; re-running resumes finished stages.

    \b
    Examples:
      edgetl run recipes/demo.yaml
      edgetl run recipes/flowers_mobilenet_v2.yaml --data ../shared/data/flowers5
    """
    from edgetl.pipeline import run_pipeline

    result = run_pipeline(recipe, overrides, data_dir=data_dir, run_dir=run_dir, out_root=out_root, echo=echo,
                          isolate=True)
    echo(f"run directory: {result.run_dir}")
    if not result.passed:
        sys.exit(1)


@cli.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="New folder for the shifted copy (must not exist or be empty).")
@click.option("--kind", required=True, type=click.Choice(["blur", "grayscale", "color", "noise", "jpeg"]),
              help="The simulated change of camera/sensor/path.")
@click.option("--strength", type=float, help="Kind-specific strength (default per kind; see the table in --help).")
@click.option("--seed", default=0, show_default=True, help="Seed for the noise kind.")
@JSON_OUT
@friendly_errors
def shift(data_dir: Path, out_dir: Path, kind, strength, seed, json_out):
    """Write a shifted copy of DATA_DIR to try domain adaptation (a simulation, not real target data).

    \b
    Kinds and default strengths:
      blur 1.5       Gaussian radius, % of the shorter side
      grayscale 1.0  mix towards luma, kept as RGB
      color 0.3      white-balance cast (red x(1+s), blue x(1-s))
      noise 25       pixel noise sigma on 0-255
      jpeg 8         JPEG quality of one lossy round trip
    \b
    Example:
      edgetl shift ../shared/data/flowers5 --out data/flowers5_gray --kind grayscale
      then set adapt.target_data: data/flowers5_gray/train (unlabeled) in a recipe
    """
    from edgetl.shift import shift_dataset

    summary = shift_dataset(data_dir, out_dir, kind, seed=seed, strength=strength)
    echo(f"{summary['images']} images shifted ({kind}, strength {summary['strength']:g}) -> {out_dir}"
         + (f"; {len(summary['skipped'])} unreadable files left out" if summary["skipped"] else ""))
    echo(f"see {out_dir / 'SHIFT.md'}: a simulation of a domain shift, not a substitute for real target images")
    write_json(json_out, summary)


@cli.command()
@RUN_DIR
@click.option("--list-layers", is_flag=True, help="List the backbone's layer names and output shapes.")
@click.option("--layer", "layers", multiple=True, help="Backbone layer to pool (repeatable; default: the "
                                                      "registry's feature layers).")
@DATA
@click.option("--split", type=click.Choice(["all", "train", "test"]), default="all", show_default=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), help="Write features to this .npz.")
@click.option("--classifier", type=click.Choice(["logistic"]), help="Probe each layer with a logistic regression.")
@JSON_OUT
@friendly_errors
def features(run_dir: Path, list_layers, layers, data_dir, split, out_path, classifier, json_out):
    """Pooled activations of named backbone layers, and a quick transferability probe.

    \b
    Examples:
      edgetl features models/flowers/run-1a2b --list-layers
      edgetl features models/flowers/run-1a2b --layer block_6_expand_relu --layer out_relu --out feats.npz
      edgetl features models/flowers/run-1a2b --classifier logistic      # probe table, default layers
    """
    from edgetl import features as feats

    if list_layers:
        defaults = set(feats.default_layers(run_dir))
        rows = feats.list_layers(run_dir)
        for name, shape in rows:
            echo(f"{'*' if name in defaults else ' '} {name:<40} {shape}")
        echo("(* = default probe layers)")
        write_json(json_out, [{"name": n, "shape": list(s), "default": n in defaults} for n, s in rows])
        return
    if out_path is None and classifier is None:
        raise click.UsageError("give --out FILE.npz, --classifier logistic, or --list-layers")
    if classifier and split != "all":
        raise click.UsageError("--classifier needs both splits: use --split all")
    chosen = list(layers) or feats.default_layers(run_dir)
    extracted = feats.extract_features(run_dir, chosen, data_dir=data_dir, split=split)
    result = {"layers": chosen}
    if out_path:
        feats.save_features(extracted, out_path)
        echo(f"features of {len(chosen)} layer(s) written to {out_path}")
        result["out"] = str(out_path)
    if classifier:
        rows = feats.probe(extracted)
        echo(f"{'layer':<32} {'dim':>5} {'train top-1':>11} {'test top-1':>10}")
        for r in rows:
            echo(f"{r['layer']:<32} {r['dim']:>5} {r['train_top1']:>11.1%} {r['test_top1']:>10.1%}")
        result["probe"] = rows
    write_json(json_out, result)


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


@cli.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--c-header", "c_header", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a 16-byte aligned C array (with length and labels) for TensorFlow Lite Micro.")
@click.option("--name", "var_name", help="C variable name (default: from the file name).")
@JSON_OUT
@friendly_errors
def embed(model: Path, c_header, var_name, json_out):
    """Show MODEL.tflite's embedded metadata; write it as a C header for microcontrollers.

    \b
    Examples:
      edgetl embed models/demo/<run>/exports/tflite-int8.tflite
      edgetl embed model.tflite --c-header model_data.h
    """
    from edgetl.embed import write_c_header
    from edgetl.metadata import NoMetadataError, read_metadata

    try:
        meta = read_metadata(model)
    except NoMetadataError:
        meta = None
    if meta:
        echo(f"{model}: {meta['name']} v{meta['version']} - {meta['description']}")
        echo(f"  input normalisation mean {meta['input_mean']} std {meta['input_std']}, "
             f"range {meta['input_min']}..{meta['input_max']}")
        for out in meta["outputs"]:
            labels = out.get("labels") or []
            echo(f"  output {out['name']}: {len(labels)} labels ({', '.join(labels[:6])}{', ...' if len(labels) > 6 else ''})")
    else:
        echo(f"{model}: no TFLite metadata")
    result = {"model": str(model), "metadata": meta}
    if c_header:
        path = write_c_header(model, c_header, var_name=var_name)
        result["c_header"] = str(path)
        echo(f"C header written to {path} ({model.stat().st_size:,} model bytes)")
    write_json(json_out, result)


@cli.command()
@click.argument("target", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--export-runner", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the portable single-file runner (zipapp) here and exit.")
@click.option("--remote", metavar="USER@HOST[:PORT]", help="Run on a device over SSH and compare with this host.")
@click.option("--identity", type=click.Path(exists=True, dir_okay=False), help="SSH private key for --remote.")
@click.option("--python", "remote_python", default="python3", show_default=True, help="Python on the device.")
@click.option("--threads", default="1,2,4", show_default=True, help="Thread counts, comma-separated.")
@click.option("--runs", default=50, show_default=True, type=click.IntRange(1), help="Timed runs.")
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(0), help="Warm-up runs.")
@click.option("--xnnpack", type=click.Choice(["on", "off", "both"]), default="both", show_default=True,
              help="TFLite XNNPACK delegate modes to time.")
@click.option("--images", type=click.Path(exists=True, file_okay=False), help="Images (class folders) for accuracy.")
@click.option("--resize", type=click.Choice(["plain", "center_crop"]),
              help="How --images are resized, as in the recipe's data.resize. [default: the run's recipe, else plain]")
@JSON_OUT
@friendly_errors
def bench(target, export_runner, remote, identity, remote_python, threads, runs, warmup, xnnpack, images, resize,
          json_out):
    """TensorFlow-free latency/accuracy of a .tflite/.onnx, every artifact of a run, or on a device.

    TARGET is a model file or a run directory (all its exports; adds an `edge` section to the
    validation report). The same runner works on boards without TensorFlow: see --export-runner.

    \b
    Examples:
      edgetl bench models/demo/<run>                       # every artifact, this host
      edgetl bench model.tflite --threads 1,4 --images data/test
      edgetl bench model.tflite --remote pi@raspberrypi.local --identity ~/.ssh/id_ed25519
      edgetl bench --export-runner runner.pyz              # then: python3 runner.pyz model.tflite
    """
    from edgetl.edge.bench import BenchOptions, format_report, parse_threads
    from edgetl.edge.remote import RemoteError, format_side_by_side, run_remote
    from edgetl.edge.sweep import BenchFailed, bench_in_subprocess, bench_run_dir, format_sweep
    from edgetl.edge.zipapp import build_runner

    if export_runner:
        echo(f"runner written to {build_runner(export_runner)}; run it with: python3 {export_runner} MODEL")
        return
    if target is None:
        raise click.UsageError("give a model file or a run directory (or --export-runner PATH)")
    options = BenchOptions(threads=parse_threads(threads), runs=runs, warmup=warmup, xnnpack=xnnpack, images=images,
                           resize=resize or _recipe_resize(target))
    try:
        if target.is_dir():
            doc = bench_run_dir(target, options)
            echo(format_sweep(doc))
            failed = [a for a in doc.get("artifacts", []) if a.get("error") and not a["error"].startswith("not exported")]
        elif remote:
            host = bench_in_subprocess(target, options)
            doc = {"host": host, "device": run_remote(target, remote, options, identity=identity, python=remote_python)}
            echo(format_side_by_side(doc["host"], doc["device"]))
            failed = []
        else:
            doc = bench_in_subprocess(target, options)
            echo(format_report(doc))
            failed = []
    except (RemoteError, BenchFailed) as exc:
        raise click.ClickException(str(exc)) from None
    write_json(json_out, doc)
    if failed:
        raise click.ClickException(f"{len(failed)} artifact(s) failed: " + ", ".join(a.get("name", "?") for a in failed))


def _recipe_resize(target: Path | None) -> str:
    """The resize mode of the run TARGET belongs to (a run directory or a file in its exports/), else plain."""
    from edgetl.rundir import RunDir

    for folder in ([target, target.parent.parent] if target else []):
        run = RunDir(folder)
        if run.recipe_path.is_file():
            return run.load_recipe().data.resize
    return "plain"


def main():
    """Console-script entry point."""
    cli(prog_name="edgetl")


if __name__ == "__main__":
    sys.exit(main())
