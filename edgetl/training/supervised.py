"""Two-stage supervised transfer training: feature extraction (frozen backbone), then fine-tuning.

Stage 1 trains the new head, on cached backbone features when there is no augmentation (the backbone then runs
once, not every epoch). Stage 2 unfreezes the top of the backbone with BatchNorm kept in inference mode, rebuilds
the optimizer and trains at a low learning rate. Both stages run inside the recipe's `tf.distribute` strategy scope
(see `edgetl.training.distribute`); in a multi-worker cluster only the chief writes the run.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np

from edgetl.data import DatasetSplits, make_dataset
from edgetl.metrics import classification_metrics, head_metrics
from edgetl.recipe import Recipe
from edgetl.training.common import TrainerBase, TrainResult, describe_splits, open_run_dir, output_classes, start_run, write_run
from edgetl.training.distribute import (
    describe,
    is_chief,
    make_strategy,
    mixed_precision,
    replicas,
    scaled_learning_rate,
    worker_cache_dir,
)


def _verbose() -> int:
    return 1 if sys.stdout.isatty() else 2


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


def compile_model(model, learning_rate, label_smoothing: float, heads=()) -> None:
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


class Trainer(TrainerBase):
    """Holds the datasets and the classifier for one run; `stage1` and `stage2` train in place.

    Create and train it inside a `tf.distribute` strategy scope to distribute it (default: one device).
    """

    def __init__(self, recipe: Recipe, splits: DatasetSplits, echo=print):
        import tensorflow as tf

        super().__init__(recipe, splits, echo)
        strategy = tf.distribute.get_strategy()
        self.replicas = replicas(strategy)
        d = recipe.data
        common = dict(image_size=self.size, resize=d.resize, batch_size=d.batch_size, cache=d.cache,
                      cache_dir=worker_cache_dir(strategy))
        n = output_classes(splits)
        self.train_ds = _one_hot(make_dataset(splits.train, shuffle=True, seed=recipe.seed, augment=recipe.augment,
                                              targets=splits.targets(splits.train), **common), n)
        self.val_ds = _one_hot(make_dataset(splits.val, targets=splits.targets(splits.val), **common), n) \
            if splits.val else None
        self.test_ds = make_dataset(splits.test, **common)

    def to_float32(self) -> None:
        """Replace a mixed-precision classifier by a float32 one with the same weights (for saving)."""
        trained = self.clf
        self.clf = self._build_classifier(None)
        self.clf.model.set_weights(trained.model.get_weights())
        self.clf.weights_source, self.clf.warning = trained.weights_source, trained.warning

    def learning_rate(self, lr: float) -> float:
        """A recipe learning rate under `distribute.lr_scaling` for this trainer's replica count."""
        return scaled_learning_rate(lr, self.recipe.distribute, self.replicas)

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
        compile_model(model, rate, self.recipe.train.label_smoothing, self.recipe.model.heads)

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
        """Stage 1 on features: the backbone runs once over train and val, then the head trains on them.

        The features are batched as `train_ds` batches the images (same seeded shuffle, so the same batches as
        end to end), in datasets of unknown batch length, so that a short last batch traces nothing twice.
        """
        import tensorflow as tf

        t0 = time.perf_counter()
        feats = self.backbone_features({"train": self.splits.train, "val": self.splits.val})
        self.timings["feature_extraction_s"] = round(time.perf_counter() - t0, 2)
        self.echo(f"  backbone features for {len(feats['train'])} train + {len(feats.get('val', ()))} val images "
                  f"in {self.timings['feature_extraction_s']:.1f}s")
        batch = self.recipe.data.batch_size
        train = tf.data.Dataset.from_tensor_slices((feats["train"], self._one_hot_labels(self.splits.train)))
        train = train.shuffle(len(feats["train"]), seed=self.recipe.seed, reshuffle_each_iteration=True).batch(batch)
        val = tf.data.Dataset.from_tensor_slices((feats["val"], self._one_hot_labels(self.splits.val))).batch(batch) \
            if "val" in feats else None
        self._compile(self.clf.head, cfg, self._steps_per_epoch(len(feats["train"])))
        return self.clf.head.fit(train, epochs=cfg.epochs, validation_data=val, class_weight=self.class_weight,
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
    """A Keras history with plain floats (JSON-ready)."""
    return {k: [float(v) for v in vals] for k, vals in history.items()}


def train_supervised(recipe: Recipe, data_dir=None, run_dir: str | Path | None = None,
                     out_root: str | Path = "models", echo=print) -> TrainResult:
    """Train both stages and write the run directory; returns its path and test metrics."""
    t_start = time.perf_counter()
    strategy = make_strategy(recipe.distribute, echo)  # first: multi_worker must start before TF runs anything
    chief = is_chief(strategy)
    recipe, splits = start_run(recipe, data_dir)
    run = open_run_dir(recipe, run_dir, out_root, chief)
    echo(describe_splits(splits)
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
