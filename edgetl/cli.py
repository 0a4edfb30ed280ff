"""The `edgetl` command line: a map of the tool, one command per stage of the pipeline."""
from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from edgetl.errors import EdgetlError
from edgetl.recipe import explain, load_recipe

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


@dataclass(frozen=True)
class Settings:
    """The group's options, handed to every command through click's context."""

    verbose: bool = False
    debug: bool = False


def friendly_errors(fn):
    """Show an expected user error (EdgetlError) as one line and exit 1; anything else keeps its traceback.

    `edgetl --debug ...` shows the traceback of expected errors too.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgetlError as exc:
            settings = click.get_current_context().find_object(Settings) or Settings()
            if settings.debug:
                raise
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
@click.option("--verbose", is_flag=True, help="Show TensorFlow's own log lines (hidden by default).")
@click.option("--debug", is_flag=True, help="Show the traceback of every error, expected user errors too.")
@click.pass_context
def cli(ctx, verbose, debug):
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
      quant-report  which layers int8 hurts most (per-layer SNR) of an artifact or a run
      bench     TensorFlow-free latency/accuracy runner, locally, on a run, or over SSH
      serve     TensorFlow-free inference server (Open Inference Protocol V2, as Triton/KServe)
    \b
    Reference:
      recipe show   the fully resolved recipe (--explain documents every key)
      backbones     architectures with input size, parameters, MACs
      datasets      built-in datasets and the folder layouts edgetl reads
    \b
    Start with:  edgetl run recipes/demo.yaml
    """
    ctx.obj = Settings(verbose=verbose, debug=debug)


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
    from edgetl.training import train as run_training

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
@click.option("--model-repository", type=click.Path(file_okay=False, path_type=Path),
              help="Also write a Triton model repository of the run's ONNX artifacts into this folder.")
@click.option("--repair", is_flag=True, help="Also export tflite:int8_repaired and onnx:int8_repaired (int8 with "
                                             "the most sensitive layers left float until export.int8.max_drop_pp holds).")
@friendly_errors
def export(run_dir: Path, formats, model_repository, repair):
    """Export a trained run to TFLite and ONNX variants (PTQ, QAT, pruning) in RUN_DIR/exports/.

    Each artifact is checked to load and run, carries its labels and metadata, and is listed in
    exports/manifest.json with sizes, gzip sizes, hashes and quantization parameters.
    --model-repository DIR adds DIR/<model>/config.pbtxt, 1/model.onnx and labels for Triton.

    \b
    Examples:
      edgetl export models/demo/run-1a2b3c
      edgetl export models/demo/run-1a2b3c --formats tflite:int8,qat_int8 --formats onnx:int8
      edgetl export models/demo/run-1a2b3c --formats onnx:fp32 --model-repository triton-models
      edgetl export models/demo/run-1a2b3c --repair
    """
    from edgetl.export import export_run, parse_formats

    tflite, onnx = parse_formats(list(formats)) if formats else (None, None)
    if repair:
        from edgetl.rundir import RunDir

        recipe = RunDir(run_dir).load_recipe()
        tflite = [*(recipe.export.tflite if tflite is None else tflite), "int8_repaired"]
        onnx = [*(recipe.export.onnx if onnx is None else onnx), "int8_repaired"]
    result = export_run(run_dir, tflite=tflite, onnx=onnx, echo=echo)
    echo(f"manifest: {run_dir / 'exports' / 'manifest.json'}")
    if model_repository:
        from edgetl.triton import write_model_repository

        for model in write_model_repository(run_dir, model_repository):
            echo(f"Triton model {model.name}: {model.config_path}")
    if result.failed:
        raise click.ClickException(f"{len(result.failed)} variant(s) failed: {', '.join(result.failed)}")


GATE_OPTIONS = [
    click.option("--threads", type=click.IntRange(1), help="Interpreter threads for latency (recipe: validate.threads)."),
    click.option("--runs", type=click.IntRange(1), help="Timed runs per artifact (recipe: validate.runs)."),
    click.option("--warmup", type=click.IntRange(0), help="Untimed warm-up runs (recipe: validate.warmup)."),
    click.option("--max-accuracy-drop", type=click.FloatRange(0), metavar="PP",
                 help="Gate: largest top-1 drop vs Keras in percentage points (recipe: validate.max_accuracy_drop)."),
    click.option("--min-agreement", type=click.FloatRange(0, 1), metavar="FRACTION",
                 help="Gate: smallest top-1 agreement with Keras (recipe: validate.min_agreement)."),
    click.option("--budget-latency-ms", type=click.FloatRange(0), help="Recommend the best artifact within this p50 latency."),
    click.option("--budget-size-kb", type=click.FloatRange(0), help="Recommend the best artifact within this file size."),
]


def gate_options(fn):
    for option in reversed(GATE_OPTIONS):
        fn = option(fn)
    return fn


def _runtime_list(ctx, param, value):
    """`--runtimes auto,openvino` as a list, each name one of edgetl.edge.runtime.RUNTIMES."""
    from edgetl.edge.runtime import RUNTIMES

    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown or not names:
        raise click.BadParameter(f"{', '.join(unknown) or repr(value)}: choose from {', '.join(RUNTIMES)}, comma-separated")
    return names


@cli.command()
@RUN_DIR
@DATA
@gate_options
@click.option("--runtimes", callback=_runtime_list, metavar="LIST",
              help="Runtimes to measure each export on, comma-separated: auto (LiteRT for .tflite, ONNX Runtime for "
                   ".onnx), litert, onnxruntime, openvino (rows openvino:<artifact>) (recipe: validate.runtimes).")
@click.option("--inconclusive", type=click.Choice(["warn", "fail", "point"]),
              help="When a gate's confidence interval straddles its bound: warn (flag, exit 0), fail (exit 1), or "
                   "point (gate on point estimates only) (recipe: validate.inconclusive).")
@click.option("--confidence", type=click.FloatRange(0.5, 0.999), metavar="LEVEL",
              help="Confidence level of the paired gate intervals (recipe: validate.confidence).")
@friendly_errors
def validate(run_dir: Path, data_dir, **options):
    """Compare the Keras model and every export on the held-out images; gate and recommend.

    Writes RUN_DIR/validation/report.json, report.md and plots; exits 1 when an artifact fails a gate
    (by default only a drop shown beyond the test set's noise; an inconclusive row is flagged).
    A runtime that is not installed (e.g. OpenVINO) is noted, not failed.

    \b
    Examples:
      edgetl validate models/demo/run-1a2b3c
      edgetl validate models/demo/run-1a2b3c --min-agreement 0.98 --budget-latency-ms 2 --budget-size-kb 600
      edgetl validate models/demo/run-1a2b3c --runtimes auto,openvino --inconclusive fail
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
    """List the backbone architectures: input size, parameters, multiply-accumulates, edge-sized or not.

    Parameters and MACs are counted on each headless backbone built at its default size; "edge" marks
    those within 10 M parameters and 1.2 G multiply-accumulates (phones, small boards).

    \b
    Example:
      edgetl backbones --json backbones.json
    """
    from edgetl.backbones import BACKBONES, describe

    rows = [describe(name) for name in BACKBONES]
    echo(f"{'name':<20} {'input':>5} {'params':>10} {'MMACs':>8} {'edge':>4}  preprocessing")
    for r in rows:
        echo(f"{r['name']:<20} {r['input_size']:>5} {r['params'] / 1e6:>9.2f}M {r['macs'] / 1e6:>8.0f} "
             f"{'yes' if r['edge_sized'] else 'no':>4}  {r['preprocessing']}")
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
@click.option("--micro", is_flag=True, help="TensorFlow Lite Micro check: measured tensor arena, op support, "
                                           "MicroMutableOpResolver snippet, RAM/flash table (needs edgetl[micro]).")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="With --micro: run these images (class folders) through TFLM and LiteRT; top-1 and agreement.")
@click.option("--resize", type=click.Choice(["plain", "center_crop"]),
              help="How --images are resized. [default: the run's recipe, else plain]")
@click.option("--arena-margin", type=click.FloatRange(0), default=0.10, show_default=True,
              help="Fraction added to the measured arena before rounding up to 1 KiB.")
@click.option("--flash-budget-kb", type=click.FloatRange(0), default=1024, show_default=True,
              help="Flash budget of the RAM/flash table (KiB).")
@click.option("--ram-budget-kb", type=click.FloatRange(0), default=512, show_default=True,
              help="RAM budget of the RAM/flash table (KiB).")
@click.option("--vela", "vela_config", metavar="CONFIG",
              help="Compile for an Arm Ethos-U NPU with Vela (e.g. ethos-u55-128) and show Vela's estimates.")
@click.option("--vela-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the Vela-compiled model goes. [default: vela-CONFIG/ beside MODEL]")
@JSON_OUT
@friendly_errors
def embed(model: Path, c_header, var_name, micro, images, resize, arena_margin, flash_budget_kb, ram_budget_kb,
          vela_config, vela_dir, json_out):
    """Show MODEL.tflite's embedded metadata; write it as a C header for microcontrollers.

    With --micro and --c-header X.h it also writes X_op_resolver.h (exactly the model's ops), the
    `#define NAME_TENSOR_ARENA_SIZE` in X.h, and X_report.json (arena, ops, agreement, RAM/flash, Vela).

    \b
    Examples:
      edgetl embed models/demo/<run>/exports/tflite-int8.tflite
      edgetl embed model.tflite --c-header model_data.h
      edgetl embed <run>/exports/tflite-int8.tflite --micro --c-header model_data.h --images data/test
      edgetl embed model.tflite --vela ethos-u55-128
    """
    if images is not None and not micro:
        raise click.UsageError("--images needs --micro")
    from edgetl.export.embed import write_c_header
    from edgetl.export.metadata import NoMetadataError, read_metadata

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
    arena_size = None
    if micro:
        from edgetl.export.micro import format_report, micro_report

        report = micro_report(model, images, resize or _recipe_resize(model), arena_margin,
                              flash_budget=int(flash_budget_kb * 1024), ram_budget=int(ram_budget_kb * 1024))
        echo(format_report(report))
        result["micro"] = report
        arena_size = report["arena"]["arena_bytes"]
    if vela_config:
        from edgetl.export.vela import format_vela, vela_report

        result["vela"] = vela_report(model, vela_config, out_dir=vela_dir)
        echo(format_vela(result["vela"]))
    if c_header:
        path = write_c_header(model, c_header, var_name=var_name, arena_size=arena_size)
        result["c_header"] = str(path)
        echo(f"C header written to {path} ({model.stat().st_size:,} model bytes)")
        if micro:
            _write_micro_files(model, path, var_name, result)
    write_json(json_out, result)


def _write_micro_files(model: Path, header: Path, var_name, result: dict) -> None:
    """Beside header X.h: X_op_resolver.h (the model's ops only) and X_report.json (everything --micro found)."""
    from edgetl.export.embed import c_name
    from edgetl.export.micro import write_resolver
    from edgetl.io import atomic_write_json

    name = c_name(model, var_name)
    resolver = write_resolver(header.with_name(f"{header.stem}_op_resolver.h"), model.read_bytes(), name)
    report = atomic_write_json(header.with_name(f"{header.stem}_report.json"), result)
    result.update({"op_resolver": str(resolver), "report": str(report)})
    echo(f"  #define {name.upper()}_TENSOR_ARENA_SIZE {result['micro']['arena']['arena_bytes']} in {header.name}; "
         f"op resolver {resolver}; report (JSON) {report}")


@cli.command("quant-report")
@click.argument("target", type=click.Path(exists=True, path_type=Path))
@click.option("--top", type=click.IntRange(1), default=10, show_default=True, help="Layers to print, worst first.")
@JSON_OUT
@friendly_errors
def quant_report(target: Path, top, json_out):
    """The layers int8 quantization hurts most: SNR of each layer's output against float, worst first.

    TARGET is an artifact in a run's exports/ (its exports/quantization/<artifact>.json, written by
    every int8 and int8_repaired export) or a run directory (every report it has). A tflite-int8 /
    onnx-int8 exported before reports existed gets its report computed and written now.

    \b
    Examples:
      edgetl quant-report models/demo/<run>/exports/tflite-int8.tflite
      edgetl quant-report models/demo/<run> --top 20 --json layers.json
    """
    from edgetl.export.quant_debug import format_report, reports

    found = reports(target, echo=echo)
    for report in found:
        echo(format_report(report, top))
    write_json(json_out, found)


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
@click.option("--runtime", type=click.Choice(["auto", "litert", "onnxruntime", "openvino"]), default="auto",
              show_default=True, help="Runtime: auto is LiteRT for .tflite and ONNX Runtime for .onnx; openvino reads both.")
@click.option("--images", type=click.Path(exists=True, file_okay=False), help="Images (class folders) for accuracy.")
@click.option("--resize", type=click.Choice(["plain", "center_crop"]),
              help="How --images are resized, as in the recipe's data.resize. [default: the run's recipe, else plain]")
@JSON_OUT
@friendly_errors
def bench(target, export_runner, remote, identity, remote_python, threads, runs, warmup, xnnpack, runtime, images,
          resize, json_out):
    """TensorFlow-free latency/accuracy of a .tflite/.onnx, every artifact of a run, or on a device.

    TARGET is a model file or a run directory (all its exports; adds an `edge` section to the
    validation report). The same runner works on boards without TensorFlow: see --export-runner.

    \b
    Examples:
      edgetl bench models/demo/<run>                       # every artifact, this host
      edgetl bench model.tflite --threads 1,4 --images data/test
      edgetl bench model.onnx --runtime openvino --threads 2
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
                           resize=resize or _recipe_resize(target), runtime=runtime)
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


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def serve(args):
    """TensorFlow-free inference server: Open Inference Protocol V2 (Triton/KServe REST), see `edgetl serve -h`.

    \b
    Examples:
      edgetl serve models/demo/<run>                       # every artifact of the run, on 127.0.0.1:8000
      edgetl serve flowers=model.tflite --workers 2 --threads 1 --api-key-file key.txt
      python3 runner.pyz serve model.tflite                # on a board, from `edgetl bench --export-runner`
    """
    from edgetl.edge.serve import main as serve_main

    sys.exit(serve_main(list(args), resize_of=_recipe_resize))


def _recipe_resize(target: Path | None) -> str:
    """The resize mode of the run TARGET belongs to (a run directory or a file in its exports/), else plain."""
    from edgetl.rundir import RunDir

    for folder in ([target, target.parent.parent] if target else []):
        run = RunDir(folder)
        if run.recipe_path.is_file():
            return run.load_recipe().data.resize
    return "plain"


def main():
    """Console-script entry point: TensorFlow's native log lines are filtered unless --verbose is given."""
    if "--verbose" not in sys.argv[1:]:
        from edgetl.console import filter_native_stderr

        filter_native_stderr()
    cli(prog_name="edgetl")


if __name__ == "__main__":
    sys.exit(main())
