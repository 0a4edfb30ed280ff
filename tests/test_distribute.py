"""tf.distribute training: strategy choice and errors, the learning-rate rule, mixed precision, and real
MirroredStrategy (two logical CPUs) and MultiWorkerMirroredStrategy (two local workers) runs.

The distributed runs happen in subprocesses: logical devices and multi-worker collectives can only be
configured before TensorFlow starts, and the rest of the suite must keep its single CPU device. They
train the registry's `test_cnn` backbone so that per-replica tracing stays cheap.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_recipe_dict

from edgetl.recipe import DistributeConfig, recipe_from_dict
from edgetl.training.distribute import (
    DistributeError,
    describe,
    is_chief,
    make_strategy,
    mixed_precision,
    read_tf_config,
    replicas,
    scaled_learning_rate,
    worker_cache_dir,
)

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2",
       "PYTHONPATH": os.pathsep.join([str(TESTS.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
# One batch per epoch (global batch 64 >= 36 training images, split 18 + 18 over two replicas), no dropout,
# no augmentation: a distributed run then takes exactly the single-device steps, up to float summation order.
# No validation split: it would only add per-replica tracing time.
DIST_RECIPE = {"model": {"backbone": "test_cnn"}, "data": {"batch_size": 64, "val_split": 0.0},
               "train": {"stage1": {"epochs": 3, "learning_rate": 0.01},
                         "stage2": {"epochs": 2, "learning_rate": 1e-3}}}


def cfg(**kw) -> DistributeConfig:
    return DistributeConfig(**kw)


def test_none_and_auto_on_a_cpu_machine_use_the_default_strategy():
    import tensorflow as tf

    for choice in ("none", "auto"):
        strategy = make_strategy(cfg(strategy=choice))
        assert strategy is tf.distribute.get_strategy() and replicas(strategy) == 1 and is_chief(strategy)
        assert worker_cache_dir(strategy) is None  # the default tf.data cache folder
        assert describe(strategy) == {"strategy": "default", "replicas": 1, "devices": ["/device:CPU:0"]}


def test_auto_mirrors_when_more_than_one_gpu_is_visible(monkeypatch):
    import tensorflow as tf

    monkeypatch.setattr("edgetl.training.distribute.gpu_count", lambda: 2)
    strategy = make_strategy(cfg(strategy="auto", devices=["/cpu:0"]))  # devices narrowed to what exists here
    assert isinstance(strategy, tf.distribute.MirroredStrategy) and replicas(strategy) == 1
    assert describe(strategy)["strategy"] == "MirroredStrategy"


def test_mirrored_rejects_devices_that_do_not_exist():
    with pytest.raises(DistributeError, match=r"'/gpu:3' is not a visible device \(visible: /cpu:0"):
        make_strategy(cfg(strategy="mirrored", devices=["/gpu:3"]))
    with pytest.raises(DistributeError, match="'bogus' is not a visible device"):
        make_strategy(cfg(strategy="mirrored", devices=["bogus"]))


@pytest.mark.parametrize("value, problem", [
    (None, "TF_CONFIG environment variable, which is not set"),
    ("{cluster", "TF_CONFIG is not valid JSON"),
    ('{"cluster": {"worker": "a:1"}, "task": {"type": "worker", "index": 0}}', "'cluster' must map job names"),
    ('{"cluster": {"worker": ["a:1"]}}', "'task' must be"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}', "'task' must be"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}', "'task' must be"),
])
def test_multi_worker_tf_config_errors_name_the_variable_and_show_the_shape(monkeypatch, value, problem):
    if value is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", value)
    with pytest.raises(DistributeError) as err:
        make_strategy(cfg(strategy="multi_worker"))
    message = str(err.value)
    assert problem in message and "TF_CONFIG='" in message
    json.loads(message.split("TF_CONFIG='")[1].split("'")[0])  # the example shown is valid JSON


def test_valid_tf_config_is_parsed():
    env = {"TF_CONFIG": '{"cluster": {"worker": ["h1:1", "h2:2"]}, "task": {"type": "worker", "index": 1}}'}
    assert read_tf_config(env)["task"] == {"type": "worker", "index": 1}


def test_learning_rate_rule():
    assert scaled_learning_rate(1e-3, cfg(lr_scaling="none"), 4) == 1e-3
    assert scaled_learning_rate(1e-3, cfg(lr_scaling="linear"), 4) == pytest.approx(4e-3)
    assert scaled_learning_rate(1e-3, cfg(lr_scaling="linear"), 1) == 1e-3


def test_mixed_precision_is_scoped_and_ignored_without_gpu(monkeypatch):
    import tf_keras as keras

    notes = []
    with mixed_precision(cfg(mixed_precision=True), notes.append) as active:
        assert not active and keras.mixed_precision.global_policy().name == "float32"
    assert len(notes) == 1 and "ignored: no GPU" in notes[0]
    monkeypatch.setattr("edgetl.training.distribute.gpu_count", lambda: 1)
    with pytest.raises(RuntimeError):
        with mixed_precision(cfg(mixed_precision=True)) as active:
            assert active and keras.mixed_precision.global_policy().name == "mixed_float16"
            raise RuntimeError("training failed")
    assert keras.mixed_precision.global_policy().name == "float32"  # restored even on failure


def test_mixed_precision_training_saves_a_float32_model(tiny_data, tmp_path, monkeypatch):
    """float16 compute runs on CPU too (slowly), so the GPU path is exercised here with a faked GPU."""
    import numpy as np
    import tf_keras as keras

    from edgetl.rundir import RunDir
    from edgetl.training import train
    from edgetl.training.supervised import Trainer

    monkeypatch.setattr("edgetl.training.distribute.gpu_count", lambda: 1)
    seen, convert = {}, Trainer.to_float32
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)

    def spy(trainer):  # the trained model before and after its float32 copy
        seen["compute"] = trainer.clf.backbone.get_layer("block1_conv").compute_dtype
        seen["output"] = trainer.clf.model.output.dtype.name
        seen["mixed_probs"] = trainer.clf.model(images, training=False).numpy()
        convert(trainer)
        seen["float32_probs"] = trainer.clf.model(images, training=False).numpy()

    monkeypatch.setattr(Trainer, "to_float32", spy)
    raw = tiny_recipe_dict(tiny_data, model={"backbone": "test_cnn"}, distribute={"mixed_precision": True},
                           data={"val_split": 0.0},
                           train={"stage1": {"epochs": 4, "learning_rate": 0.05}, "stage2": {"epochs": 1}})
    result = train(recipe_from_dict(raw), run_dir=tmp_path / "run", echo=lambda *_: None)
    assert keras.mixed_precision.global_policy().name == "float32"
    assert seen["compute"] == "float16" and seen["output"] == "float32"  # trained in float16, float32 head
    np.testing.assert_allclose(seen["mixed_probs"], seen["float32_probs"], atol=1e-2)  # same weights, float16 noise
    run = RunDir(result.run_dir)
    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["distribute"]["mixed_precision"] is True
    model = run.load_model()
    policies = {layer.dtype_policy.name for layer in model.layers} | {
        layer.dtype_policy.name for layer in model.get_layer(index=2).layers}
    assert policies == {"float32"}
    probs = model.predict(np.full((2, 32, 32, 3), 128.0, np.float32), verbose=0)
    assert probs.dtype == np.float32 and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    history = json.loads(run.history_path.read_text())
    assert history["stage1"]["loss"][-1] < history["stage1"]["loss"][0]  # float16 compute still learns
    assert result.metrics["test"]["top1"] > 0.5  # measured on the float32 copy (chance is 1/3)


MIRRORED_SCRIPT = """
import json, sys
import edgetl
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from edgetl.recipe import recipe_from_dict
from edgetl.training import train

train(recipe_from_dict(json.loads(sys.argv[1])), run_dir=sys.argv[2], echo=lambda *_: None)
"""


def test_mirrored_on_two_logical_cpus_matches_single_device(tiny_data, tmp_path):
    import numpy as np

    from edgetl.data import load_arrays, load_splits
    from edgetl.rundir import RunDir
    from edgetl.training import train

    raw = tiny_recipe_dict(tiny_data, **DIST_RECIPE)
    mirrored_raw = {**raw, "distribute": {"strategy": "mirrored", "devices": ["/cpu:0", "/cpu:1"]}}
    proc = subprocess.Popen([sys.executable, "-c", MIRRORED_SCRIPT, json.dumps(mirrored_raw),
                             str(tmp_path / "mirrored")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
    try:  # the single-device baseline trains here, on the second core, meanwhile
        train(recipe_from_dict(raw), run_dir=tmp_path / "single", echo=lambda *_: None)
        _, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    runs = {name: RunDir(tmp_path / name) for name in ("single", "mirrored")}
    single, mirrored = (json.loads(run.manifest_path.read_text()) for run in runs.values())
    assert single["distribute"]["strategy"] == "default" and single["distribute"]["replicas"] == 1
    assert mirrored["distribute"]["strategy"] == "MirroredStrategy" and mirrored["distribute"]["replicas"] == 2
    assert [d[-5:] for d in mirrored["distribute"]["devices"]] == ["CPU:0", "CPU:1"]
    assert all({"stage1_s", "stage2_s"} <= set(m["timings_s"]) for m in (single, mirrored))
    images = load_arrays(load_splits(recipe_from_dict(raw)).test, 32)[0].astype(np.float32)
    models = [run.load_model() for run in runs.values()]
    weights = [m.get_weights() for m in models]
    probs = [m.predict(images, verbose=0) for m in models]
    histories = [json.loads(run.history_path.read_text()) for run in runs.values()]
    for stage in ("stage1", "stage2"):
        losses = [h[stage]["loss"] for h in histories]
        assert losses[0][-1] < losses[0][0]  # both stages trained
        np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    # Same steps on the same data; only the order of float32 sums differs (all-reduce of two half-batch
    # gradients vs one full-batch sum): ~1e-7 relative per step, a few 1e-7 after 5 Adam steps (measured).
    # 1e-5 leaves a wide margin, while any real difference in the steps (a replica stepping on its own
    # half batch, other batches, a skipped all-reduce) moves Adam updates by ~lr = 1e-3..1e-2.
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(np.max(np.abs(a)))))
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-5)


WORKER_SCRIPT = """
import json, sys
import edgetl
from edgetl.recipe import recipe_from_dict
from edgetl.training import train

result = train(recipe_from_dict(json.loads(sys.argv[1])), out_root=sys.argv[2], echo=print)
print(json.dumps({"chief": result.chief, "run_dir": str(result.run_dir), "exists": result.run_dir.exists()}))
"""
WORKER_TIMEOUT_S = 240  # ~25 s of CPU per worker; generous because the two cores are shared


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _run_workers(raw: dict, out_root: Path, cwd: Path) -> list[tuple[int, str, str]]:
    """Start one worker process per TF_CONFIG task on local ports; (exit code, stdout, stderr) of each."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    procs = []
    for index in range(2):
        env = {**ENV, "EDGETL_CACHE": str(cwd / "cache"),
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        procs.append(subprocess.Popen([sys.executable, "-u", "-c", WORKER_SCRIPT, json.dumps(raw), str(out_root)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd))
    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=WORKER_TIMEOUT_S)
            results.append((proc.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        outputs = [proc.communicate() for proc in procs]
        # "model:" is printed after the variables were broadcast from worker 0, the first collective.
        if not any("model:" in out for out, _ in outputs):
            pytest.skip("the two workers never formed a collective group on 127.0.0.1 in this sandbox: "
                        + " | ".join(err[-400:] for _, err in outputs))
        pytest.fail(f"multi-worker training did not finish in {WORKER_TIMEOUT_S} s: {outputs}")
    return results


def test_multi_worker_two_local_workers_train_and_only_the_chief_writes(tiny_data, tmp_path):
    """Disk cache on: two workers on one disk must not share tf.data cache files (each gets its own)."""
    raw = tiny_recipe_dict(tiny_data, model={"backbone": "test_cnn"}, distribute={"strategy": "multi_worker"},
                           data={"val_split": 0.0, "cache": "disk"},
                           train={"stage1": {"epochs": 1}, "stage2": {"epochs": 1}})
    out_root = tmp_path / "models"
    results = _run_workers(raw, out_root, tmp_path)
    for code, _, stderr in results:
        assert code == 0, stderr[-3000:]
    reports = [json.loads(stdout.strip().splitlines()[-1]) for _, stdout, _ in results]
    assert [r["chief"] for r in reports] == [True, False]
    assert reports[0]["exists"] and not reports[1]["exists"]  # the other worker's scratch run is removed
    assert "not the chief" in results[1][1] and "not the chief" not in results[0][1]
    runs = list((out_root / "tiny").iterdir())
    assert runs == [Path(reports[0]["run_dir"])]
    manifest = json.loads((runs[0] / "manifest.json").read_text())
    assert manifest["distribute"]["strategy"] == "MultiWorkerMirroredStrategy"
    assert manifest["distribute"]["replicas"] == 2
    history = json.loads((runs[0] / "history.json").read_text())
    assert len(history["stage1"]["loss"]) == 1 and len(history["stage2"]["loss"]) == 1
    assert (runs[0] / "model.keras").is_file()
    caches = tmp_path / "cache" / "tfdata"
    assert sorted(p.name for p in caches.iterdir()) == ["worker-0", "worker-1"]
    assert all(list(p.glob("cache-*.index")) for p in caches.iterdir())
