"""The per-row measuring process: one artifact on one runtime, loaded, timed and run on the test images.

A row of the validation table is (runtime, artifact). `measure` (the parent's side) writes a job file and
starts `python -m edgetl.validate.worker JOB`; the child imports only the runtime it measures (TensorFlow
for the Keras reference, LiteRT, ONNX Runtime or OpenVINO for an export), so load time and peak memory are
that runtime's alone, and the parent never imports TensorFlow.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgetl.edge.process import error_line, run_module
from edgetl.edge.runtime import Runner, RuntimeMissingError, open_model, openvino_config, peak_rss_mb
from edgetl.io import atomic_write_json, read_json
from edgetl.rundir import load_keras_model

THROUGHPUT_BATCH = 16
UNAVAILABLE = "unavailable.json"  # what a worker writes instead of a result when its optional runtime is missing
TIMEOUT_S = 1800.0
KERAS_RUNTIME = "tf_keras"  # the only worker that imports TensorFlow
DEFAULT_RUNTIMES = ("auto",)  # recipe `validate.runtimes`: each format on its default runtime only
# The runtimes that read each artifact format, its default (what "auto" picks) first; the edge ones are opened
# by edgetl.edge.runtime.open_model. A row on the default runtime keeps the artifact's name (report.json stays
# comparable with earlier runs), a row on another one is named `<runtime>:<artifact>`, e.g. openvino:onnx-fp32.
FORMAT_RUNTIMES = {"keras": (KERAS_RUNTIME,), "tflite": ("litert", "openvino"), "onnx": ("onnxruntime", "openvino")}
# Runtimes edgetl does not depend on: where one is not installed its rows are "unavailable" (noted with the
# pip install line, not a gate failure); a missing default runtime stays an evaluation error.
OPTIONAL_RUNTIMES = ("openvino",)


def runtimes_for(fmt: str, wanted=DEFAULT_RUNTIMES) -> tuple[str, ...]:
    """The runtimes of `wanted` (edgetl.edge.runtime.RUNTIMES names; "auto": the format's default) that an artifact
    of format `fmt` is measured on, one row each. The Keras reference always gets its row; a format edgetl
    does not know gets an "auto" row, whose error names the problem."""
    readers = FORMAT_RUNTIMES.get(fmt, ("auto",))
    if fmt == "keras":
        return readers
    return tuple(r for i, r in enumerate(readers) if r in wanted or (i == 0 and "auto" in wanted))


def row_name(runtime: str, fmt: str, artifact: str) -> str:
    """The report row's name: the artifact's on its format's default runtime, else `<runtime>:<artifact>`."""
    return artifact if runtime == FORMAT_RUNTIMES.get(fmt, ("auto",))[0] else f"{runtime}:{artifact}"


def throughput_runs(runs: int) -> int:
    """Timed runs at the throughput batch: a tenth of the batch-1 runs, at least 3."""
    return max(3, runs // 10)


def settings(threads: int, runs: int, warmup: int, latency_key: str, runtimes=DEFAULT_RUNTIMES) -> dict:
    """How the workers measure, as report.json's `settings` records it (`latency_key`: the statistic decided on,
    `runtimes`: those asked for)."""
    return {"threads": threads, "runs": runs, "warmup": warmup, "latency_batch": 1, "latency_statistic": latency_key,
            "throughput_batch": THROUGHPUT_BATCH, "throughput_runs": throughput_runs(runs), "xnnpack": True,
            "onnx_provider": "CPUExecutionProvider", "runtimes": list(runtimes),
            "openvino_config": openvino_config(threads)}


@dataclass(frozen=True)
class Job:
    """One row to measure: the runtime, the model file, the decoded test images, and how to time it."""

    runtime: str
    model: str
    images: str  # .npy of the test images as uint8 RGB, decoded once by the parent
    out: str  # folder the worker writes result.json and probs.npy (heads.npz for multi-task runs) into
    threads: int
    runs: int
    warmup: int
    batch_size: int
    heads: tuple[str, ...] = ()  # multi-task runs: the outputs to score, primary first


@dataclass(frozen=True)
class Output:
    """What one worker measured (its result.json) and predicted, or the one-line `error` that stopped it
    (`unavailable`: the error is an optional runtime that is not installed)."""

    error: str | None
    result: dict | None = None
    probs: np.ndarray | None = None  # the primary head's scores, (images, classes)
    heads: dict[str, np.ndarray] | None = None  # multi-task runs: every head's scores
    unavailable: bool = False


def measure(job: Job, timeout_s: float = TIMEOUT_S) -> Output:
    """Run `job` in a fresh interpreter and read back what it wrote (the job's `out` folder must not exist)."""
    out = Path(job.out)
    out.mkdir()
    atomic_write_json(out / "job.json", asdict(job))
    try:
        proc = run_module("edgetl.validate.worker", [str(out / "job.json")], timeout_s)
    except subprocess.TimeoutExpired:
        return Output(f"did not finish within {timeout_s:.0f} s")
    if proc.returncode == 0 and (out / UNAVAILABLE).is_file():
        return Output(read_json(out / UNAVAILABLE)["error"], unavailable=True)
    if proc.returncode != 0 or not (out / "result.json").is_file():
        # a traceback's "edgetl.edge.runtime.ModelError: msg" reads as "ModelError: msg"
        return Output(re.sub(r"^(?:\w+\.)+(\w+: )", r"\1", error_line(proc, "worker")))
    return Output(None, read_json(out / "result.json"), np.load(out / "probs.npy"),
                  dict(np.load(out / "heads.npz")) if job.heads else None)


class KerasRunner(Runner):
    """model.keras on tf_keras behind the edge `Runner` interface, so it is timed by the same loop."""

    def __init__(self, path: Path, threads: int | None, batch_size: int):
        import tensorflow as tf
        import tf_keras as keras

        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        start = time.perf_counter()
        self._model = load_keras_model(path)
        self.load_time_s = time.perf_counter() - start
        self._call = tf.function(lambda x: self._model(x, training=False))
        self._tf, self._batch_size = tf, batch_size
        self.path, self.kind = Path(path), "keras"
        self.runtime_name, self.runtime_version = "tf_keras", keras.__version__
        self.input_shape = tuple(int(d) for d in self._model.input_shape[1:])
        self.input_dtype, self.output_names = "float32", list(self._model.output_names)
        self.threads, self.xnnpack, self.labels = threads, None, None

    def _run(self, images: np.ndarray) -> dict:
        out = self._model.predict(self._check_images(images).astype(np.float32), batch_size=self._batch_size,
                                  verbose=0)
        return dict(zip(self.output_names, out if isinstance(out, list) else [out]))

    def _prepare_invoke(self, pixels: np.ndarray):
        x = self._tf.constant(pixels.astype(np.float32))
        self._call(x)  # trace the graph for this shape outside the timed runs
        return lambda: self._call(x)


def _open(job: Job) -> Runner:
    """The job's runtime loaded with its model: tf_keras for the Keras reference, else the edge runner."""
    if job.runtime == KERAS_RUNTIME:
        return KerasRunner(Path(job.model), job.threads, job.batch_size)
    return open_model(job.model, threads=job.threads, xnnpack=True, runtime=job.runtime)


def run_job(job: Job) -> None:
    """The child's side: load, time batch-1 invoke, predict the images in chunks, time a larger batch, write.

    An optional runtime that is not installed writes its one-line pip install message to UNAVAILABLE instead.
    """
    out = Path(job.out)
    images = np.load(job.images)
    baseline = peak_rss_mb()
    try:
        runner = _open(job)
    except RuntimeMissingError as exc:
        if job.runtime not in OPTIONAL_RUNTIMES:
            raise
        atomic_write_json(out / UNAVAILABLE, {"error": str(exc)})
        return
    latency = runner.time_invoke(batch=1, runs=job.runs, warmup=job.warmup)
    peak = peak_rss_mb()  # load + batch-1 inference: what serving one image at a time costs
    step = job.batch_size
    if job.heads:
        missing = [h for h in job.heads if h not in runner.output_names]
        if missing:
            raise RuntimeError(f"no output named {', '.join(missing)}: the artifact's outputs are "
                               f"{runner.output_names}, the run's heads {list(job.heads)}")
        chunks = [runner.predict_all(images[i:i + step]) for i in range(0, len(images), step)]
        by_head = {h: np.concatenate([c[h] for c in chunks]).astype(np.float32) for h in job.heads}
        np.savez(out / "heads.npz", **by_head)
        probs = by_head[job.heads[0]]
    else:
        probs = np.concatenate([runner.predict(images[i:i + step]) for i in range(0, len(images), step)])
    throughput, throughput_error = None, None
    try:
        stats = runner.time_invoke(batch=THROUGHPUT_BATCH, runs=throughput_runs(job.runs), warmup=1)
        throughput = {"batch": stats.batch, "runs": stats.runs, "mean_ms": stats.mean_ms,
                      "images_per_s": stats.batch * 1000.0 / stats.mean_ms}
    except Exception as exc:  # noqa: BLE001 - runtimes raise their own types; a fixed batch size is not a failure
        throughput_error = f"batch {THROUGHPUT_BATCH} not possible: {str(exc).splitlines()[0] if str(exc) else exc!r}"
    np.save(out / "probs.npy", probs.astype(np.float32))
    atomic_write_json(out / "result.json", {
        "runtime": runner.runtime_name, "runtime_version": runner.runtime_version,
        "input_dtype": runner.input_dtype, "input_shape": list(runner.input_shape),
        "load_time_s": runner.load_time_s, "latency": latency.to_dict(), "throughput": throughput,
        "throughput_error": throughput_error, "peak_rss_mb": peak, "baseline_rss_mb": baseline})


def main(argv: list[str]) -> None:
    """`python -m edgetl.validate.worker JOB.json`: measure the job a parent wrote."""
    if len(argv) != 1:
        sys.exit("usage: python -m edgetl.validate.worker JOB.json (internal; use `edgetl validate RUN_DIR`)")
    fields = read_json(argv[0])
    run_job(Job(**{**fields, "heads": tuple(fields["heads"])}))


if __name__ == "__main__":
    main(sys.argv[1:])
