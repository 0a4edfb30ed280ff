"""Bias correction of int8 weights: the measured shifts are exact on a linear model, the artifact edits move exactly
the int8 layers' int32 biases, and export records them."""
from __future__ import annotations

import json

import numpy as np

from edgetl.export.bias_correction import correct_onnx, correct_tflite, layer_named, mean_shifts, round_weights


def linear_net(seed: int = 0):
    """image -> 3x3 conv (same padding, no bias) -> BatchNorm -> pool -> dense: linear, so the mean output of the
    model with rounded weights is a sum of each layer's mean error, which the correction must cancel exactly."""
    import tf_keras as keras

    keras.utils.set_random_seed(seed)
    image = keras.Input((6, 6, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(image)
    x = keras.layers.BatchNormalization(name="conv_bn")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(image, keras.layers.Dense(3, name="logits")(x))
    bn = model.get_layer("conv_bn")
    bn.set_weights([np.array([1.5, -0.5, 2.0, 0.7], np.float32), np.zeros(4, np.float32),
                    np.array([0.1, -0.2, 0.3, 0.0], np.float32), np.array([0.5, 2.0, 1.0, 4.0], np.float32)])
    return model


def with_rounded_weights(model, levels: int):
    """A copy of `model` with every conv / dense kernel rounded as a converter would after folding BatchNorm."""
    import tf_keras as keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for layer in copy.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            weights = layer.get_weights()
            bn = [n.outbound_layer for n in layer._outbound_nodes
                  if isinstance(n.outbound_layer, keras.layers.BatchNormalization)]
            scale = 1.0
            if bn:
                gamma, _, _, variance = bn[0].get_weights()
                scale = gamma / np.sqrt(variance + bn[0].epsilon)
            weights[0] = round_weights(weights[0] * scale, levels, per_channel=True) / scale
            layer.set_weights(weights)
    return copy


def test_round_weights_is_symmetric_per_channel_or_per_tensor():
    w = np.array([[1.0, -0.01], [-0.5, 0.02], [0.26, 0.006]], np.float32)  # (in, out): channel peaks 1.0, 0.02
    per_channel = round_weights(w, 2, per_channel=True)
    np.testing.assert_allclose(per_channel[:, 0], [1.0, -0.5, 0.5])
    np.testing.assert_allclose(per_channel[:, 1], [-0.01, 0.02, 0.01])
    np.testing.assert_allclose(round_weights(w, 2, per_channel=False)[:, 1], [0.0, 0.0, 0.0])


def with_shifts_subtracted(model, shifts):
    """A copy of `model` with each shift taken from the BatchNorm beta after its layer (or from its own bias)."""
    import tf_keras as keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for name, shift in shifts.items():
        layer = copy.get_layer(name)
        after = [n.outbound_layer for n in layer._outbound_nodes]
        target = after[0] if after and isinstance(after[0], keras.layers.BatchNormalization) else layer
        variable = target.beta if target is not layer else layer.bias
        variable.assign(variable.numpy() - shift)
    return copy


def test_shifts_cancel_the_mean_output_error_of_rounded_weights_exactly():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1.0, 3.0, (24, 6, 6, 3)).astype(np.float32)  # mean far from 0: the errors do not average out
    model = linear_net()
    before = [w.copy() for w in model.get_weights()]
    reference = model.predict(images, verbose=0).mean(axis=0)
    plain = with_rounded_weights(model, levels=3).predict(images, verbose=0).mean(axis=0)
    shifts, report = mean_shifts(model, images, levels=3, per_channel=True, batch=5)
    fixed = with_rounded_weights(with_shifts_subtracted(model, shifts), levels=3).predict(images, verbose=0).mean(axis=0)
    assert np.abs(plain - reference).max() > 1e-2  # coarse rounding moves the mean
    np.testing.assert_allclose(fixed, reference, atol=1e-4)
    assert sorted(shifts) == ["conv", "logits"] and report["layers"] == 2 and report["images"] == 24
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # the caller's model is untouched


def test_layer_names_are_found_in_fused_converter_names():
    shifts = {"Conv1": 0, "block_1_project": 0}
    assert layer_named("m/bb/Conv1_relu/Relu6;m/bb/bn_Conv1/FusedBatchNormV3;m/bb/Conv1/Conv2D", shifts) == "Conv1"
    assert layer_named("m_flat/block_1_project/Conv2D", shifts) == "block_1_project"
    assert layer_named("m/bb/Conv1/Conv2D;m/bb/block_1_project/Conv2D", shifts) is None  # ambiguous: left alone
    assert layer_named("m/bb/Conv1_relu/Relu6", shifts) is None


def int32_biases(path) -> dict[str, np.ndarray]:
    """{bias tensor name: int32 values} of a .tflite file."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    return {d["name"]: interpreter.get_tensor(d["index"]).copy() for d in interpreter.get_tensor_details()
            if d["dtype"] == np.int32 and len(d["shape"]) == 1 and d["shape"][0] > 0}


def test_tflite_edit_moves_each_int8_layer_bias_by_its_shift_in_its_own_scale(tiny_export, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    source = tiny_export.run_dir / "exports" / "tflite-int8.tflite"
    interpreter = Interpreter(model_path=str(source))
    details = {d["name"]: d for d in interpreter.get_tensor_details()}
    bias_name = next(n for n in details if "predictions" in n and details[n]["dtype"] == np.int32)
    bias_scale = details[bias_name]["quantization_parameters"]["scales"]
    shift = np.arange(1, len(bias_scale) + 1) * 100 * bias_scale  # 100, 200, ... steps of the bias's own scale
    data, layers = correct_tflite(source.read_bytes(), {"predictions": shift})
    assert layers == ["predictions"] and len(data) == source.stat().st_size
    (tmp_path / "m.tflite").write_bytes(data)
    before, after = int32_biases(source), int32_biases(tmp_path / "m.tflite")
    np.testing.assert_array_equal(before[bias_name] - after[bias_name], np.arange(1, len(bias_scale) + 1) * 100)
    assert all(np.array_equal(before[n], after[n]) for n in before if n != bias_name)


def test_onnx_edit_moves_int8_biases_and_skips_layers_without_int8_weights(tiny_export):
    import onnx
    from onnx import numpy_helper

    from edgetl.rundir import load_keras_model

    source = (tiny_export.run_dir / "exports" / "onnx-int8.onnx").read_bytes()
    proto = onnx.load_from_string(source)
    model = load_keras_model(tiny_export.run_dir / "model.keras")
    measured, _ = mean_shifts(model, np.zeros((2, *model.input_shape[1:]), np.float32), 127, True)
    shifts = {name: np.full(1, 0.5, np.float32) for name in measured}  # a move that is easy to check
    data, layers = correct_onnx(source, shifts)
    assert len(layers) >= 2 and set(layers) <= set(shifts)
    moved = {t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(data).graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    changed = [n for n in original if not np.array_equal(original[n], moved[n])]
    assert len(changed) == len(layers) and all(original[n].dtype == np.int32 for n in changed)
    for name in changed:
        scale = original[name.replace("_quantized", "_quantized_scale")]
        np.testing.assert_array_equal(original[name] - moved[name], np.round(0.5 / scale).astype(np.int32))


def test_export_records_the_correction_on_int8_rows_only(tiny_export):
    manifest = json.loads((tiny_export.run_dir / "exports" / "manifest.json").read_text())
    found = {a["name"]: a for a in manifest["artifacts"]}
    tflite, onnx_int8 = found["tflite-int8"]["quantization"], found["onnx-int8"]["quantization"]
    assert tflite["bias_correction"]["layers"] >= 2 and tflite["bias_correction"]["of"] >= tflite["bias_correction"]["layers"]
    assert onnx_int8["bias_correction"]["layers"] >= 2
    assert "bias_correction" not in found["tflite-fp32"]["quantization"]
    assert "bias_correction" not in found["tflite-qat_int8"]["quantization"]
    assert manifest["preparation"]["bias_correction_tflite"]["levels"] == 127
