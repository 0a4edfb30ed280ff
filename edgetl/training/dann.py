"""Unsupervised domain adaptation: domain-adversarial training (DANN, Ganin & Lempitsky 2015).

When deployment images differ from the labeled ones (camera, lighting, sensor), a domain classifier
learns to tell source from unlabeled target features while a gradient-reversal layer (GRL) trains the
features to fool it, so the class decision cannot lean on what differs between the domains. Here the
backbone stays frozen and its pooled features are computed once; the adaptable part is a bottleneck
Dense layer between pooling and classifier. The exported model is the plain classifier (one output).
A source-only baseline with the same architecture, seed and budget (domain loss weight 0) is trained
in the same call, so the target accuracy gain is measured, not assumed.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras as keras

from edgetl.backbones import POOL_LAYER
from edgetl.data import DatasetError, Sample, Skipped, check_image, scan_class_folders
from edgetl.edge.images import is_image_file
from edgetl.metrics import classification_metrics
from edgetl.recipe import Recipe, RecipeError
from edgetl.training.common import TrainerBase, TrainResult, describe_splits, open_run_dir, start_run, write_run
from edgetl.training.distribute import describe


def reverse_gradient(x, coefficient):
    """Identity on the way forward; the gradient is multiplied by -coefficient on the way back."""
    coef = tf.cast(tf.convert_to_tensor(coefficient), x.dtype)

    @tf.custom_gradient
    def _reverse(t):
        def grad(dy):
            return -coef * dy

        return tf.identity(t), grad

    return _reverse(x)


class GradientReversal(keras.layers.Layer):
    """Gradient-reversal layer; `coefficient` is a variable, so ramping it never retraces a tf.function."""

    def __init__(self, coefficient: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.coefficient = self.add_weight(name="coefficient", shape=(), trainable=False,
                                           initializer=keras.initializers.Constant(coefficient))

    def call(self, inputs):
        return reverse_gradient(inputs, self.coefficient)

    def get_config(self) -> dict:
        return {**super().get_config(), "coefficient": float(self.coefficient.numpy())}


def grl_coefficient(progress: float, grl_max: float = 1.0) -> float:
    """Ganin & Lempitsky's ramp, 2/(1+exp(-10p))-1 scaled to grl_max: 0 at the start, ~grl_max at the end."""
    return grl_max * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0)


def annealed_learning_rate(initial: float, progress: float) -> float:
    """Ganin & Lempitsky's decay, lr0/(1+10p)^0.75: the adversarial game settles instead of oscillating."""
    return initial / (1.0 + 10.0 * progress) ** 0.75


@dataclass
class DannHead:
    """The trainable part on pooled features: `classifier` (features -> probabilities) shares its
    bottleneck with the domain branch behind the GRL, which exists only during training."""

    classifier: object  # keras.Model, features -> class probabilities
    trainer: object  # keras.Model, features -> [class probabilities, domain logit]
    grl: GradientReversal
    history: dict


def build_dann_head(feature_dim: int, num_classes: int, recipe: Recipe) -> DannHead:
    """features -> dropout -> bottleneck (ReLU) -> softmax, plus bottleneck -> GRL -> MLP -> domain logit."""
    L, cfg, seed = keras.layers, recipe.adapt, recipe.seed

    def init(offset: int):
        return keras.initializers.GlorotUniform(seed=seed + offset)

    feats = keras.Input((feature_dim,), name="features")
    z = L.Dropout(recipe.model.dropout, seed=seed, name="dropout")(feats)
    z = L.Dense(cfg.bottleneck_units, activation="relu", kernel_initializer=init(0), name="bottleneck")(z)
    probs = L.Dense(num_classes, activation="softmax", kernel_initializer=init(1), name="predictions")(z)
    grl = GradientReversal(0.0, name="grl")
    d = grl(z)
    for i in range(2):
        d = L.Dense(cfg.domain_hidden_units, activation="relu", kernel_initializer=init(2 + i), name=f"domain_{i}")(d)
    logit = L.Dense(1, kernel_initializer=init(4), name="domain_logit")(d)
    return DannHead(keras.Model(feats, probs, name="head"), keras.Model(feats, [probs, logit], name="dann_head"),
                    grl, {})


def fit_dann_head(recipe: Recipe, source, labels, target, num_classes: int, domain_loss_weight: float,
                  val=None, class_weight: dict | None = None, echo=print) -> DannHead:
    """Train a DANN head on pooled features for `recipe.train.stage1.epochs` epochs.

    Each step takes a batch of labeled source features and as many unlabeled target features: the
    class loss uses the source labels only; the domain loss asks for 0 on source and 1 on target.
    `domain_loss_weight` 0 gives the source-only baseline with the same batches and budget.
    """
    cfg, stage = recipe.adapt, recipe.train.stage1
    source, target = np.asarray(source, np.float32), np.asarray(target, np.float32)
    head = build_dann_head(source.shape[1], num_classes, recipe)
    optimizer = keras.optimizers.Adam(stage.learning_rate)
    optimizer.build(head.trainer.trainable_variables)  # slots exist before `step` is traced: it is traced once
    class_loss_fn = keras.losses.CategoricalCrossentropy(label_smoothing=recipe.train.label_smoothing,
                                                         reduction="none")
    domain_loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)
    weights_of = np.ones(num_classes, np.float32)
    if class_weight:
        weights_of[list(class_weight)] = list(class_weight.values())
    weight = tf.constant(domain_loss_weight, tf.float32)
    spec = tf.TensorSpec((None, source.shape[1]), tf.float32)

    @tf.function(input_signature=[spec, tf.TensorSpec((None,), tf.int32), spec])
    def step(xs, ys, xt):
        ns = tf.shape(xs)[0]
        domains = tf.concat([tf.zeros((ns, 1)), tf.ones((tf.shape(xt)[0], 1))], axis=0)
        with tf.GradientTape() as tape:
            probs, logits = head.trainer(tf.concat([xs, xt], axis=0), training=True)
            per_sample = class_loss_fn(tf.one_hot(ys, num_classes), probs[:ns])
            class_loss = tf.reduce_mean(per_sample * tf.gather(weights_of, ys))
            domain_loss = domain_loss_fn(domains, logits)
            loss = class_loss + weight * domain_loss
        variables = head.trainer.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(probs[:ns], 1, output_type=tf.int32), ys), tf.float32))
        domain_accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.cast(logits > 0, tf.float32), domains), tf.float32))
        return class_loss, accuracy, domain_loss, domain_accuracy

    rng = np.random.default_rng(recipe.seed)
    batch = recipe.data.batch_size
    steps = math.ceil(len(source) / batch)
    total = max(stage.epochs * steps, 1)
    target_order, t_pos = rng.permutation(len(target)), 0
    history: dict[str, list[float]] = {}
    for epoch in range(stage.epochs):
        order, sums = rng.permutation(len(source)), np.zeros(4)
        for s in range(steps):
            progress = (epoch * steps + s) / total
            head.grl.coefficient.assign(grl_coefficient(progress, cfg.grl_max))
            optimizer.learning_rate.assign(annealed_learning_rate(stage.learning_rate, progress))
            idx = order[s * batch:(s + 1) * batch]
            if t_pos + len(idx) > len(target_order):
                target_order, t_pos = rng.permutation(len(target)), 0
            t_idx = target_order[t_pos:t_pos + len(idx)]
            t_pos += len(idx)
            out = step(source[idx], labels[idx].astype(np.int32), target[t_idx])
            sums += np.array([float(v) for v in out]) * len(idx)
        row = dict(zip(("loss", "accuracy", "domain_loss", "domain_accuracy"), sums / len(source)))
        row["grl_coefficient"] = float(head.grl.coefficient.numpy())
        if val is not None:
            probs = head.classifier(val[0], training=False).numpy()  # a few small matmuls: no predict loop to trace
            row["val_loss"] = float(keras.losses.categorical_crossentropy(
                keras.utils.to_categorical(val[1], num_classes), probs).numpy().mean())
            row["val_accuracy"] = float(np.mean(np.argmax(probs, 1) == val[1]))
        for key, value in row.items():
            history.setdefault(key, []).append(float(value))
        echo(f"  epoch {epoch + 1}/{stage.epochs}: class loss {row['loss']:.3f}, acc {row['accuracy']:.3f}"
             + (f", domain loss {row['domain_loss']:.3f}, domain acc {row['domain_accuracy']:.3f}, "
                f"GRL {row['grl_coefficient']:.2f}" if domain_loss_weight else "")
             + (f", val acc {row['val_accuracy']:.3f}" if val is not None else ""))
    head.history = history
    return head


def assemble_classifier(clf, head):
    """image -> baked preprocessing -> frozen backbone -> pooling -> head: one functional model, one output."""
    image = keras.Input(clf.model.input_shape[1:], name="image")
    x = image
    for layer in clf.model.layers[1:]:
        x = layer(x, training=False) if layer is clf.backbone else layer(x)
        if layer.name == POOL_LAYER:
            break
    for layer in head.layers[1:]:
        x = layer(x)
    return keras.Model(image, x, name=clf.model.name.replace("_classifier", "_dann_classifier"))


def target_samples(folder: str | os.PathLike) -> tuple[list[Sample], list[Skipped]]:
    """The readable images anywhere under `folder` (unlabeled target domain; label 0 is a placeholder)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DatasetError(f"adapt.target_data: {root} is not a folder. Point it at the unlabeled images from "
                           f"the deployment camera (searched recursively)")
    paths = sorted(str(p) for p in root.rglob("*") if p.is_file() and is_image_file(p))
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        errors = list(pool.map(check_image, paths))
    good = [Sample(p, 0) for p, err in zip(paths, errors) if err is None]
    if not good:
        raise DatasetError(f"adapt.target_data: no readable images under {root} "
                           f"(expected .jpg .jpeg .png .bmp .gif files)")
    return good, [Skipped(p, err) for p, err in zip(paths, errors) if err is not None]


class DannTrainer(TrainerBase):
    """The recipe's classifier with DANN as its one training stage, on backbone features computed once, plus the
    source-only baseline. No augmented or per-epoch input pipelines: every image passes the backbone once."""

    def __init__(self, recipe: Recipe, splits, target: list[Sample], target_test: list[Sample], echo=print):
        super().__init__(recipe, splits, echo)
        self.target, self.target_test = target, target_test
        self.heads: dict[str, DannHead] = {}
        self.feats: dict[str, np.ndarray] = {}

    def use_feature_cache(self) -> bool:
        return True

    def adapt(self) -> None:
        """Cache features once, then train the source-only baseline and DANN heads with the same budget.

        Both heads start from the same seeded initializers and see the same seeded batches, so the global seed
        (set once for the run) needs no reset between them.
        """
        t0 = time.perf_counter()
        self.feats = self.backbone_features({"train": self.splits.train, "val": self.splits.val,
                                             "test": self.splits.test, "target": self.target,
                                             "target_test": self.target_test})
        self.timings["feature_extraction_s"] = round(time.perf_counter() - t0, 2)
        self.echo(f"  backbone features for {sum(len(f) for f in self.feats.values())} images "
                  f"in {self.timings['feature_extraction_s']:.1f}s")
        labels = np.array([s.label for s in self.splits.train])
        val = (self.feats["val"], np.array([s.label for s in self.splits.val])) if self.splits.val else None
        n, epochs = self.splits.num_classes, self.recipe.train.stage1.epochs
        for name, weight in (("source_only", 0.0), ("dann", self.recipe.adapt.domain_loss_weight)):
            t1 = time.perf_counter()
            self.echo(f"{'DANN' if name == 'dann' else 'source-only baseline'}: {epochs} epochs, "
                      f"domain loss weight {weight:g}")
            self.heads[name] = fit_dann_head(self.recipe, self.feats["train"], labels, self.feats["target"], n,
                                             weight, val, self.class_weight, self.echo)
            self.timings[f"{name}_s"] = round(time.perf_counter() - t1, 2)
        self.clf = dataclasses.replace(self.clf, model=assemble_classifier(self.clf, self.heads["dann"].classifier),
                                       head=self.heads["dann"].classifier)
        self.history = {"stage1": self.heads["dann"].history, "source_only": self.heads["source_only"].history}

    def evaluate_head(self, name: str, group: str, samples: list[Sample]) -> dict:
        """Metrics of a trained head on cached features of `group`."""
        probs = self.heads[name].classifier(self.feats[group], training=False).numpy()
        return classification_metrics(np.array([s.label for s in samples]), probs, self.splits.class_names)


def train_dann(recipe: Recipe, data_dir=None, run_dir: str | Path | None = None, out_root: str | Path = "models",
               echo=print) -> TrainResult:
    """Domain-adversarial training towards `recipe.adapt.target_data`; writes a normal run directory.

    metrics.json gets an `adapt` section: source and target test top-1 of DANN and of the source-only
    baseline (same epochs = train.stage1.epochs, same seed). Stage 2 fine-tuning and augmentation do
    not apply here (the backbone is frozen and its features are computed once).
    """
    cfg = recipe.adapt
    if not cfg.target_data:
        raise RecipeError("adapt.target_data is not set: name a folder of unlabeled deployment images")
    t_start = time.perf_counter()
    recipe, splits = start_run(recipe, data_dir)
    target, target_skipped = target_samples(cfg.target_data)
    target_test, test_skipped = [], []
    if cfg.target_test:
        root = Path(cfg.target_test).expanduser()
        if not root.is_dir():
            raise DatasetError(f"adapt.target_test: {root} is not a folder of class folders")
        target_test, test_skipped = scan_class_folders(root, splits.class_names, strict_classes=True)
        if not target_test:
            raise DatasetError(f"adapt.target_test: no readable images in class folders of {root} "
                               f"(classes: {', '.join(splits.class_names)})")
    splits.skipped += target_skipped + test_skipped
    run = open_run_dir(recipe, run_dir, out_root)
    echo(f"{describe_splits(splits)}; target domain: {len(target)} unlabeled images"
         + (f", {len(target_test)} labeled target test images" if target_test else ""))
    for note in _ignored_settings(recipe, target, target_test):
        echo(f"  note: {note}")
    trainer = DannTrainer(recipe, splits, target, target_test, echo)
    echo(f"model: {recipe.model.backbone} at {trainer.size}px, weights: {trainer.clf.weights_source}, "
         f"frozen; bottleneck {cfg.bottleneck_units}, domain classifier 2x{cfg.domain_hidden_units}")
    trainer.adapt()

    result = {name: {"source_test": trainer.evaluate_head(name, "test", splits.test)} for name in trainer.heads}
    if target_test:
        for name in trainer.heads:
            result[name]["target_test"] = trainer.evaluate_head(name, "target_test", target_test)
    final = result["dann"]["source_test"]
    adapt = {"method": "dann", "epochs": recipe.train.stage1.epochs, "target_data": str(cfg.target_data),
             "target_images": len(target), "target_test": cfg.target_test, "target_test_images": len(target_test),
             **{name: {f"{split}_{k}": m[k] for split, m in r.items() for k in ("top1", "top5")}
                for name, r in result.items()}}
    if target_test:
        adapt["target_gain_pp"] = round(100 * (adapt["dann"]["target_test_top1"]
                                               - adapt["source_only"]["target_test_top1"]), 2)
        adapt["target_test_metrics"] = result["dann"]["target_test"]
    for name, label in (("source_only", "source-only"), ("dann", "DANN")):
        echo(f"  {label}: source test top-1 {adapt[name]['source_test_top1']:.2%}"
             + (f", target test top-1 {adapt[name]['target_test_top1']:.2%}" if target_test else ""))
    metrics = {"test": final, "stages": {"stage1": {"top1": final["top1"], "top5": final["top5"]}},
               "weights_source": trainer.clf.weights_source, "adapt": adapt}
    if trainer.clf.warning:
        metrics["warning"] = trainer.clf.warning
    distribute = {**describe(tf.distribute.get_strategy()), "lr_scaling": "none", "mixed_precision": False}
    write_run(run, recipe, splits, trainer, metrics, distribute, time.perf_counter() - t_start)
    if target_test:
        from edgetl.plots import plot_confusion_matrix

        plot_confusion_matrix(adapt["target_test_metrics"]["confusion_matrix"], splits.class_names,
                              run.path / "target_confusion_matrix.png",
                              title=f"{recipe.name}: target test, DANN (top-1 {adapt['dann']['target_test_top1']:.1%})")
    return TrainResult(run.path, metrics, trainer.clf.warning)


def _ignored_settings(recipe: Recipe, target: list[Sample], target_test: list[Sample]) -> list[str]:
    """What the recipe asks for that DANN on a frozen backbone does not do, said up front."""
    notes = []
    if recipe.train.stage2.epochs:
        notes.append(f"train.stage2 ({recipe.train.stage2.epochs} epochs) is not run: fine-tuning on source "
                     f"labels alone would undo the adaptation; the backbone stays frozen")
    if recipe.augment.enabled:
        notes.append("augment is not applied: backbone features are computed once")
    d = recipe.distribute
    if d.strategy in ("mirrored", "multi_worker") or d.mixed_precision:
        notes.append("distribute settings are not used: the DANN head trains on cached features, on one device")
    if recipe.model.hidden_units:
        notes.append("model.hidden_units is replaced by adapt.bottleneck_units")
    overlap = {s.path for s in target} & {s.path for s in target_test}
    if overlap:
        notes.append(f"{len(overlap)} adapt.target_test images are also in adapt.target_data (their labels are "
                     f"never used, but the target accuracy is then transductive)")
    return notes
