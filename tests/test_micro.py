"""Microcontroller and NPU kit: measured TFLM arena, op check, TFLM vs LiteRT, resolver, header, RAM/flash, Vela."""
import json
import re
import shutil
import subprocess
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from edge_support import tiny_model, to_tflite, write_images

pytest.importorskip("tflite_micro", reason="tflite-micro (TFLM's Python interpreter) is not installed")

from edgetl.cli import cli  # noqa: E402
from edgetl.export import micro  # noqa: E402

TINY_OPS = ["CONV_2D", "MEAN", "FULLY_CONNECTED", "SOFTMAX"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny int8 model, one with a float-only ATAN2 inside its int8 graph, and an images folder."""
    root = tmp_path_factory.mktemp("micro")
    tiny = to_tflite(tiny_model(), root / "tiny.tflite", io_dtype="int8")
    (root / "labels.txt").write_text("blue\ngreen\nred\n", encoding="utf-8")  # the model's labels, as exports have
    return {"tiny": tiny, "atan2": _atan2_model(root / "atan2.tflite"), "images": write_images(root / "images")}


def _atan2_model(path):
    """Conv -> atan2 (no int8 kernel: the converter leaves it float between DEQUANTIZE and QUANTIZE) -> head."""
    import tensorflow as tf
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3)(keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs))
    x = keras.layers.Lambda(lambda t: tf.math.atan2(t, t + 2.0), name="angle")(x)
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    converter = tf.lite.TFLiteConverter.from_keras_model(keras.Model(inputs, outputs))
    rng = np.random.default_rng(0)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: (
        [rng.integers(0, 256, (1, 32, 32, 3)).astype(np.float32)] for _ in range(8))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        path.write_bytes(converter.convert())
    return path


def test_arena_search_finds_a_size_that_runs_and_smaller_ones_fail(models):
    data = models["tiny"].read_bytes()
    arena = micro.find_arena(data, margin=0.1)
    assert micro.allocates(data, arena.minimum_bytes)
    for smaller in (arena.minimum_bytes - micro.ARENA_ALIGNMENT, arena.minimum_bytes * 3 // 4, arena.minimum_bytes // 2):
        assert not micro.allocates(data, smaller), smaller
    assert arena.largest_failing_bytes == arena.minimum_bytes - micro.ARENA_ALIGNMENT
    # TFLM's own accounting agrees with the search, and the size to use carries the stated margin.
    assert 0 < arena.recorded["total"] <= arena.minimum_bytes
    assert arena.arena_bytes >= arena.minimum_bytes * 1.1 and arena.arena_bytes % micro.ARENA_ROUNDING == 0
    images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    assert micro.TflmRunner(data, arena.minimum_bytes).predict(images).shape == (3, 3)


def test_tflm_predicts_what_litert_predicts(models):
    images, labels, skipped = micro.load_image_folder(models["images"], ["blue", "green", "red"], 32)
    assert not skipped and len(images) == 9 and sorted(set(labels)) == [0, 1, 2]
    noise = np.random.default_rng(2).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    result = micro.tflm_check(models["tiny"], np.concatenate([images, noise]), np.concatenate([labels, [0] * 8]))
    comparison = result["comparison"]
    assert comparison["count"] == 17
    assert comparison["max_difference_steps"] <= 1.0  # same int8 arithmetic: at most one rounding step apart
    assert comparison["agreement"] == 1.0 and comparison["tflm_top1"] == comparison["litert_top1"]
    assert result["accuracy"] == result["litert_accuracy"]
    assert result["flash_bytes"] == models["tiny"].stat().st_size and result["ops"]["supported"]


def test_an_op_tflm_lacks_is_named_with_a_fix(models):
    data = models["atan2"].read_bytes()
    check = micro.check_ops(data)
    assert not check["supported"]
    (row,) = check["unsupported"]
    assert row["op"] == "ATAN2" and "angle" in row["where"]
    assert "Fix:" in row["fix"] and "float" in row["fix"]  # a float island in the int8 graph, said so
    assert {o["op"] for o in check["ops"]} >= {"ATAN2", "DEQUANTIZE", "QUANTIZE", "CONV_2D"}
    # The interpreter itself refuses it, and the error names the op and the fix.
    with pytest.raises(micro.MicroError, match=r"ATAN2 .*Fix:"):
        micro.find_arena(data)
    result = CliRunner().invoke(cli, ["embed", str(models["atan2"]), "--micro"])
    assert result.exit_code == 1 and "ATAN2" in result.output and "Fix:" in result.output


def test_resolver_snippet_lists_exactly_the_model_ops(models):
    ops = [use.name for use in micro.model_ops(models["tiny"].read_bytes())]
    assert ops == TINY_OPS
    snippet = micro.resolver_snippet(ops, "tiny")
    assert re.findall(r"resolver\.(Add\w+)\(\);", snippet) == ["AddConv2D", "AddMean", "AddFullyConnected", "AddSoftmax"]
    assert "constexpr int tiny_num_ops = 4;" in snippet and "MicroMutableOpResolver<tiny_num_ops>" in snippet
    assert "AllOpsResolver" not in snippet.split("\n", 2)[2]
    for op, method in [("DEPTHWISE_CONV_2D", "AddDepthwiseConv2D"), ("UNIDIRECTIONAL_SEQUENCE_LSTM",
                       "AddUnidirectionalSequenceLSTM"), ("BATCH_MATMUL", "AddBatchMatMul"), ("L2_NORMALIZATION",
                       "AddL2Normalization"), ("ethos-u", "AddEthosU"), ("RELU6", "AddRelu6"),
                       ("TFLite_Detection_PostProcess", "AddDetectionPostprocess")]:
        assert micro.resolver_method(op) == method and method[3:] in micro.TFLM_OPS


PROGRAM = r"""
#include "model.h"
static unsigned char arena[TINY_TENSOR_ARENA_SIZE];
int main(void) { return (sizeof(arena) == EXPECTED && tiny_len > 0) ? 0 : 1; }
"""


def test_embed_micro_writes_a_header_with_the_arena_that_compiles(models, tmp_path):
    header = tmp_path / "model.h"
    result = CliRunner().invoke(cli, ["embed", str(models["tiny"]), "--micro", "--c-header", str(header), "--name",
                                      "tiny", "--images", str(models["images"]), "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "model_report.json").read_text())
    arena = doc["micro"]["arena"]["arena_bytes"]
    assert f"#define TINY_TENSOR_ARENA_SIZE {arena}" in header.read_text()
    assert re.findall(r"resolver\.(Add\w+)", (tmp_path / "model_op_resolver.h").read_text()) == [
        micro.resolver_method(op) for op in TINY_OPS]
    memory = doc["micro"]["memory"]
    assert memory["total"] == {"ram": arena, "flash": models["tiny"].stat().st_size + micro.labels_bytes(
        ["blue", "green", "red"])}
    assert memory["fits"]["both"] and "verdict" in result.output and "fits" in result.output
    assert doc["micro"]["comparison"]["agreement"] == 1.0 and doc["micro"]["images"]["skipped"] == []
    assert doc["micro"]["accuracy"] == doc["micro"]["litert_accuracy"] is not None
    compilers = [c for c in ("gcc", "g++") if shutil.which(c)]
    if not compilers:
        pytest.skip("no C compiler (gcc/g++) installed")
    for compiler in compilers:
        language = "c++" if compiler == "g++" else "c"
        subprocess.run([compiler, "-fsyntax-only", "-x", language, str(header)], check=True, timeout=120)
        source = tmp_path / f"main_{language}.c"
        source.write_text(PROGRAM)
        binary = tmp_path / f"main_{language}"
        subprocess.run([compiler, "-x", language, f"-DEXPECTED={arena}", f"-I{tmp_path}", str(source), "-o",
                        str(binary)], check=True, timeout=120)
        assert subprocess.run([str(binary)], timeout=30).returncode == 0


def test_memory_table_says_when_it_does_not_fit():
    table = micro.memory_table(1_200_000, 600 * 1024, ["a", "bb"], flash_budget=1024 * 1024, ram_budget=512 * 1024)
    assert table["total"] == {"ram": 600 * 1024, "flash": 1_200_000 + (1 + 1 + 4) + (2 + 1 + 4)}  # NUL, pointer
    assert table["fits"] == {"ram": False, "flash": False, "both": False}
    text = micro.format_table(table)
    assert "DOES NOT FIT" in text and "ram over by 88.0 KiB" in text


def test_vela_compiles_the_tiny_model_and_reports_its_estimates(models, tmp_path):
    pytest.importorskip("ethosu.vela", reason="ethos-u-vela is not installed")
    from edgetl.export.vela import VelaError, format_vela, vela_report

    report = vela_report(models["tiny"], "ethos-u55-128", out_dir=tmp_path / "vela")
    assert report["accelerator"] == "Ethos_U55_128"
    assert report["sram_bytes"] > 0 and report["flash_bytes"] > 0
    assert report["cycles_total"] > 0 and report["inference_time_ms"] > 0
    assert report["cpu_ops"] == [] and report["npu_operators"] > 0
    assert (tmp_path / "vela" / "tiny_vela.tflite").is_file() and "not a measurement on a board" in format_vela(report)
    # The compiled model is the ethos-u custom op, which TFLM registers with AddEthosU.
    assert [use.name for use in micro.model_ops((tmp_path / "vela" / "tiny_vela.tflite").read_bytes())] == ["ethos-u"]
    fallback = vela_report(models["atan2"], "ethos-u55-128", out_dir=tmp_path / "vela2")
    assert "ATAN2" in [o["op"] for o in fallback["cpu_ops"]] and fallback["cpu_operators"] >= 1
    with pytest.raises(VelaError, match="ethos-u55-128"):
        vela_report(models["tiny"], "ethos-u99", out_dir=tmp_path / "vela3")


def test_cut_at_cuts_the_backbone_and_names_nearby_layers():
    from edgetl.backbones import BackboneError, build_classifier
    from edgetl.recipe import RecipeError, recipe_from_dict

    clf = build_classifier(3, "test_cnn", 32, weights=None, cut_at="block1_relu")
    assert clf.backbone.output_shape == (None, 16, 16, 8)
    assert clf.features.output_shape == (None, 8)
    assert [layer.name for layer in clf.backbone.layers][-1] == "block1_relu"
    with pytest.raises(BackboneError, match=r"model.cut_at.*'block1_rleu'.*block1_relu"):
        build_classifier(3, "test_cnn", 32, weights=None, cut_at="block1_rleu")
    assert recipe_from_dict({"model": {"cut_at": "block_13_expand_relu"}}).model.cut_at == "block_13_expand_relu"
    with pytest.raises(RecipeError, match="model.cut_at is empty"):
        recipe_from_dict({"model": {"cut_at": " "}})
