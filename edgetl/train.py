"""Two-stage transfer training: feature extraction (frozen backbone), then fine-tuning.

Writes a complete run directory (see `edgetl.rundir`). Stage 1 trains the new head, on cached
backbone features when there is no augmentation (the backbone then runs once, not every epoch).
Stage 2 unfreezes the top of the backbone with BatchNorm kept in inference mode, rebuilds the
optimizer and trains at a low learning rate. Both stages run inside the recipe's `tf.distribute`
strategy scope (see `edgetl.distribute`); in a multi-worker cluster only the chief writes the run.
"""
from __future__ import annotations

import dataclasses
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgetl import __version__
from edgetl.edge.runtime import peak_rss_mb
from edgetl.data import DatasetSplits, load_splits, make_dataset
from edgetl.distribute import (describe, is_chief, make_strategy, mixed_precision, replicas, scaled_learning_rate,
                               worker_cache_dir)
from edgetl.backbones import image_size_for
from edgetl.metrics import classification_metrics, head_metrics
from edgetl.recipe import Recipe
from edgetl.io import atomic_path, atomic_write_json, atomic_write_text, write_labels
from edgetl.rundir import RunDir


@dataclass
class TrainResult:
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


def _verbose() -> int:
    return 1 if sys.stdout.isatty() else 2


def output_classes(splits: DatasetSplits) -> int | dict[str, int]:
    """Classes per output: an int for one head on the class folders, {head: classes} for multi-task."""
    return {h.name: len(h.class_names) for h in splits.heads} or splits.num_classes


def _one_hot(ds, depth: int | dict[str, int]):
    import tensorflow as tf

    if isinstance(depth, dict):
        return ds.map(lambda x, y: (x, {name: tf.one_hot(y[name], n) for name, n in depth.items()}))
    return ds.map(lambda x, y: (x, tf.one_hot(y, depth)))


def _loss(kind: str, label_smoothing: float):
    import tf_keras as keras

    cls = keras.losses.CategoricalFocalCrossentropy if kind == "focal" else keras.losses.CategoricalCrossentropy
    return cls(label_smoothing=label_smoothing)


def stage_learning_rate(learning_rate: float, schedule: str, steps: int):
    """The optimizer's rate for a stage of `steps` optimizer steps: a float, or cosine decay to 0 at the end."""
    import tf_keras as keras

    if schedule == "constant":
        return learning_rate
    return keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(int(steps), 1))


def _compile(model, learning_rate, label_smoothing: float, heads=()) -> None:
    """Adam (at a float rate or a schedule) and cross-entropy; with recipe `heads`, each output gets its
    head's loss, weight and accuracy."""
    import tf_keras as keras

    if not heads:
        model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=_loss("crossentropy", label_smoothing),
                      metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
        return
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss={h.name: _loss(h.loss, label_smoothing) for h in heads},
                  loss_weights={h.name: h.loss_weight for h in heads},
                  metrics={h.name: [keras.metrics.CategoricalAccuracy(name="accuracy")] for h in heads})


def _callbacks(recipe: Recipe, stage, has_val: bool, plateau: bool = False) -> list:
    """Early stopping (the stage's patience, else the recipe's) and optional plateau LR halving, given a val split."""
    import tf_keras as keras

    callbacks = []
    patience = recipe.train.early_stopping_patience if stage.early_stopping_patience is None \
        else stage.early_stopping_patience
    if has_val and patience > 0:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience,
                                                       restore_best_weights=True))
    if has_val and plateau:
        callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=1, verbose=1))
    return callbacks


def class_weights(splits: DatasetSplits, mode: str) -> dict | None:
    """Inverse-frequency class weights for `balanced`, else None."""
    if mode != "balanced":
        return None
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([s.label for s in splits.train])
    classes = np.arange(splits.num_classes)
    weights = compute_class_weight("balanced", classes=classes, y=labels)
    return {int(c): float(w) for c, w in zip(classes, weights)}


class Trainer:
    """Holds the datasets and the classifier for one run; `stage1` and `stage2` train in place.

    Create and train it inside a `tf.distribute` strategy scope to distribute it (default: one device).
    """

    def __init__(self, recipe: Recipe, splits: DatasetSplits, echo=print):
        import tensorflow as tf

        self.recipe, self.splits, self.echo = recipe, splits, echo
        strategy = tf.distribute.get_strategy()
        self.replicas = replicas(strategy)
        self.size = image_size_for(recipe)
        self.clf = self._build_classifier(recipe.model.weights)
        if self.clf.warning:
            echo(self.clf.warning)
        d = recipe.data
        self.bn_calibrated = 0
        if self.clf.weights_source.startswith("random"):
            self.bn_calibrated = self._calibrate_random_backbone()
        common = dict(image_size=self.size, resize=d.resize, batch_size=d.batch_size, cache=d.cache,
                      cache_dir=worker_cache_dir(strategy))
        n = output_classes(splits)
        self.train_ds = _one_hot(make_dataset(splits.train, shuffle=True, seed=recipe.seed, augment=recipe.augment,
                                              targets=splits.targets(splits.train), **common), n)
        self.plain_train_ds = make_dataset(splits.train, **common)
        self.val_ds = _one_hot(make_dataset(splits.val, targets=splits.targets(splits.val), **common), n) \
            if splits.val else None
        self.test_ds = make_dataset(splits.test, **common)
        self.class_weight = class_weights(splits, recipe.train.class_weight)
        self.history: dict = {}
        self.timings: dict = {}

    def _build_classifier(self, weights):
        from edgetl.backbones import build_classifier

        m = self.recipe.model
        return build_classifier(output_classes(self.splits), m.backbone, self.size, m.alpha, weights,
                                m.weights_fallback, m.pooling, m.dropout, m.hidden_units, self.recipe.seed)

    def to_float32(self) -> None:
        """Replace a mixed-precision classifier by a float32 one with the same weights (for saving)."""
        trained = self.clf
        self.clf = self._build_classifier(None)
        self.clf.model.set_weights(trained.model.get_weights())
        self.clf.weights_source, self.clf.warning = trained.weights_source, trained.warning

    def learning_rate(self, lr: float) -> float:
        """A recipe learning rate under `distribute.lr_scaling` for this trainer's replica count."""
        return scaled_learning_rate(lr, self.recipe.distribute, self.replicas)

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

    def use_feature_cache(self) -> bool:
        """Cache features when the recipe says so, by default when there is no augmentation."""
        flag = self.recipe.train.stage1.cache_features
        return (not self.recipe.augment.enabled) if flag is None else flag

    def stage1(self) -> None:
        """Train the new head on the frozen backbone."""
        cfg, t0 = self.recipe.train.stage1, time.perf_counter()
        if cfg.epochs == 0:
            self.echo("stage 1 (feature extraction): skipped (epochs: 0)")
            return
        cached = self.use_feature_cache()
        self.echo(f"stage 1 (feature extraction): {cfg.epochs} epochs, {self._describe_rate(cfg)}, "
                  f"{'cached backbone features' if cached else 'end to end, frozen backbone'}")
        if cached:
            history = self._fit_head_on_features(cfg)
        else:
            self._compile(self.clf.model, cfg, self._steps_per_epoch(len(self.splits.train)))
            history = self.clf.model.fit(self.train_ds, validation_data=self.val_ds, epochs=cfg.epochs,
                                         class_weight=self.class_weight, verbose=_verbose(),
                                         callbacks=_callbacks(self.recipe, cfg, self.val_ds is not None)).history
        self.history["stage1"] = _plain(history)
        self.timings["stage1_s"] = round(time.perf_counter() - t0, 2)

    def _compile(self, model, cfg, steps_per_epoch: int) -> None:
        """Compile for one stage: its (replica-scaled) rate under its schedule, over all of its epochs."""
        rate = stage_learning_rate(self.learning_rate(cfg.learning_rate), cfg.schedule, cfg.epochs * steps_per_epoch)
        _compile(model, rate, self.recipe.train.label_smoothing, self.recipe.model.heads)

    def _steps_per_epoch(self, count: int) -> int:
        """Optimizer steps in one epoch over `count` examples (the last batch may be short)."""
        return -(-count // self.recipe.data.batch_size)

    def _describe_rate(self, cfg) -> str:
        """The stage's rate for the progress line, with its schedule when it has one."""
        lr = f"lr {self.learning_rate(cfg.learning_rate):g}"
        return lr if cfg.schedule == "constant" else f"{lr} ({cfg.schedule} decay to 0)"

    def _one_hot_labels(self, samples):
        """One-hot labels of `samples`: an array, or {head: array} for a multi-task recipe."""
        import tf_keras as keras

        targets, n = self.splits.targets(samples), output_classes(self.splits)
        if targets is None:
            return keras.utils.to_categorical([s.label for s in samples], n)
        return {name: keras.utils.to_categorical(values, n[name]) for name, values in targets.items()}

    def _fit_head_on_features(self, cfg):
        t0 = time.perf_counter()
        feats = self.clf.features.predict(self.plain_train_ds, verbose=0)
        labels = self._one_hot_labels(self.splits.train)
        val = None
        if self.splits.val:
            val_feats = self.clf.features.predict(make_dataset(self.splits.val, self.size, self.recipe.data.resize,
                                                               self.recipe.data.batch_size), verbose=0)
            val = (val_feats, self._one_hot_labels(self.splits.val))
        self.timings["feature_extraction_s"] = round(time.perf_counter() - t0, 2)
        self.echo(f"  backbone features for {len(feats)} train + {len(val[0]) if val else 0} val images "
                  f"in {self.timings['feature_extraction_s']:.1f}s")
        self._compile(self.clf.head, cfg, self._steps_per_epoch(len(feats)))
        return self.clf.head.fit(feats, labels, batch_size=self.recipe.data.batch_size, epochs=cfg.epochs,
                                 validation_data=val, class_weight=self.class_weight, shuffle=True,
                                 verbose=_verbose(), callbacks=_callbacks(self.recipe, cfg, val is not None)).history

    def stage2(self) -> None:
        """Unfreeze the top of the backbone (BatchNorm stays frozen) and fine-tune at a low rate."""
        from edgetl.backbones import unfreeze

        cfg, t0 = self.recipe.train.stage2, time.perf_counter()
        if cfg.epochs == 0:
            self.echo("stage 2 (fine-tuning): skipped (epochs: 0)")
            return
        start = unfreeze(self.clf.backbone, cfg.unfreeze_layers, cfg.unfreeze_from,
                         None if (cfg.unfreeze_layers or cfg.unfreeze_from) else cfg.unfreeze_fraction)
        trainable = sum(1 for layer in self.clf.backbone.layers if layer.trainable and layer.weights)
        self.echo(f"stage 2 (fine-tuning): {cfg.epochs} epochs, {self._describe_rate(cfg)}, "
                  f"backbone layers {start}..{len(self.clf.backbone.layers) - 1} unfrozen ({trainable} with weights; "
                  f"BatchNorm frozen, inference mode)")
        self._compile(self.clf.model, cfg, self._steps_per_epoch(len(self.splits.train)))
        history = self.clf.model.fit(self.train_ds, validation_data=self.val_ds, epochs=cfg.epochs,
                                     class_weight=self.class_weight, verbose=_verbose(),
                                     callbacks=_callbacks(self.recipe, cfg, self.val_ds is not None,
                                                          cfg.reduce_lr_on_plateau)).history
        self.history["stage2"] = _plain(history)
        self.timings["stage2_s"] = round(time.perf_counter() - t0, 2)

    def evaluate(self) -> dict:
        """Test-split metrics of the current model (multi-task: the primary head's, every head's under `heads`)."""
        probs = self.clf.model.predict(self.test_ds, verbose=0)
        if not self.splits.heads:
            y = np.array([s.label for s in self.splits.test])
            return classification_metrics(y, probs, self.splits.class_names)
        return head_metrics(self.splits.targets(self.splits.test), dict(zip(self.clf.model.output_names, probs)),
                            {h.name: h.class_names for h in self.splits.heads})


def _top1_text(m: dict) -> str:
    """`93.00%`, or `species 93.00%, color 98.00%` for a multi-task model."""
    heads = m.get("heads")
    return ", ".join(f"{name} {hm['top1']:.2%}" for name, hm in heads.items()) if heads else f"{m['top1']:.2%}"


def _stage_summary(m: dict) -> dict:
    """top-1 and top-5 of a stage for metrics.json (per head too for a multi-task model)."""
    summary = {"top1": m["top1"], "top5": m["top5"]}
    if "heads" in m:
        summary["heads"] = {name: {"top1": hm["top1"], "top5": hm["top5"]} for name, hm in m["heads"].items()}
    return summary


def _plain(history: dict) -> dict:
    return {k: [float(v) for v in vals] for k, vals in history.items()}


def package_versions() -> dict:
    """Versions of the libraries that shape the results."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "edgetl": __version__}
    for pkg in ("tensorflow", "tf-keras", "numpy", "scikit-learn", "pillow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def train(recipe: Recipe, data_dir=None, run_dir: str | Path | None = None, out_root: str | Path = "models",
          echo=print) -> TrainResult:
    """Train both stages and write the run directory; returns its path and test metrics."""
    import tf_keras as keras

    if recipe.adapt.target_data:
        from edgetl.dann import train_dann

        return train_dann(recipe, data_dir=data_dir, run_dir=run_dir, out_root=out_root, echo=echo)
    t_start = time.perf_counter()
    strategy = make_strategy(recipe.distribute, echo)  # first: multi_worker must start before TF runs anything
    keras.utils.set_random_seed(recipe.seed)
    splits = load_splits(recipe, data_dir)
    if data_dir is not None:
        recipe.data.source = str(Path(splits.root))
    chief = is_chief(strategy)
    if chief:
        run = RunDir(Path(run_dir) if run_dir else new_run_dir(out_root, recipe.name))
        run.path.mkdir(parents=True, exist_ok=True)
    else:  # the other workers save too (TF's multi-worker pattern) but into a scratch folder, removed below
        run = RunDir(Path(tempfile.mkdtemp(prefix="edgetl-worker-")))
    echo(f"dataset {splits.source} ({splits.root}): {splits.num_classes} classes, {len(splits.train)} train / "
         f"{len(splits.val)} val / {len(splits.test)} test images"
         + (f", {len(splits.skipped)} files skipped (listed in manifest.json)" if splits.skipped else ""))
    for head in splits.heads:
        echo(f"  head {head.name}: {len(head.class_names)} classes ({', '.join(head.class_names)}) from {head.source}")
    dist = describe(strategy)
    echo(f"distribute: {dist['strategy']}, {dist['replicas']} replica(s) on {', '.join(dist['devices'])}; "
         f"global batch {recipe.data.batch_size}"
         + (f", learning rates x{dist['replicas']} (lr_scaling: linear)" if recipe.distribute.lr_scaling == "linear"
            else "") + ("" if chief else "; not the chief: the chief writes the run directory"))
    try:
        with strategy.scope():
            with mixed_precision(recipe.distribute, echo) as mixed:
                trainer = Trainer(recipe, splits, echo)
                echo(f"model: {recipe.model.backbone} at {trainer.size}px, weights: {trainer.clf.weights_source}")
                stage_metrics = {}
                trainer.stage1()
                if "stage1" in trainer.history:
                    stage_metrics["stage1"] = trainer.evaluate()
                    echo(f"  test top-1 after stage 1: {_top1_text(stage_metrics['stage1'])}")
                trainer.stage2()
            if mixed:
                trainer.to_float32()  # export and validation get an ordinary float32 model
            final = trainer.evaluate() if "stage2" in trainer.history or mixed or not stage_metrics \
                else stage_metrics["stage1"]
        if "stage2" in trainer.history:
            stage_metrics["stage2"] = final
            echo(f"  test top-1 after stage 2: {_top1_text(final)}")

        metrics = {"test": final,
                   "stages": {k: _stage_summary(v) for k, v in stage_metrics.items()},
                   "weights_source": trainer.clf.weights_source}
        if trainer.clf.warning:
            metrics["warning"] = trainer.clf.warning
        dist.update(lr_scaling=recipe.distribute.lr_scaling, mixed_precision=mixed)
        write_run(run, recipe, splits, trainer, metrics, dist, time.perf_counter() - t_start)
    finally:
        if not chief:
            shutil.rmtree(run.path, ignore_errors=True)
    return TrainResult(run.path, metrics, trainer.clf.warning, chief)


def write_run(run: RunDir, recipe: Recipe, splits: DatasetSplits, trainer: Trainer, metrics: dict,
               distribute: dict, wall_s: float) -> None:
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
        "versions": package_versions(),
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
