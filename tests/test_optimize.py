"""Model preparation helpers: pruning schedule and allocation, distillation, flattening check, quantizer ranges."""
from __future__ import annotations

import numpy as np
import pytest

from edgetl.export import optimize as opt


def tiny(seed: int, nested: bool = False):
    import tf_keras as keras

    keras.utils.set_random_seed(seed)
    image = keras.Input((8, 8, 3), name="image")
    if nested:
        inner_in = keras.Input((8, 8, 3))
        inner = keras.Model(inner_in, keras.layers.Conv2D(4, 3, name="conv")(inner_in), name="inner")
        x = inner(image, training=False)
    else:
        x = keras.layers.Conv2D(4, 3, name="conv")(image)
    x = keras.layers.ReLU(6.0, name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(image, keras.layers.Dense(2, activation="softmax", name="predictions")(x))


def test_pruning_plan_reaches_the_target_on_a_mask_update_step():
    plan = opt.PruningPlan.for_training(0.5, steps_per_epoch=13, epochs=2)
    assert plan.end_step % plan.frequency == 0 and plan.end_step <= 26 * 0.5
    short = opt.PruningPlan.for_training(0.75, steps_per_epoch=1, epochs=1)
    assert (short.end_step, short.frequency) == (1, 1)
    long = opt.PruningPlan.for_training(0.5, steps_per_epoch=1000, epochs=10)
    assert long.frequency == 100 and long.end_step == 5000


def sized(widths=(4, 16, 64)):
    """Conv stack of growing 1x1 layers (conv_4, conv_16, ...) -> pool -> 2-way softmax."""
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    image = keras.Input((8, 8, 3), name="image")
    x = image
    for w in widths:
        x = keras.layers.Conv2D(w, 1, activation="relu", name=f"conv_{w}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(image, keras.layers.Dense(2, activation="softmax", name="predictions")(x))


def test_erk_allocation_meets_the_target_overall_and_prunes_big_layers_harder():
    model = sized()
    sizes = {"conv_4": 12, "conv_16": 64, "conv_64": 1024, "predictions": 128}
    erk = opt.layer_sparsities(model, 0.8, "erk")
    assert set(erk) == set(sizes)
    zeros = sum(erk[n] * sizes[n] for n in sizes)
    assert zeros / sum(sizes.values()) == pytest.approx(0.8)
    assert erk["conv_4"] == 0.0  # its density would exceed 1: kept dense, the others carry the target
    assert erk["conv_64"] > erk["conv_16"] > erk["predictions"] > 0.0
    assert opt.layer_sparsities(model, 0.5, "uniform") == {n: 0.5 for n in sizes}


def test_distill_pulls_the_pruned_student_toward_the_teacher():
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras

    teacher = sized()
    student = opt.prune(teacher, opt.PruningPlan(0.8, end_step=1, frequency=1))
    # erk at 80 % keeps conv_4 dense (see above): it and the input ahead of the first pruned layer are frozen
    assert [layer.name for layer in student.layers if not layer.trainable] == ["image", "conv_4"]
    images = np.random.default_rng(0).uniform(0, 1, (32, 8, 8, 3)).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((images, np.zeros(32, np.int32))).batch(8)

    def gap():  # mean absolute difference of the pooled features (an eager call: predict would trace a function)
        pooled = [np.asarray(keras.Model(m.inputs, m.get_layer("pool").get_output_at(-1))(images, training=False))
                  for m in (student, teacher)]
        return float(np.abs(pooled[0] - pooled[1]).mean())

    opt.distill(student, teacher, ds, None, epochs=1, learning_rate=1e-9,  # sets the masks, barely trains
                callbacks=[tfmot.sparsity.keras.UpdatePruningStep()], verbose=0)
    before = gap()
    # One epoch of 30 passes: the same 120 steps as 30 epochs (same result), without Keras's per-epoch overhead.
    history = opt.distill(student, teacher, ds.repeat(30), None, epochs=1, learning_rate=3e-3,
                          callbacks=[tfmot.sparsity.keras.UpdatePruningStep()], verbose=0)
    assert set(history) == {"loss", "pool_loss", "prune_low_magnitude_predictions_loss"}  # one per target
    assert before > 0.0 and gap() < 0.75 * before  # deterministic (seeded): 0.023 -> 0.015
    assert opt.sparsity_report(opt.strip_pruning(student), 0.8)["overall"] == pytest.approx(0.8, abs=0.01)


def test_check_same_outputs_refuses_a_different_model():
    images = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    nested = tiny(0, nested=True)
    flat, report = opt.prepare_flat(nested, images)
    assert [layer.name for layer in flat.layers] == ["image", "conv", "relu", "pool", "predictions"]
    assert (report["layers"], report["max_abs_diff"]) == (5, 0.0) and report["seconds"] >= 0
    assert opt.check_same_outputs(nested, flat, images) == 0.0
    with pytest.raises(opt.OptimizeError, match="differs"):
        opt.check_same_outputs(nested, tiny(1), images)


def test_calibrate_quantizers_starts_ranges_at_the_observed_values_and_dead_channels_are_widened():
    import tf_keras as keras

    model = tiny(0)
    kernel, bias = model.get_layer("predictions").get_weights()
    model.get_layer("predictions").set_weights([np.zeros_like(kernel), bias + 1.0])  # dead weights, live bias
    images = np.random.default_rng(0).uniform(0, 255, (4, 8, 8, 3)).astype(np.float32)
    qat = opt.quantize_aware(model)
    assert qat.layers_left_float == []
    assert opt.calibrate_quantizers(qat.model, model, images) == 3  # relu, pool, logits
    relu = qat.model.get_layer("quant_relu")
    ranges = {w.name.rsplit("/", 1)[-1].split(":")[0]: float(w.numpy()) for w in relu.non_trainable_weights}
    observed = keras.Model(model.inputs, model.get_layer("relu").output)(images).numpy()
    assert ranges["output_min"] == 0.0 and ranges["output_max"] == pytest.approx(observed.max(), rel=1e-5)
    dense = qat.model.get_layer("quant_predictions")
    assert opt.floor_weight_ranges(qat.model) == 1  # Dense kernels have one (per-tensor) range
    ranges = {w.name.rsplit("/", 1)[-1].split(":")[0]: float(w.numpy()) for w in dense.non_trainable_weights}
    assert ranges["kernel_min"] == pytest.approx(-1e-3) and ranges["kernel_max"] == pytest.approx(1e-3)
