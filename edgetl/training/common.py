"""What supervised and DANN training share: the run's setup, the recipe's classifier, cached backbone features, run files.

Both trainers start with `start_run` (seed once, load the splits, resolve the recipe into a new object) and
`open_run_dir`, hold their classifier in a `TrainerBase` and finish with `write_run`, so every run directory has
the same files (see `edgetl.rundir`) whichever way it was trained.
"""
from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgetl.backbones import image_size_for
from edgetl.data import DatasetSplits, Sample, load_splits, make_dataset
from edgetl.edge.runtime import peak_rss_mb
from edgetl.io import atomic_path, atomic_write_json, atomic_write_text, package_versions, write_labels
from edgetl.recipe import Recipe
from edgetl.rundir import RunDir

# The libraries whose versions shape a trained model (manifest.json "versions", with python and edgetl).
DISTRIBUTIONS = ("tensorflow", "tf-keras", "numpy", "scikit-learn", "pillow")


@dataclass
class TrainResult:
    """What `train` returns: the run directory, its metrics, the weights warning (if any) and who wrote it."""

    run_dir: Path
    metrics: dict
    warning: str | None = None
    chief: bool = True  # False on the other workers of a multi-worker cluster: their run_dir is removed


def new_run_dir(out_root: str | Path, recipe_name: str) -> Path:
    """A fresh `<out_root>/<recipe-name>/<timestamp>` directory."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(out_root) / recipe_name / stamp
    n = 1
    while path.exists():
        n += 1
        path = Path(out_root) / recipe_name / f"{stamp}-{n}"
    path.mkdir(parents=True)
    return path


def start_run(recipe: Recipe, data_dir=None) -> tuple[Recipe, DatasetSplits]:
    """Seed every generator (the training stage's one seeding), load the splits and resolve the recipe.

    `data_dir` overrides `data.source`: the resolved recipe, a new object (the caller's is never changed), names
    the folder actually used, and recipe.yaml records it.
    """
    import tf_keras as keras

    keras.utils.set_random_seed(recipe.seed)
    splits = load_splits(recipe, data_dir)
    if data_dir is not None:
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, source=str(Path(splits.root))))
    return recipe, splits


def open_run_dir(recipe: Recipe, run_dir: str | Path | None = None, out_root: str | Path = "models",
                 chief: bool = True) -> RunDir:
    """The run directory, created: `run_dir`, else a new one under `out_root`.

    A non-chief worker of a cluster gets a scratch folder instead: it saves too (TensorFlow's multi-worker
    pattern), and its caller removes the folder.
    """
    if not chief:
        return RunDir(Path(tempfile.mkdtemp(prefix="edgetl-worker-")))
    run = RunDir(Path(run_dir) if run_dir else new_run_dir(out_root, recipe.name))
    run.path.mkdir(parents=True, exist_ok=True)
    return run


def describe_splits(splits: DatasetSplits) -> str:
    """The dataset line of the training log: source, classes and images per split."""
    return (f"dataset {splits.source} ({splits.root}): {splits.num_classes} classes, {len(splits.train)} train / "
            f"{len(splits.val)} val / {len(splits.test)} test images")


def output_classes(splits: DatasetSplits) -> int | dict[str, int]:
    """Classes per output: an int for one head on the class folders, {head: classes} for multi-task."""
    return {h.name: len(h.class_names) for h in splits.heads} or splits.num_classes


def class_weights(splits: DatasetSplits, mode: str) -> dict | None:
    """Inverse-frequency class weights for `balanced`, else None."""
    if mode != "balanced":
        return None
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([s.label for s in splits.train])
    classes = np.arange(splits.num_classes)
    weights = compute_class_weight("balanced", classes=classes, y=labels)
    return {int(c): float(w) for c, w in zip(classes, weights)}


class TrainerBase:
    """The recipe's classifier for one run (a random backbone gets BatchNorm statistics from training images),
    its class weights, and the history and timings that `write_run` records. Subclasses add the training."""

    def __init__(self, recipe: Recipe, splits: DatasetSplits, echo=print):
        self.recipe, self.splits, self.echo = recipe, splits, echo
        self.size = image_size_for(recipe)
        self.clf = self._build_classifier(recipe.model.weights)
        if self.clf.warning:
            echo(self.clf.warning)
        self.bn_calibrated = self._calibrate_random_backbone() if self.clf.weights_source.startswith("random") else 0
        self.class_weight = class_weights(splits, recipe.train.class_weight)
        self.history: dict = {}
        self.timings: dict = {}

    def use_feature_cache(self) -> bool:
        """Whether the head trains on backbone features computed once (recorded in the manifest)."""
        raise NotImplementedError

    def _build_classifier(self, weights):
        from edgetl.backbones import build_classifier

        m = self.recipe.model
        return build_classifier(output_classes(self.splits), m.backbone, self.size, m.alpha, weights,
                                m.weights_fallback, m.pooling, m.dropout, m.hidden_units, self.recipe.seed,
                                cut_at=m.cut_at)

    def _calibrate_random_backbone(self, count: int = 64) -> int:
        """Random backbones get BatchNorm statistics from training images, else their features vanish."""
        from edgetl.backbones import calibrate_batchnorm
        from edgetl.data import load_arrays

        rng = np.random.default_rng(self.recipe.seed)
        picks = rng.permutation(len(self.splits.train))[:count]
        images, _ = load_arrays([self.splits.train[i] for i in picks], self.size, self.recipe.data.resize)
        calibrate_batchnorm(self.clf, images.astype(np.float32))
        self.echo(f"  random backbone: BatchNorm statistics estimated on {len(picks)} training images")
        return len(picks)

    def backbone_features(self, groups: dict[str, list[Sample]]) -> dict[str, np.ndarray]:
        """Pooled backbone features of each non-empty sample list, in one pass over one input pipeline.

        The images are decoded once and not kept (the features are the cache), and the backbone's inference
        function is traced once for all groups.
        """
        d = self.recipe.data
        named = {name: samples for name, samples in groups.items() if samples}
        everything = [s for samples in named.values() for s in samples]
        feats = self.clf.features.predict(make_dataset(everything, self.size, d.resize, d.batch_size, cache="none"),
                                          verbose=0)
        bounds = np.cumsum([0] + [len(samples) for samples in named.values()])
        return {name: feats[start:end] for name, start, end in zip(named, bounds[:-1], bounds[1:])}


def write_run(run: RunDir, recipe: Recipe, splits: DatasetSplits, trainer: TrainerBase, metrics: dict,
              distribute: dict, wall_s: float) -> None:
    """Write the run directory's files: recipe, labels, model, history, metrics, plots and manifest."""
    from edgetl.plots import plot_confusion_matrix, plot_training_curves

    atomic_write_text(run.recipe_path, recipe.to_yaml())
    write_labels(run.path, splits.primary_class_names, {head.name: head.class_names for head in splits.heads})
    with atomic_path(run.model_path) as tmp:
        trainer.clf.model.save(tmp)
    atomic_write_json(run.history_path, trainer.history)
    atomic_write_json(run.metrics_path, metrics)
    plot_training_curves(trainer.history, run.path / "training_curves.png")
    plot_confusion_matrix(metrics["test"]["confusion_matrix"], splits.primary_class_names,
                          run.path / "confusion_matrix.png",
                          title=f"{recipe.name}: test confusion matrix (top-1 {metrics['test']['top1']:.1%})")
    atomic_write_json(run.manifest_path, {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe_fingerprint": recipe.fingerprint(),
        "seed": recipe.seed,
        "versions": package_versions(DISTRIBUTIONS),
        "model": {"backbone": recipe.model.backbone, "image_size": trainer.size, "alpha": recipe.model.alpha,
                  "weights_source": trainer.clf.weights_source, "params": int(trainer.clf.model.count_params()),
                  "feature_cache": trainer.use_feature_cache(),
                  "batchnorm_calibrated_on": trainer.bn_calibrated,
                  **({"heads": [{**dataclasses.asdict(h), "classes": output_classes(splits)[h.name]}
                                for h in recipe.model.heads]} if splits.heads else {})},
        "warning": trainer.clf.warning,
        "distribute": distribute,
        "dataset": splits.fingerprint(),
        "skipped_files": [{"path": s.path, "reason": s.reason} for s in splits.skipped],
        "timings_s": {**trainer.timings, "total_s": round(wall_s, 2)},
        "peak_rss_mb": round(peak_rss_mb(), 1),
    })
