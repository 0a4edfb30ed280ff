"""Recipes: YAML files loaded into typed, validated dataclasses.

Every field has a default and a one-line help text (shown by `edgetl recipe show --explain`).
Errors name the file, the key path, what is allowed and, for typos, the nearest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from edgetl import variants as export_variants
from edgetl.errors import EdgetlError


class RecipeError(EdgetlError, ValueError):
    """Recipe problems, each naming the file and key path; `problems` lists every one found in one pass."""

    def __init__(self, message: str, problems: typing.Sequence[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems else [message]

    @classmethod
    def of(cls, problems: typing.Sequence[str]) -> "RecipeError":
        """One error carrying every problem: the single message itself, or a numbered list of them."""
        if len(problems) == 1:
            return cls(problems[0])
        listing = "\n".join(f"  {i}. {p}" for i, p in enumerate(problems, 1))
        return cls(f"{len(problems)} problems in the recipe:\n{listing}", problems)


def opt(default: Any, help: str, *, min: float | None = None, max: float | None = None,
        min_exclusive: bool = False, factory=None):
    """A dataclass field with help text and an optional numeric range."""
    meta = {"help": help, "min": min, "max": max, "min_exclusive": min_exclusive}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    source: str = opt("digits", "Dataset: `digits` (built-in, offline), `tf_flowers` (Keras download cache), "
                                "or a path to a class-per-folder directory (also settable with --data).")
    image_size: Optional[int] = opt(None, "Square input size in pixels; null = the backbone's default.", min=32, max=1024)
    resize: Literal["plain", "center_crop"] = opt("plain", "How images reach image_size: stretch, or "
                                                           "aspect-preserving center crop.")
    val_split: float = opt(0.1, "Fraction of train held out for validation when there is no val/ folder.", min=0.0, max=0.5)
    test_split: float = opt(0.2, "Fraction held out for test when the folder has no train/test subfolders.",
                            min=0.0, max=0.5, min_exclusive=True)
    max_per_class: Optional[int] = opt(None, "Use at most this many training images per class (quick runs).", min=1)
    batch_size: int = opt(32, "Batch size (global, across replicas).", min=1, max=4096)
    cache: Literal["memory", "disk", "none"] = opt("memory", "tf.data cache for decoded images: memory, disk "
                                                             "(for datasets larger than RAM), or none.")


@dataclass
class AugmentConfig:
    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = opt("none", "Random flips.")
    rotation: float = opt(0.0, "Random rotation, fraction of a full turn (0.1 = +-36 degrees).", min=0.0, max=0.5)
    zoom: float = opt(0.0, "Random zoom, fraction of the size.", min=0.0, max=0.9)
    translation: float = opt(0.0, "Random translation, fraction of the size.", min=0.0, max=0.5)
    contrast: float = opt(0.0, "Random contrast factor.", min=0.0, max=1.0)
    brightness: float = opt(0.0, "Random brightness, fraction of the 0-255 range.", min=0.0, max=1.0)

    @property
    def enabled(self) -> bool:
        """True when any augmentation is configured."""
        return self.flip != "none" or any(
            getattr(self, f) > 0 for f in ("rotation", "zoom", "translation", "contrast", "brightness"))


HEAD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
# Layer names of the classifier around the heads: a head named like one would clash in the Keras model.
RESERVED_HEAD_NAMES = ("image", "preprocess", "pool", "dropout", "features", "hidden_<N>")


@dataclass
class HeadConfig:
    name: str = opt("", "Head name: the Keras output layer and the TFLite/ONNX output name (a letter, then "
                        "letters, digits or _).")
    csv: Optional[str] = opt(None, "Labels from a CSV file with a header row: a `file` column (path relative to the "
                                   "data root, or a bare file name) and a label column; relative paths are read "
                                   "from the recipe's folder. null = the class-per-folder layout.")
    column: Optional[str] = opt(None, "CSV column holding this head's labels; null = the column named like the "
                                      "head, else `label`.")
    loss: Literal["crossentropy", "focal"] = opt("crossentropy", "Softmax cross-entropy, or focal cross-entropy "
                                                                 "(gamma 2) for imbalanced tasks.")
    loss_weight: float = opt(1.0, "Weight of this head's loss in the total loss.", min=0.0)


@dataclass
class ModelConfig:
    backbone: str = opt("mobilenet_v2", "Backbone architecture (see `edgetl backbones`).")
    alpha: float = opt(1.0, "Width multiplier for MobileNet backbones.", min=0.1, max=2.0)
    weights: Optional[str] = opt("imagenet", "`imagenet` (Keras download/cache), a path to a weights file, "
                                             "or null for random init.")
    weights_fallback: Literal["none", "random"] = opt("none", "What to do when ImageNet weights cannot be "
                                                              "obtained: `none` = stop with an error; `random` = "
                                                              "warn and use random init (demo recipe only).")
    cut_at: Optional[str] = opt(None, "Cut the backbone at this named layer (its output feeds the pooling and "
                                      "head; the layers above it are dropped): a smaller model, e.g. "
                                      "block_13_expand_relu for MobileNetV2 on a microcontroller. null = the "
                                      "whole backbone. `edgetl features RUN --list-layers` lists the names.")
    pooling: Literal["avg", "max"] = opt("avg", "Global pooling before the head.")
    dropout: float = opt(0.2, "Dropout before the classification layer.", min=0.0, max=0.9)
    hidden_units: list[int] = opt(None, "Optional hidden Dense layers of the head (ReLU).", factory=list)
    heads: list[HeadConfig] = opt(None, "Multi-task heads on the shared backbone (the first is the primary head, "
                                        "used for labels.txt and recommendations); empty = one head on the class "
                                        "folders.", factory=list)


def _stage_patience():
    """The per-stage override of `train.early_stopping_patience`."""
    return opt(None, "This stage's early-stopping patience (0 disables); null = train.early_stopping_patience.",
               min=0)


def _stage_schedule():
    """The learning-rate schedule of one training stage."""
    return opt("constant", "Learning rate over the stage: constant, or cosine (decays to 0 at the last "
                           "epoch, so the final weights settle instead of wandering).")


@dataclass
class Stage1Config:
    epochs: int = opt(5, "Feature-extraction epochs (frozen backbone); 0 skips the stage.", min=0, max=1000)
    learning_rate: float = opt(1e-3, "Adam learning rate for the new head.", min=0.0, max=1.0, min_exclusive=True)
    cache_features: Optional[bool] = opt(None, "Run the backbone once and train the head on cached features; "
                                               "null = yes when there is no augmentation.")
    schedule: Literal["constant", "cosine"] = _stage_schedule()
    early_stopping_patience: Optional[int] = _stage_patience()


@dataclass
class Stage2Config:
    epochs: int = opt(5, "Fine-tuning epochs; 0 skips the stage.", min=0, max=1000)
    learning_rate: float = opt(1e-5, "Learning rate for fine-tuning (keep it low).", min=0.0, max=1.0,
                               min_exclusive=True)
    unfreeze_layers: Optional[int] = opt(None, "Unfreeze the top N backbone layers.", min=1)
    unfreeze_from: Optional[str] = opt(None, "Unfreeze from this named backbone layer to the top.")
    unfreeze_fraction: Optional[float] = opt(0.3, "Unfreeze this top fraction of backbone layers (used when "
                                                  "neither unfreeze_layers nor unfreeze_from is set).",
                                             min=0.0, max=1.0, min_exclusive=True)
    schedule: Literal["constant", "cosine"] = _stage_schedule()
    reduce_lr_on_plateau: bool = opt(False, "Halve the learning rate when validation loss stalls "
                                            "(schedule: constant only).")
    early_stopping_patience: Optional[int] = _stage_patience()


@dataclass
class TrainConfig:
    stage1: Stage1Config = opt(None, "Stage 1: feature extraction.", factory=Stage1Config)
    stage2: Stage2Config = opt(None, "Stage 2: fine-tuning.", factory=Stage2Config)
    early_stopping_patience: int = opt(3, "Stop a stage after this many epochs without val-loss improvement "
                                          "(best weights restored); 0 disables. A stage's own setting wins.",
                                       min=0)
    label_smoothing: float = opt(0.0, "Label smoothing for the cross-entropy loss.", min=0.0, max=0.5)
    class_weight: Literal["none", "balanced"] = opt("none", "`balanced` weighs classes by inverse frequency.")


@dataclass
class FinetuneConfig:
    epochs: int = opt(2, "Fine-tuning epochs.", min=0, max=100)
    learning_rate: float = opt(1e-5, "Learning rate.", min=0.0, max=1.0, min_exclusive=True)


@dataclass
class PruningConfig:
    target_sparsity: float = opt(0.5, "Final fraction of zero weights in pruned layers.", min=0.0, max=0.99,
                                 min_exclusive=True)
    epochs: int = opt(3, "Fine-tuning epochs while pruning.", min=1, max=100)
    learning_rate: float = opt(1e-4, "Learning rate (pruning needs more than QAT to recover).", min=0.0, max=1.0,
                               min_exclusive=True)
    allocation: Literal["erk", "uniform"] = opt("erk", "How target_sparsity spreads over layers: erk "
                                                "(Erdős-Rényi-Kernel: big layers pruned harder, small ones kept "
                                                "denser; same overall sparsity) or uniform (every layer at the "
                                                "target).")
    distill: bool = opt(True, "Fine-tune toward the float model's pooled features and probabilities (knowledge "
                              "distillation) rather than toward the labels alone.")


@dataclass
class Int8Config:
    max_drop_pp: float = opt(1.0, "Repair bound (int8_repaired variants): largest allowed disagreement with the "
                                  "float model, percentage points of the repair images (validation split, else "
                                  "training images; never test). A top-1 drop can never exceed it.", min=0.0)
    max_float_layers: int = opt(8, "Repair limit: most layers raised (left float, or ONNX int16 weights) before the "
                                   "repair gives up.", min=0)
    step: int = opt(1, "Repair: layers raised per step, most sensitive first.", min=1)
    rank: Literal["measured", "report"] = opt(
        "measured", "Repair order of the 2 x max_float_layers layers the per-layer report ranks worst: measured "
                    "(each is first raised alone on the repair images; fewest flips, then least output error, go "
                    "first) or report (the report's order).")
    max_size_ratio: float = opt(1.5, "Repair limit: largest artifact size relative to the full-int8 one.", min=1.0)
    max_latency_ratio: Optional[float] = opt(None, "Repair limit: largest p50 latency relative to full int8 "
                                                   "(null: recorded, not limited).", min=1.0)
    repair_images: Optional[int] = opt(
        None, "Images the repair scores each step on: the validation split, topped up with training images to this "
              "count (null: the validation split, topped up to 100 / max_drop_pp images, so one image is within the "
              "bound). Training images rarely flip (the model is sure of them), so fewer dilute the bound less.", min=1)
    denylist: list[str] = opt(None, "Layer-name patterns (Python regular expressions, searched) always left float "
                                    "by the int8_repaired variants.", factory=list)
    calibration: Literal["minmax", "entropy", "percentile"] = opt(
        "minmax", "ONNX int8 calibration method (onnxruntime CalibrationMethod).")
    per_channel: bool = opt(True, "Per-channel weight scales (int8 and int8_repaired variants, both formats).")
    bias_correction: bool = opt(True, "int8 and int8_repaired variants: each int8 layer's bias takes back the mean "
                                      "output error its rounded weights add on the calibration images (no size or "
                                      "latency cost; edgetl.export.bias_correction).")
    onnx_repair: Literal["int16_weights", "float"] = opt(
        "int16_weights", "How the ONNX int8_repaired variant raises a sensitive node: its weights to int16 (half the "
                         "size of float) or the whole node to float (nodes_to_exclude).")


TFLITE_VARIANTS = export_variants.names("tflite")  # the rows of edgetl/variants.py
ONNX_VARIANTS = export_variants.names("onnx")


@dataclass
class ExportConfig:
    tflite: list[str] = opt(None, f"TFLite variants: {', '.join(TFLITE_VARIANTS)}.",
                            factory=lambda: ["fp32", "fp16", "dynamic", "int8"])
    onnx: list[str] = opt(None, f"ONNX variants: {', '.join(ONNX_VARIANTS)}.", factory=lambda: ["fp32"])
    io: Literal["float", "int8", "uint8"] = opt("uint8", "Input/output tensor type of full-integer variants "
                                                        "(uint8 takes camera bytes directly).")
    target: Literal["auto", "x86_avx2", "x86_avx512_vnni", "arm64"] = opt(
        "auto", "CPU the int8 artifacts are for: picks ONNX int8 activation/weight types and reduce_range "
                "(edgetl/export/targets.py); auto = the exporting machine's CPU. Recorded in the manifest.")
    representative_samples: int = opt(200, "Training images used to calibrate int8 quantization.", min=1)
    opset: int = opt(17, "ONNX opset.", min=13, max=21)
    batch_size: Optional[int] = opt(None, "Batch size of the QAT and pruning fine-tunes (null: data.batch_size); "
                                          "smaller bounds their memory, which the fake-quant graph multiplies.", min=1)
    qat: FinetuneConfig = opt(None, "Quantization-aware training fine-tune.", factory=FinetuneConfig)
    pruning: PruningConfig = opt(None, "Magnitude pruning fine-tune.", factory=PruningConfig)
    int8: Int8Config = opt(None, "Post-training int8: calibration, per-layer report, accuracy-aware repair.",
                           factory=Int8Config)


@dataclass
class ValidateConfig:
    max_accuracy_drop: float = opt(1.0, "Gate: largest allowed top-1 drop vs Keras, percentage points.", min=0.0)
    min_agreement: float = opt(0.0, "Gate: smallest allowed top-1 agreement with Keras (0-1).", min=0.0, max=1.0)
    threads: int = opt(2, "Interpreter threads for latency.", min=1, max=256)
    runs: int = opt(50, "Timed runs per artifact.", min=1)
    warmup: int = opt(5, "Warm-up runs before timing.", min=0)
    budget_latency_ms: Optional[float] = opt(None, "Recommend the most accurate artifact under this latency.", min=0.0)
    budget_size_kb: Optional[float] = opt(None, "Recommend the most accurate artifact under this size.", min=0.0)
    # edgetl.edge.runtime.RUNTIMES (tests/test_validate.py checks the two lists agree)
    runtimes: list[Literal["auto", "litert", "onnxruntime", "openvino"]] = opt(
        None, "Runtimes each export is measured on, one row each: auto = LiteRT for .tflite and ONNX Runtime for "
              ".onnx (rows named as the artifact); openvino adds `openvino:<artifact>` rows (pip install openvino; "
              "when it is missing those rows are noted, not failed).", factory=lambda: ["auto"])
    inconclusive: Literal["warn", "fail", "point"] = opt(
        "warn", "Gate verdict when the paired confidence interval straddles a bound: warn = flag it and fail only a "
                "drop shown beyond noise; fail = count it as failed; point = gate on the point estimates alone.")
    confidence: float = opt(0.95, "Confidence level of the paired intervals the gates decide on.", min=0.5, max=0.999)


@dataclass
class DomainAdaptationConfig:
    target_data: Optional[str] = opt(None, "Unlabeled images from the deployment domain (a folder, searched "
                                           "recursively); setting it turns on domain-adversarial training (DANN).")
    target_test: Optional[str] = opt(None, "Labeled class-per-folder images from the deployment domain, to "
                                           "report target accuracy next to a source-only baseline.")
    domain_loss_weight: float = opt(1.0, "Weight of the domain-classifier loss.", min=0.0)
    grl_max: float = opt(1.0, "Final gradient-reversal coefficient; ramped from 0 as 2/(1+exp(-10p))-1.",
                         min=0.0, max=10.0)
    bottleneck_units: int = opt(256, "Size of the adaptable feature layer between pooling and classifier.", min=8)
    domain_hidden_units: int = opt(256, "Hidden units of the domain classifier.", min=8)


@dataclass
class DistributeConfig:
    strategy: Literal["auto", "none", "mirrored", "multi_worker"] = opt(
        "auto", "tf.distribute strategy: auto = MirroredStrategy when more than one GPU is visible, else none; "
                "multi_worker reads TF_CONFIG.")
    devices: list[str] = opt(None, "Devices for `mirrored`, e.g. [/gpu:0, /gpu:1]; empty = all visible.",
                             factory=list)
    lr_scaling: Literal["none", "linear"] = opt("none", "Learning-rate rule across replicas: none keeps the "
                                                        "recipe's rate; linear multiplies it by the replica count.")
    mixed_precision: bool = opt(False, "Train with mixed_float16 on GPU (the head's output stays float32).")


@dataclass
class Recipe:
    name: str = opt("experiment", "Run name; runs go to <out>/<name>/<run-id>/.")
    description: str = opt("", "Free text, copied into model metadata.")
    seed: int = opt(42, "Seed for splits, shuffling, initialisation.", min=0)
    data: DataConfig = opt(None, "Dataset and input pipeline.", factory=DataConfig)
    augment: AugmentConfig = opt(None, "Augmentation (Keras preprocessing layers, training batches only).",
                                 factory=AugmentConfig)
    model: ModelConfig = opt(None, "Backbone and head.", factory=ModelConfig)
    train: TrainConfig = opt(None, "Two-stage transfer training.", factory=TrainConfig)
    export: ExportConfig = opt(None, "Exported artifacts.", factory=ExportConfig)
    validate: ValidateConfig = opt(None, "Validation gates and budgets.", factory=ValidateConfig)
    adapt: DomainAdaptationConfig = opt(None, "Unsupervised domain adaptation (DANN).",
                                        factory=DomainAdaptationConfig)
    distribute: DistributeConfig = opt(None, "Distributed / GPU training.", factory=DistributeConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (YAML/JSON ready)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The fully resolved recipe as YAML."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, width=100)

    def fingerprint(self) -> str:
        """Short hash of the resolved recipe (which stages must re-run)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# Loading and validation


def load_recipe(path: str | Path, overrides: typing.Iterable[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `key.path=value` overrides, validate, return a Recipe."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    if "name" not in raw:
        raw["name"] = path.stem
    for item in overrides:
        apply_override(raw, item, source=str(path))
    recipe = from_dict(Recipe, raw, source=str(path))
    for head in recipe.model.heads:
        if head.csv is not None:
            head.csv = str((path.parent / Path(head.csv).expanduser()).resolve())
    return recipe


def recipe_from_dict(raw: dict, source: str = "<dict>") -> Recipe:
    """Build a validated Recipe from a plain dict (tests, programmatic use)."""
    return from_dict(Recipe, raw, source=source)


def apply_override(raw: dict, item: str, source: str = "--set") -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) to a raw recipe dict."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.stage1.epochs=3")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    _resolve_key_path(parts, source)
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"{source}: cannot set {key}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(value)


def _resolve_key_path(parts: list[str], source: str) -> None:
    """Check that a dotted key path names a real field (typo suggestions included)."""
    cls = Recipe
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls)}
        where = ".".join(parts[:i]) or "<top level>"
        if part not in names:
            raise RecipeError(_unknown_key_message(source, where, part, list(names)))
        ftype = _field_types(cls)[part]
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(ftype):
                raise RecipeError(f"{source}: {'.'.join(parts[:i + 1])} is a value, not a section")
            cls = ftype


def _unknown_key_message(source: str, where: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{source}: unknown key '{key}' in {where}.{hint} Valid keys: {', '.join(valid)}"


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls, raw: Any, source: str, path: str = "") -> Any:
    """Recursively build dataclass `cls` from `raw`, checking keys, types and ranges."""
    where = path or "<top level>"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: {where} must be a mapping, got {type(raw).__name__} ({raw!r})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems = [_unknown_key_message(source, where, str(key), list(fields)) for key in raw if key not in fields]
    types_ = _field_types(cls)
    kwargs = {}
    for name, value in raw.items():
        if name not in fields:
            continue
        key_path = f"{path}.{name}" if path else name
        ftype = types_[name]
        try:
            if dataclasses.is_dataclass(ftype):
                kwargs[name] = from_dict(ftype, value, source, key_path)
            else:
                kwargs[name] = _check_value(value, ftype, fields[name].metadata, source, key_path)
        except RecipeError as exc:
            problems.extend(exc.problems)
    if not problems:
        obj = cls(**kwargs)
        problems = list(_cross_field_problems(obj, source, path))
    if problems:
        raise RecipeError.of(problems)
    return obj


def _check_value(value: Any, ftype: Any, meta: dict, source: str, key_path: str) -> Any:
    value = _coerce(value, ftype, source, key_path)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = meta.get("min"), meta.get("max")
        too_low = lo is not None and (value <= lo if meta.get("min_exclusive") else value < lo)
        if too_low or (hi is not None and value > hi):
            lo_txt = "-inf" if lo is None else f"{lo:g}"
            hi_txt = "inf" if hi is None else f"{hi:g}"
            bracket = "(" if meta.get("min_exclusive") else "["
            raise RecipeError(f"{source}: {key_path} = {value!r} is out of range; allowed: "
                              f"{bracket}{lo_txt}, {hi_txt}]")
    return value


def _coerce(value: Any, ftype: Any, source: str, key_path: str) -> Any:
    """Check `value` against a type annotation, allowing int -> float; return the value."""
    origin = typing.get_origin(ftype)
    if origin in (Union, types.UnionType):
        args = typing.get_args(ftype)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], source, key_path)
    if origin is Literal:
        allowed = typing.get_args(ftype)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise RecipeError(f"{source}: {key_path} = {value!r} is not allowed; allowed values: "
                              f"{', '.join(map(str, allowed))}.{hint}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(ftype)
        if not isinstance(value, list):
            raise RecipeError(f"{source}: {key_path} must be a list of {item_type.__name__}, got {value!r}")
        if dataclasses.is_dataclass(item_type):
            return [from_dict(item_type, v, source, f"{key_path}[{i}]") for i, v in enumerate(value)]
        return [_coerce(v, item_type, source, f"{key_path}[{i}]") for i, v in enumerate(value)]
    if ftype is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if ftype in (int, float, str, bool) and (type(value) is not ftype):
        raise RecipeError(f"{source}: {key_path} must be {_type_word(ftype)}, got {type(value).__name__} "
                          f"({value!r})")
    return value


def _type_word(t) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[t]


def _cross_field_problems(obj: Any, source: str, path: str) -> typing.Iterator[str]:
    """Every broken constraint that involves more than one field."""
    if isinstance(obj, ExportConfig):
        for fmt in export_variants.FORMATS:
            valid = export_variants.names(fmt)
            for v in getattr(obj, fmt):
                if v not in valid:
                    close = difflib.get_close_matches(v, valid, n=1, cutoff=0.5)
                    hint = f" Did you mean '{close[0]}'?" if close else ""
                    yield (f"{source}: {path}.{fmt} has unknown variant {v!r}; valid "
                           f"{fmt} variants: {', '.join(valid)}.{hint}")
    if isinstance(obj, Int8Config):
        for i, pattern in enumerate(obj.denylist):
            try:
                re.compile(pattern)
            except re.error as exc:
                yield f"{source}: {path}.denylist[{i}] = {pattern!r} is not a regular expression ({exc})"
    if isinstance(obj, Stage2Config):
        chosen = [k for k in ("unfreeze_layers", "unfreeze_from") if getattr(obj, k) is not None]
        if len(chosen) > 1:
            yield (f"{source}: {path}: set only one of unfreeze_layers / unfreeze_from")
        if obj.reduce_lr_on_plateau and obj.schedule != "constant":
            yield (f"{source}: {path}.reduce_lr_on_plateau cannot be combined with "
                   f"{path}.schedule: {obj.schedule}; set one of them (schedule: constant, or "
                   f"reduce_lr_on_plateau: false)")
    if isinstance(obj, ModelConfig):
        from edgetl.backbones import BACKBONES

        if obj.backbone not in BACKBONES:
            close = difflib.get_close_matches(obj.backbone, list(BACKBONES), n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            yield (f"{source}: {path}.backbone = {obj.backbone!r} is not a known backbone; "
                   f"allowed values: {', '.join(BACKBONES)}.{hint}")
        if obj.cut_at is not None and not obj.cut_at.strip():
            yield (f"{source}: {path}.cut_at is empty; name a backbone layer (e.g. block_13_expand_relu) or "
                   f"set null for the whole backbone")
        yield from _head_problems(obj.heads, source, f"{path}.heads")
    if isinstance(obj, Recipe) and obj.adapt.target_data and obj.train.stage1.schedule != "constant":
        yield (f"{source}: train.stage1.schedule: {obj.train.stage1.schedule} is not supported with "
               f"adapt.target_data: domain adaptation anneals its own learning rate; use constant")
    if isinstance(obj, Recipe) and obj.model.heads:
        if obj.adapt.target_data:
            yield (f"{source}: model.heads and adapt.target_data cannot be combined: domain adaptation "
                   f"trains one classifier; remove one of them")
        if obj.train.class_weight != "none":
            yield (f"{source}: train.class_weight: {obj.train.class_weight} is not supported with "
                   f"model.heads; use `none` (or a head's `loss: focal` for an imbalanced task)")


def _head_problems(heads: list[HeadConfig], source: str, path: str) -> typing.Iterator[str]:
    """Head names that are missing, not identifiers, reserved or repeated."""
    seen = set()
    for i, head in enumerate(heads):
        where = f"{source}: {path}[{i}].name"
        if not HEAD_NAME.match(head.name):
            yield (f"{where} = {head.name!r}: a head needs a name that starts with a letter and holds "
                   f"only letters, digits and _ (at most 64), e.g. `species`")
        if head.name in RESERVED_HEAD_NAMES or re.fullmatch(r"hidden_\d+", head.name):
            yield (f"{where} = {head.name!r} is the name of a layer of the classifier; reserved: "
                   f"{', '.join(RESERVED_HEAD_NAMES)}")
        if head.name in seen:
            yield (f"{where} = {head.name!r} is used by an earlier head; head names must be unique")
        seen.add(head.name)


def explain(cls=Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key path, default, help) for every field: the documentation of the recipe format."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        ftype = _field_types(cls)[f.name]
        item = typing.get_args(ftype)[0] if typing.get_origin(ftype) is list else None
        if dataclasses.is_dataclass(ftype):
            rows.append((key, "", f.metadata.get("help", "")))
            rows.extend(explain(ftype, key + "."))
        elif dataclasses.is_dataclass(item):
            rows.append((key, "[]", f.metadata.get("help", "")))
            rows.extend(explain(item, key + "[]."))
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            rows.append((key, json.dumps(default), f.metadata.get("help", "")))
    return rows
