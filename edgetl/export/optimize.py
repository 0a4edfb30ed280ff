"""Keras-level preparation for export: flattening, quantization-aware training (QAT) and pruning.

A transfer model nests its backbone as a Model inside the classifier, which tensorflow-model-optimization
refuses to quantize or prune, so `flatten_model` first rebuilds it as one functional graph with copied
weights (and `check_same_outputs` proves it computes the same thing). `quantize_aware` annotates every
layer the default 8-bit scheme supports and leaves the rest (preprocessing, hard-swish, ...) in float;
`prune` wraps the Conv2D/Dense kernels with a polynomial-decay magnitude-pruning schedule, each to its
share of the target (`layer_sparsities`), and `distill` fine-tunes it toward the float model.
The preparations the export stage runs (`prepare_flat`, `prepare_qat`, `prepare_pruning`) return
(Prepared model, report for the manifest's `preparation`). Nothing here converts to a file format.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Callable

import numpy as np

from edgetl.errors import EdgetlError

if TYPE_CHECKING:
    from edgetl.export.inputs import FinetuneData
    from edgetl.recipe import FinetuneConfig, PruningConfig

# Kernels `prune` sparsifies (tfmot's pruning registry leaves DepthwiseConv2D dense: it has few weights).
PRUNED_TYPES = ("Conv2D", "Dense")
# Layers whose directly following BatchNormalization tfmot's QAT layout transforms handle.
BN_PARENTS = ("Conv2D", "DepthwiseConv2D", "Dense")


class OptimizeError(EdgetlError, RuntimeError):
    """A model could not be prepared (flattening changed the outputs, nothing to quantize, ...)."""


@dataclass(frozen=True)
class Prepared:
    """A Keras model to convert, and what preparing it changed (copied into its artifacts' manifest entries)."""

    model: object  # keras.Model
    layers_left_float: list[str] = field(default_factory=list)  # layers QAT left in float
    sparsity: dict | None = None  # `sparsity_report` of a pruned model
    settings: dict = field(default_factory=dict)  # fine-tune settings, recorded under the artifact's quantization


# ---------------------------------------------------------------------------------------------------------
# The preparations of the export stage


def prepare_flat(model, images: np.ndarray) -> tuple[object, dict]:
    """(`model` as one functional graph, outputs checked equal on `images`, BatchNorm frozen; its report)."""
    t0 = time.perf_counter()
    flat = flatten_model(model)
    diff = check_same_outputs(model, flat, images)
    freeze_batchnorm(flat)
    return flat, {"layers": len(flat.layers), "max_abs_diff": diff, "seconds": round(time.perf_counter() - t0, 2)}


def prepare_qat(flat, calibration: np.ndarray, data: FinetuneData, cfg: FinetuneConfig,
                echo: Callable[[str], None] = print) -> tuple[Prepared, dict]:
    """(quantization-aware copy of `flat`, ranges calibrated, fine-tuned per `cfg`; its report)."""
    t0 = time.perf_counter()
    qat = quantize_aware(flat)
    ranges = calibrate_quantizers(qat.model, flat, calibration)
    echo(f"quantization-aware training: {cfg.epochs} epochs at lr {cfg.learning_rate:g}; "
         f"{len(qat.layers_left_float)} layers left float")
    history = finetune(qat.model, data.train, data.val, cfg.epochs, cfg.learning_rate)
    widened = floor_weight_ranges(qat.model)
    report = {"epochs": cfg.epochs, "learning_rate": cfg.learning_rate, "layers_left_float": qat.layers_left_float,
              "calibrated_ranges": ranges, "widened_weight_channels": widened, "history": history,
              "seconds": round(time.perf_counter() - t0, 2)}
    settings = {"finetune_epochs": cfg.epochs, "learning_rate": cfg.learning_rate}
    return Prepared(qat.model, qat.layers_left_float, settings=settings), report


def prepare_pruning(flat, data: FinetuneData, cfg: PruningConfig,
                    echo: Callable[[str], None] = print) -> tuple[Prepared, dict]:
    """(pruned copy of `flat`, fine-tuned per `cfg` and stripped of its wrappers; its report)."""
    import tensorflow_model_optimization as tfmot

    t0 = time.perf_counter()
    plan = PruningPlan.for_training(cfg.target_sparsity, data.steps_per_epoch, cfg.epochs)
    echo(f"pruning to {cfg.target_sparsity:.0%} sparsity ({cfg.allocation} allocation): {cfg.epochs} epochs "
         f"at lr {cfg.learning_rate:g}{', distilled from the float model' if cfg.distill else ''} "
         f"(target reached at step {plan.end_step})")
    model = prune(flat, plan, cfg.allocation)
    fit = partial(distill, teacher=flat) if cfg.distill else finetune
    history = fit(model, train_ds=data.train, val_ds=data.val, epochs=cfg.epochs, learning_rate=cfg.learning_rate,
                  callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    stripped = strip_pruning(model)
    sparsity = sparsity_report(stripped, cfg.target_sparsity)
    report = {"target_sparsity": cfg.target_sparsity, "allocation": cfg.allocation, "distill": cfg.distill,
              "epochs": cfg.epochs, "learning_rate": cfg.learning_rate, "end_step": plan.end_step,
              "frequency": plan.frequency, "achieved": sparsity["overall"], "history": history,
              "seconds": round(time.perf_counter() - t0, 2)}
    settings = {"target_sparsity": cfg.target_sparsity, "finetune_epochs": cfg.epochs,
                "learning_rate": cfg.learning_rate}
    return Prepared(stripped, sparsity=sparsity, settings=settings), report


# ---------------------------------------------------------------------------------------------------------
# Flattening


def flatten_model(model):
    """Rebuild a functional model with nested functional models inlined; fresh layers, identical weights.

    A frozen backbone is called with `training=False` to keep its BatchNorm in inference mode. The flat
    graph drops that argument, so fake-quant observers still see training batches during QAT, and
    `freeze_batchnorm` keeps BatchNorm in inference mode instead (a Keras 2 BatchNorm with
    trainable=False always normalizes with its moving statistics).
    """
    import tensorflow as tf
    import tf_keras as keras

    clones: dict = {}
    names: set[str] = set()

    def clone(layer, scope: str):
        if id(layer) not in clones:
            config = layer.get_config()
            config["name"] = layer.name if layer.name not in names else f"{scope}_{layer.name}"
            names.add(config["name"])
            clones[id(layer)] = (layer, layer.__class__.from_config(config))
        return clones[id(layer)][1]

    def replay(net, inputs):
        tensors = {id(t): x for t, x in zip(net.inputs, inputs)}

        def resolve(value):
            return tensors.get(id(value), value)

        for depth in sorted(net._nodes_by_depth, reverse=True):  # inputs first
            for node in net._nodes_by_depth[depth]:
                layer = node.layer
                if isinstance(layer, keras.layers.InputLayer):
                    continue
                args = tf.nest.map_structure(resolve, node.call_args)
                if _is_functional(layer):
                    outputs = replay(layer, tf.nest.flatten(args))
                else:
                    kwargs = tf.nest.map_structure(resolve, dict(node.call_kwargs))
                    outputs = clone(layer, net.name)(*args, **kwargs)
                for old, new in zip(tf.nest.flatten(node.outputs), tf.nest.flatten(outputs)):
                    tensors[id(old)] = new
        return [tensors[id(t)] for t in net.outputs]

    inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype, name=layer.name)
              for t, layer in zip(model.inputs, model._input_layers)]
    outputs = replay(model, inputs)
    flat = keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0], name=f"{model.name}_flat")
    for original, copy in clones.values():
        copy.set_weights(original.get_weights())
    return flat


def _is_functional(layer) -> bool:
    import tf_keras as keras

    return isinstance(layer, keras.Model) and getattr(layer, "_is_graph_network", False)


def check_same_outputs(reference, candidate, images: np.ndarray, atol: float = 1e-5) -> float:
    """Largest absolute output difference of two models on `images`; OptimizeError above `atol`."""
    a = np.asarray(reference(images, training=False))
    b = np.asarray(candidate(images, training=False))
    diff = float(np.max(np.abs(a - b))) if a.shape == b.shape else math.inf
    if diff > atol:
        raise OptimizeError(f"the rebuilt model {candidate.name!r} differs from {reference.name!r} by {diff:.3g} "
                            f"(allowed {atol:g}); refusing to quantize or prune it")
    return diff


def freeze_batchnorm(model) -> None:
    """BatchNorm layers keep their statistics while fine-tuning (as in training stage 2); the rest trains."""
    import tf_keras as keras

    for layer in model.layers:
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)


# ---------------------------------------------------------------------------------------------------------
# Quantization-aware training


def quantize_aware(flat_model) -> Prepared:
    """Annotate what tfmot's default 8-bit registry supports, leave the rest float, apply QAT wrappers.

    BatchNorm has no quantize config of its own; it is annotated when it directly follows a linear
    Conv2D/DepthwiseConv2D/Dense, the patterns tfmot's layout transforms fold. Depthwise kernels are
    fake-quantized per channel (see `_per_channel_scheme`). Start the result with `calibrate_quantizers`
    and end its fine-tune with `floor_weight_ranges`.
    """
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras

    quant = tfmot.quantization.keras
    registry = quant.default_8bit.Default8BitQuantizeRegistry()
    annotated = {layer.name for layer in flat_model.layers
                 if not isinstance(layer, keras.layers.InputLayer) and registry.supports(layer)}
    annotated |= {layer.name for layer in flat_model.layers if _foldable_batchnorm(layer, annotated)}
    left_float = [layer.name for layer in flat_model.layers
                  if layer.name not in annotated and not isinstance(layer, keras.layers.InputLayer)]
    if not annotated:
        raise OptimizeError(f"no layer of {flat_model.name!r} can be quantized by tensorflow-model-optimization")

    def annotate(layer):  # quantize_apply copies the model and its weights, so wrapping in place is safe
        return quant.quantize_annotate_layer(layer) if layer.name in annotated else layer

    marked = keras.models.clone_model(flat_model, clone_function=annotate)
    with quant.quantize_scope():
        qat = quant.quantize_apply(marked, _per_channel_scheme())
    return Prepared(qat, left_float)


def _foldable_batchnorm(layer, annotated: set[str]) -> bool:
    import tensorflow as tf
    import tf_keras as keras

    if not isinstance(layer, keras.layers.BatchNormalization) or len(layer.inbound_nodes) != 1:
        return False
    parents = tf.nest.flatten(layer.inbound_nodes[0].inbound_layers)
    if len(parents) != 1 or parents[0].name not in annotated:
        return False
    parent = parents[0]
    linear = getattr(parent, "activation", None) is keras.activations.linear
    return type(parent).__name__ in BN_PARENTS and linear and len(parent.outbound_nodes) == 1


def _per_channel_scheme():
    """tfmot's default 8-bit scheme, except that depthwise kernels are quantized per channel.

    tfmot quantizes DepthwiseConv2D kernels per tensor, but TFLite's int8 depthwise weights are per
    channel, and MobileNet depthwise channels differ in range by orders of magnitude: per-tensor
    fake quantization rounds the small channels to zero and the QAT model trains towards a broken net.
    """
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras

    quant = tfmot.quantization.keras

    class DepthwiseKernelQuantizer(quant.quantizers.Quantizer):
        """LastValueQuantizer per output channel of a (kh, kw, C, M) depthwise kernel."""

        def __init__(self):
            self._inner = quant.quantizers.LastValueQuantizer(num_bits=8, per_axis=True, symmetric=True,
                                                              narrow_range=True)

        def build(self, tensor_shape, name, layer):
            kh, kw, channels, multiplier = tensor_shape
            return self._inner.build(tf.TensorShape([kh, kw, 1, channels * multiplier]), name, layer)

        def __call__(self, inputs, training, weights, **kwargs):
            shape = tf.shape(inputs)
            per_output = tf.reshape(inputs, [shape[0], shape[1], 1, -1])  # output channel = c * M + m
            return tf.reshape(self._inner(per_output, training, weights, **kwargs), shape)

        def get_config(self):
            return {}

    class DepthwiseConfig(quant.QuantizeConfig):
        """tfmot's DepthwiseConv2D config with `DepthwiseKernelQuantizer` for the kernel."""

        def get_weights_and_quantizers(self, layer):
            return [(layer.depthwise_kernel, DepthwiseKernelQuantizer())]

        def get_activations_and_quantizers(self, layer):
            return [(layer.activation, quant.quantizers.MovingAverageQuantizer(
                num_bits=8, per_axis=False, symmetric=False, narrow_range=False))]

        def set_quantize_weights(self, layer, quantize_weights):
            layer.depthwise_kernel = quantize_weights[0]

        def set_quantize_activations(self, layer, quantize_activations):
            layer.activation = quantize_activations[0]

        def get_output_quantizers(self, layer):
            return []

        def get_config(self):
            return {}

    class Registry(quant.default_8bit.Default8BitQuantizeRegistry):
        def get_quantize_config(self, layer):
            if isinstance(layer, keras.layers.DepthwiseConv2D):
                return DepthwiseConfig()
            return super().get_quantize_config(layer)

    class Scheme(quant.default_8bit.Default8BitQuantizeScheme):
        def get_quantize_registry(self):
            return Registry()

    return Scheme()


_RANGE_KINDS = ("output", "post_activation", "pre_activation")  # tfmot's activation quantizer variables


def calibrate_quantizers(qat_model, flat_model, images: np.ndarray, batch_size: int = 8) -> int:
    """Start every quantizer at a range that fits: activations as observed on `images`, weights their own.

    tfmot starts all ranges at [-6, 6]. Weight ranges are set on the first training step, activation
    ranges follow an EMA with decay 0.999, so a fine-tune of a few dozen steps would keep ranges that
    waste half the int8 codes of a ReLU6 output and clip wider ones. Starting from observed min/max
    (as post-training calibration does) lets a short QAT fine-tune (or none) start from the right
    ranges. Returns the number of activation ranges set.
    """
    import tf_keras as keras

    targets = []  # (flat layer name, kind, min variable, max variable)
    for layer in qat_model.layers:
        inner = getattr(layer, "layer", None)
        if inner is None:
            continue
        found = {v.name.rsplit("/", 1)[-1].split(":")[0]: v for v in layer.non_trainable_weights}
        targets += [(inner.name, kind, found[f"{kind}_min"], found[f"{kind}_max"]) for kind in _RANGE_KINDS
                    if f"{kind}_min" in found and f"{kind}_max" in found]
    if not targets:
        return 0
    probes = {(name, kind): flat_model.get_layer(name).input if kind == "pre_activation"
              else flat_model.get_layer(name).output for name, kind, _, _ in targets}
    probe = keras.Model(flat_model.inputs, list(probes.values()))
    linear = {name: _linear_copy(flat_model.get_layer(name))
              for name, kind, _, _ in targets if kind == "pre_activation"}
    lo = {key: np.inf for key in probes}
    hi = {key: -np.inf for key in probes}
    for start in range(0, len(images), batch_size):
        values = probe(images[start:start + batch_size], training=False)
        for (name, kind), value in zip(probes, values if isinstance(values, list) else [values]):
            value = np.asarray(linear[name](value) if kind == "pre_activation" else value)
            lo[(name, kind)] = min(lo[(name, kind)], float(value.min()))
            hi[(name, kind)] = max(hi[(name, kind)], float(value.max()))
    qat_model(images[:batch_size], training=True)  # weight quantizers take their ranges from the weights
    for name, kind, min_var, max_var in targets:
        min_var.assign(min(lo[(name, kind)], 0.0))
        max_var.assign(max(hi[(name, kind)], 0.0))
    return len(targets)


def _linear_copy(layer):
    """`layer` with a linear activation and the same weights: its pre-activation output."""
    config = layer.get_config()
    config["activation"] = "linear"
    copy = layer.__class__.from_config(config)
    copy.build(layer.input_shape)
    copy.set_weights(layer.get_weights())
    return copy


def floor_weight_ranges(qat_model, floor: float = 1e-3) -> int:
    """Widen weight fake-quant ranges narrower than +-`floor`; returns how many channels were widened.

    TFLite stores biases as int32 with scale input_scale * weight_scale. A channel whose weights are all
    about zero (dead) but whose folded BatchNorm bias is not gets a tiny weight scale, and its bias
    overflows int32 and is clamped. The post-training quantizer widens such scales itself; from a QAT
    model it takes the fake-quant ranges as they are, hence this. Weights under `floor` round to zero.
    """
    widened = 0
    for layer in qat_model.layers:
        for var in layer.non_trainable_weights:
            base = var.name.rsplit("/", 1)[-1].split(":")[0]
            if base.endswith("kernel_max"):
                values = var.numpy()
                widened += int(np.sum(values < floor))
                var.assign(np.maximum(values, floor))
            elif base.endswith("kernel_min"):
                var.assign(np.minimum(var.numpy(), -floor))
    return widened


# ---------------------------------------------------------------------------------------------------------
# Pruning


@dataclass(frozen=True)
class PruningPlan:
    """Polynomial decay from 0 to `target` sparsity over `end_step` steps, a mask update every `frequency`."""

    target: float
    end_step: int
    frequency: int

    @classmethod
    def for_training(cls, target: float, steps_per_epoch: int, epochs: int) -> "PruningPlan":
        """Reach the target halfway through the fine-tune; the second half recovers accuracy."""
        total = max(1, steps_per_epoch * epochs)
        frequency = max(1, min(100, total // 20))
        end_step = max(frequency, (total // 2 // frequency) * frequency)
        return cls(target, end_step, frequency)


def layer_sparsities(model, target: float, allocation: str = "erk") -> dict[str, float]:
    """Final sparsity per prunable layer, `target` overall (weighted by kernel size).

    `erk` (Erdős-Rényi-Kernel, Evci et al. 2020, "Rigging the Lottery"): a layer's density is proportional
    to sum(kernel dims) / prod(kernel dims), so big late 1x1 convolutions lose most weights and small early
    layers stay dense. Flowers5 MobileNetV2 at 50 %, 2 label fine-tune epochs: uniform 62.5 % top-1 (as
    pruned_int8), erk 83.0 % (pruned float model).
    """
    kernels = {layer.name: layer.weights[0].shape for layer in model.layers if _prunable(layer)}
    if allocation == "uniform":
        return {name: target for name in kernels}
    size = {name: math.prod(shape) for name, shape in kernels.items()}
    score = {name: sum(shape) / size[name] for name, shape in kernels.items()}
    dense: set[str] = set()
    while True:  # layers whose density would exceed 1 stay dense; the rest share what is left
        keep = (1.0 - target) * sum(size.values()) - sum(size[n] for n in dense)
        eps = keep / sum(score[n] * size[n] for n in size if n not in dense)
        full = {n for n in size if n not in dense and eps * score[n] >= 1.0}
        if not full:
            break
        dense |= full
    return {n: 0.0 if n in dense else float(1.0 - eps * score[n]) for n in size}


def prune(flat_model, plan: PruningPlan, allocation: str = "erk"):
    """Wrap Conv2D and Dense with `prune_low_magnitude`, each to its `layer_sparsities` share of the target.

    Train with UpdatePruningStep. Layers allocated 0 stay unwrapped.
    """
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras

    sparsity = tfmot.sparsity.keras
    targets = layer_sparsities(flat_model, plan.target, allocation)

    wrapped = []

    def wrap(layer):
        if targets.get(layer.name, 0.0) <= 0.0:
            return layer
        schedule = sparsity.PolynomialDecay(initial_sparsity=0.0, final_sparsity=targets[layer.name], begin_step=0,
                                            end_step=plan.end_step, frequency=plan.frequency)
        wrapped.append(sparsity.prune_low_magnitude(layer, pruning_schedule=schedule))
        return wrapped[-1]

    # The wrappers train the layers they wrap, so wrap a copy: `flat_model` keeps its dense weights.
    copy = keras.models.clone_model(flat_model)
    copy.set_weights(flat_model.get_weights())
    pruned = keras.models.clone_model(copy, clone_function=wrap)
    # Layers before the first pruned one compute what they did: freezing them ends backpropagation there
    # (ERK leaves MobileNetV2's high-resolution blocks dense: 27-32 s an epoch at 224 px instead of 82 s).
    for layer in pruned.layers:
        if layer in wrapped:
            break
        layer.trainable = False
    return pruned


def _prunable(layer) -> bool:
    return type(layer).__name__ in PRUNED_TYPES


def strip_pruning(model):
    """The pruned model without its pruning wrappers (zeros stay in the kernels)."""
    import tensorflow_model_optimization as tfmot

    return tfmot.sparsity.keras.strip_pruning(model)


def sparsity_report(model, target: float | None = None) -> dict:
    """Fraction of zero weights per pruned kernel, overall across them, and across all weights."""
    layers, zeros, total = {}, 0, 0
    for layer in model.layers:
        if not _prunable(layer):
            continue
        kernel = np.asarray(layer.weights[0])
        n0 = int(np.sum(kernel == 0))
        layers[layer.name] = round(n0 / kernel.size, 4)
        zeros, total = zeros + n0, total + kernel.size
    all_zero = sum(int(np.sum(np.asarray(w) == 0)) for w in model.weights)
    all_total = sum(int(np.prod(w.shape)) for w in model.weights)
    return {"target": target, "overall": round(zeros / max(total, 1), 4),
            "all_weights": round(all_zero / max(all_total, 1), 4), "layers": layers}


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning


def distill(student, teacher, train_ds, val_ds, epochs: int, learning_rate: float, callbacks=(),
            verbose: int = 2) -> dict:
    """Fit `student` to `teacher`'s pooled features (mean squared error) and probabilities (cross-entropy).

    Labels are not used: the float model's pooled features say far more than a label about what pruning
    broke, which matters with a few hundred training images. Both models have the classifier's `pool` layer.
    """
    import tf_keras as keras

    from edgetl.backbones import POOL_LAYER

    def with_features(model):
        # get_output_at(-1): `prune` reuses unwrapped layers from a copy, whose graph is their first node.
        return keras.Model(model.inputs, [model.get_layer(POOL_LAYER).get_output_at(-1), *model.outputs])

    teacher2, student2 = with_features(teacher), with_features(student)

    def targets(ds):
        return None if ds is None else ds.map(lambda x, _: (x, tuple(teacher2(x, training=False))))

    features = teacher2.predict(train_ds.take(2), verbose=0)[0]
    feature_scale = float(np.mean(np.square(features))) or 1.0  # the feature loss starts near 1, like the other
    student2.compile(optimizer=keras.optimizers.Adam(learning_rate),
                     loss=[keras.losses.MeanSquaredError(), keras.losses.CategoricalCrossentropy()],
                     loss_weights=[1.0 / feature_scale, 1.0])
    history = student2.fit(targets(train_ds), validation_data=targets(val_ds), epochs=epochs,
                           callbacks=list(callbacks), verbose=verbose)
    return _plain_history(history)


def finetune(model, train_ds, val_ds, epochs: int, learning_rate: float, callbacks=(), verbose: int = 2) -> dict:
    """Compile with Adam + sparse categorical cross-entropy (integer labels) and fit; returns the history."""
    import tf_keras as keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    if epochs == 0:
        return {}
    history = model.fit(train_ds, validation_data=val_ds, epochs=epochs, callbacks=list(callbacks),
                        verbose=verbose)
    return _plain_history(history)


def _plain_history(history) -> dict:
    """A Keras History as {metric: [float per epoch]} (JSON-ready)."""
    return {k: [float(v) for v in values] for k, values in history.history.items()}
