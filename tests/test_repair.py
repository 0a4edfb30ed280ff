"""Accuracy-aware int8 repair: leaves the damaged layer float, meets the bound, never reads the test split."""
from __future__ import annotations

import json

import numpy as np
import pytest
from quant_support import DAMAGED, make_damaged_run


@pytest.fixture(scope="module")
def repaired(tmp_path_factory):
    """The damaged run exported to tflite int8_repaired, recording what load_arrays decoded."""
    import edgetl.data as data
    from edgetl.export import export_run

    run = make_damaged_run(tmp_path_factory.mktemp("repair"))
    decoded: list = []
    real = data.load_arrays

    def spy(samples, *args, **kwargs):
        decoded.extend(samples)
        return real(samples, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "load_arrays", spy)
        lines: list[str] = []
        result = export_run(run, tflite=["int8_repaired"], onnx=[], echo=lines.append)
    return run, result, decoded, lines


def entry(result, name):
    return next(a for a in result.manifest["artifacts"] if a["name"] == name)


def test_repair_leaves_the_damaged_layer_float_and_meets_the_bound(repaired):
    run, result, _, _ = repaired
    name = "tflite-int8_repaired"
    found = entry(result, name)
    assert found["status"] == "ok", found["error"]
    steps = found["quantization"]["repair"]["steps"]
    assert steps[0]["raised"] == [] and steps[0]["drop_pp"] > 30  # full int8 is wrecked
    assert steps[-1]["drop_pp"] <= 5.0 and len(steps[-1]["raised"]) == 1
    assert DAMAGED in found["layers_left_float"][0] and found["layers_left_float"] == steps[-1]["raised"]
    assert found["quantization"]["repair"]["raised_to"] == "float"
    assert found["quantization"]["repair"]["images_from"].startswith("val (")
    report = json.loads((run / "exports" / found["quantization"]["layer_report"]["report"]).read_text())
    assert DAMAGED in report["worst"][0]["name"] and (run / "exports" / f"quantization/{name}.png").exists()


def test_repaired_file_loads_and_is_listed(repaired):
    from ai_edge_litert.interpreter import Interpreter

    run, result, _, _ = repaired
    assert result.failed == []
    tflite = run / "exports" / "tflite-int8_repaired.tflite"
    interpreter = Interpreter(model_path=str(tflite))
    interpreter.allocate_tensors()
    assert interpreter.get_input_details()[0]["dtype"] == np.uint8
    listed = json.loads((run / "exports" / "manifest.json").read_text())["artifacts"]
    assert [(a["name"], a["path"]) for a in listed] == [("tflite-int8_repaired", tflite.name)]


def test_repair_never_reads_the_test_split(repaired):
    from edgetl.data import load_splits
    from edgetl.rundir import RunDir

    run, _, decoded, _ = repaired
    splits = load_splits(RunDir(run).load_recipe())
    test = {s.path for s in splits.test}
    assert decoded and not test & {s.path for s in decoded}
    assert {s.path for s in splits.val} <= {s.path for s in decoded}


def test_repair_stops_with_a_clear_message_when_no_step_meets_the_bound():
    from edgetl.export.quant_debug import LayerError
    from edgetl.export.repair import RepairError, repair
    from edgetl.recipe import Int8Config

    layers = [LayerError(i, f"layer{i}", "CONV_2D", float(i)) for i in range(4)]
    built: list[tuple] = []

    def build(kept):
        built.append(kept)
        return b"x" * (100 + 10 * len(kept))

    images, reference = np.zeros((4, 2, 2, 3)), np.eye(3)[[0, 1, 2, 0]]
    never = lambda data, imgs: np.eye(3)[[1, 2, 0, 1]]  # noqa: E731 - disagrees on every image
    with pytest.raises(RepairError, match=r"max_float_layers \(2\).*0 float: 100.00 pp"):
        repair(layers, build, never, lambda data: 1.0, images, reference,
               Int8Config(max_float_layers=2, step=1, rank="report"), echo=lambda _: None)
    assert built == [(), ("layer0",), ("layer0", "layer1")]  # most sensitive (lowest SNR) first


def test_a_layer_over_the_latency_limit_is_undone_and_the_next_one_tried():
    """layer0 (the most sensitive) would fix nothing and triple the latency; layer1 fixes the bound cheaply."""
    from edgetl.export.quant_debug import LayerError
    from edgetl.export.repair import repair
    from edgetl.recipe import Int8Config

    layers = [LayerError(i, f"layer{i}", "CONV_2D", float(i)) for i in range(3)]
    reference = np.eye(3)[[0, 1, 2, 0]]
    right, wrong = reference, np.eye(3)[[1, 2, 0, 1]]

    def predict(data, images):
        return right if b"layer1" in data else wrong

    def latency(data):
        return 3.0 if b"layer0" in data else 1.0

    lines = []
    result = repair(layers, lambda raised: ",".join(raised).encode() or b"int8", predict, latency,
                    np.zeros((4, 2, 2, 3)), reference, Int8Config(max_latency_ratio=1.3, rank="report"),
                    echo=lines.append)
    assert [s.raised for s in result.steps] == [(), ("layer0",), ("layer1",)]
    assert result.steps[1].limit.startswith("export.int8.max_latency_ratio") and result.steps[2].limit is None
    assert result.data == b"layer1" and result.steps[-1].drop_pp == 0.0
    assert "(over export.int8.max_latency_ratio (1.3x full int8): undone)" in lines[1]


def test_measured_ranking_raises_first_the_layer_that_fixes_most_flips_alone():
    """The report ranks layer0 worst, but alone it fixes nothing; layer2 alone fixes both flips, layer1 one."""
    from edgetl.export.quant_debug import LayerError
    from edgetl.export.repair import repair
    from edgetl.recipe import Int8Config

    layers = [LayerError(i, f"layer{i}", "CONV_2D", float(i)) for i in range(3)]
    reference = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4]])
    outputs = {b"int8": [[0.4, 0.6], [0.6, 0.4], [0.7, 0.3], [0.6, 0.4]],
               b"layer0": [[0.45, 0.55], [0.55, 0.45], [0.7, 0.3], [0.6, 0.4]],
               b"layer1": [[0.8, 0.2], [0.6, 0.4], [0.7, 0.3], [0.6, 0.4]],
               b"layer2": [[0.85, 0.15], [0.3, 0.7], [0.7, 0.3], [0.6, 0.4]]}
    built: list[tuple] = []

    def build(raised):
        built.append(raised)
        return ",".join(raised).encode() or b"int8"

    result = repair(layers, build, lambda data, images: np.array(outputs[data]), lambda data: 1.0,
                    np.zeros((4, 2, 2, 3)), reference, Int8Config(), echo=lambda _: None)
    assert [(a.layer, a.disagreements) for a in result.ranking] == [("layer2", 0), ("layer1", 1), ("layer0", 2)]
    assert result.ranking[2].output_error == pytest.approx(0.5 * (0.9 + 0.7) / 4)
    assert result.data == b"layer2" and [s.raised for s in result.steps] == [(), ("layer2",)]
    assert built == [(), ("layer0",), ("layer1",), ("layer2",)]  # each built once: the step reuses the ranking's
    record = result.record(Int8Config(), 4, "val (4)")
    assert record["rank"] == "measured" and record["ranking"][0]["layer"] == "layer2"


def test_repair_set_uses_validation_images_topped_up_with_calibration(tmp_path):
    from edgetl.data import DatasetSplits
    from edgetl.export.repair import repair_set

    calibration = np.ones((5, 4, 4, 3), np.float32)
    splits = DatasetSplits("x", "x", ["a"], train=[], val=[], test=["never read"])
    images, source = repair_set(splits, lambda count: calibration[:count], 4, "plain", limit=3, max_drop_pp=1.0)
    assert source == "train (3)" and images.shape == (3, 4, 4, 3)
    from PIL import Image

    from edgetl.data import Sample

    Image.new("RGB", (4, 4), (10, 20, 30)).save(tmp_path / "v.png")
    splits = DatasetSplits("x", "x", ["a"], train=[], val=[Sample(str(tmp_path / "v.png"), 0)], test=["never read"])
    images, source = repair_set(splits, lambda count: calibration[:count], 4, "plain", limit=3, max_drop_pp=1.0)
    assert source == "val (1) + train (2)" and images.shape == (3, 4, 4, 3)
    images, source = repair_set(splits, lambda count: calibration[:count], 4, "plain", limit=None, max_drop_pp=25.0)
    assert source == "val (1) + train (3)" and images.shape == (4, 4, 4, 3)  # 100 / 25 pp: one image is the bound
    np.testing.assert_array_equal(images[0, 0, 0], [10, 20, 30])


def test_export_repair_adds_both_repaired_variants(tiny_export, monkeypatch):
    from click.testing import CliRunner

    import edgetl.export as ex
    from edgetl.cli import cli

    asked = []

    def fake_export_run(run_dir, tflite=None, onnx=None, echo=print):
        asked.append((tflite, onnx))
        return ex.ExportResult({"artifacts": []}, [], run_dir / "exports")

    monkeypatch.setattr(ex, "export_run", fake_export_run)
    run = str(tiny_export.run_dir)
    for args in (["--repair"], ["--repair", "--formats", "tflite:int8"], ["--formats", "tflite:int8"]):
        done = CliRunner().invoke(cli, ["export", run, *args])
        assert done.exit_code == 0, done.output
    recipe_tflite = ["fp32", "fp16", "dynamic", "int8", "qat_int8", "pruned_int8"]
    assert asked == [(recipe_tflite + ["int8_repaired"], ["fp32", "int8", "qat_int8", "int8_repaired"]),
                     (["int8", "int8_repaired"], ["int8_repaired"]), (["int8"], [])]


def test_onnx_repair_raises_the_damaged_node_to_int16_weights(tmp_path):
    """An outlier that crushes int8 weights but not int16 ones: the repair gives that node int16 weights, nothing
    float, and meets the bound; the file holds int16 weights for that node only."""
    import onnx

    from edgetl.export import export_run

    run = make_damaged_run(tmp_path, outlier=300.0)
    result = export_run(run, tflite=[], onnx=["int8_repaired"], echo=lambda _: None)
    found = entry(result, "onnx-int8_repaired")
    assert found["status"] == "ok", found["error"]
    repair = found["quantization"]["repair"]
    assert repair["raised_to"] == "int16 weights" and found["layers_left_float"] == []
    assert repair["steps"][0]["drop_pp"] > 30 and repair["steps"][-1]["drop_pp"] <= 5.0
    assert len(repair["raised"]) == 1 and DAMAGED in repair["raised"][0]
    assert found["quantization"]["int16_weights"] == repair["raised"]
    graph = onnx.load(str(run / "exports" / found["path"])).graph
    inits = {init.name: init for init in graph.initializer}
    wide = [n.input[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
            and inits[n.input[0]].data_type == onnx.TensorProto.INT16]
    assert len(wide) == 1 and DAMAGED in wide[0]
