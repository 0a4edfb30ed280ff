"""The served models: targets to names, interpreters per worker (one per batch size when batching), warm-up, and
hot reload on file replacement.

A `LoadedModel` is one load of one file and never changes; `ServedModel.current` points at the newest one and is
swapped in a single assignment after the replacement has loaded and warmed up, so a batch in progress finishes on
the model it started with. A replacement that fails to load leaves the previous model serving.
"""
from __future__ import annotations

import functools
import io
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from edgetl.edge.images import RESIZE_MODES, ImageError, decode_image
from edgetl.edge.runtime import MODEL_SUFFIXES, ModelError, model_labels, open_model, read_embedded_labels
from edgetl.edge.serve.batcher import Batcher, BatchOptions
from edgetl.edge.serve.metrics import ServeMetrics
from edgetl.edge.serve.protocol import InferInput, RequestedOutput, RequestError
from edgetl.errors import EdgetlError
from edgetl.io import RunPaths, head_labels_name, read_json, read_labels

log = logging.getLogger("edgetl.serve")
# The name edgetl's exports give their one input; edge.runtime does not expose a runtime's own tensor name.
INPUT_NAME = "image"
VERSION = "1"
PLATFORMS = {"tflite": "tensorflow_lite", "onnx": "onnxruntime_onnx"}
# Runtimes that run any batch size on one session without re-allocating; the others get one runner per batch size.
SHAPE_FREE_RUNTIMES = ("onnxruntime",)
MAX_IMAGE_PIXELS = 25_000_000  # a 24 MP photo decodes; a tiny PNG claiming 40000x40000 does not
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class TargetError(EdgetlError, ValueError):
    """A serve TARGET that names no model file, or two models under one name."""


@dataclass(frozen=True)
class ModelSpec:
    """What to serve under `name`: a .tflite/.onnx file, and how encoded images are resized for it."""

    name: str
    path: Path
    resize: str = "plain"


@dataclass(frozen=True)
class ModelOptions:
    """Interpreter threads per worker, the batching settings, and how often files are checked for replacement."""

    threads: Optional[int] = None
    runtime: str = "auto"  # edge.runtime.RUNTIMES: which engine runs every model
    batch: BatchOptions = BatchOptions()
    reload_interval_s: float = 2.0


def parse_targets(targets: Sequence[str], resize: Optional[str] = None,
                  resize_of: Optional[Callable[[Path], str]] = None) -> List[ModelSpec]:
    """TARGETs (a model file, a run directory meaning every artifact in its exports/, or NAME=FILE) as specs.

    The resize mode is `resize` when given, else `resize_of(model path)` (the CLI reads the run's recipe), else plain.
    """
    specs: List[ModelSpec] = []
    for target in targets:
        name, path = _split_target(target)
        for model_path in _model_files(path) if name is None else [path]:
            if model_path.suffix.lower() not in MODEL_SUFFIXES or not model_path.is_file():
                raise TargetError(f"{model_path}: not a {' or '.join(MODEL_SUFFIXES)} file")
            mode = resize or (resize_of(model_path) if resize_of else "plain")
            if mode not in RESIZE_MODES:
                raise TargetError(f"{model_path}: resize mode {mode!r} is not one of {', '.join(RESIZE_MODES)}")
            specs.append(ModelSpec(name or model_path.stem, model_path, mode))
    names = [spec.name for spec in specs]
    for spec in specs:
        if not _NAME.match(spec.name):
            raise TargetError(f"model name {spec.name!r} must be letters, digits, '_', '.' or '-'; serve it as NAME=PATH")
        if names.count(spec.name) > 1:
            raise TargetError(f"two models are named {spec.name!r}; give one another name with NAME=PATH")
    return specs


def _split_target(target: str) -> Tuple[Optional[str], Path]:
    """(NAME, PATH) for NAME=PATH, else (None, PATH); a path that exists as written is never split."""
    name, sep, rest = target.partition("=")
    if sep and not Path(target).exists():
        return name, Path(rest)
    return None, Path(target)


def _model_files(path: Path) -> List[Path]:
    """A file as itself; a run directory as the exported artifacts its manifest lists as ok (else every model file)."""
    if not path.is_dir():
        return [path]
    exports = RunPaths(path).exports_dir if RunPaths(path).exports_dir.is_dir() else path
    manifest = exports / "manifest.json"
    if manifest.is_file():
        files = [exports / a["path"] for a in read_json(manifest).get("artifacts", [])
                 if a.get("status") == "ok" and a.get("path")]
    else:
        files = sorted(p for p in exports.iterdir() if p.suffix.lower() in MODEL_SUFFIXES)
    if not files:
        raise TargetError(f"{path}: no exported .tflite or .onnx artifacts (run `edgetl export {path}` first)")
    return files


@dataclass(frozen=True)
class FileStamp:
    """Identity of a file's current content as the file system reports it (a replaced file changes it)."""

    device: int
    inode: int
    mtime_ns: int
    size: int

    @classmethod
    def of(cls, path: Path) -> "FileStamp":
        st = os.stat(path)
        return cls(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class LoadedModel:
    """One load of one model file: a warmed-up runner per worker and what the protocol says about the model."""

    def __init__(self, spec: ModelSpec, threads: Optional[int], workers: int, max_batch: int, generation: int,
                 runtime: str = "auto"):
        self.spec, self.generation = spec, generation
        self.stamp = FileStamp.of(spec.path)  # before loading: a replacement during the load is seen next poll
        start = time.perf_counter()
        open_runner = functools.partial(open_model, spec.path, threads=threads, runtime=runtime)
        first = open_runner()
        self.kind, self.input_shape = first.kind, tuple(first.input_shape)
        self.datatype = "FP32" if first.input_dtype == "float32" else "UINT8"
        self.output_names = list(first.output_names)
        self.batchable = max_batch > 1 and _accepts_batches(first)
        sizes = batch_sizes(max_batch) if self.batchable and first.runtime_name not in SHAPE_FREE_RUNTIMES else (1,)
        if len(sizes) == 1:
            self.runners = (first, *(open_runner() for _ in range(workers - 1)))
        else:  # `first` was resized by the probe: every worker gets fresh runners, one per size
            self.runners = tuple(SizedRunners(open_runner, sizes, self.input_shape) for _ in range(workers))
        warm = [runner.predict_all(np.zeros((1,) + self.input_shape, dtype=np.uint8)) for runner in self.runners]
        self.output_shapes = {name: tuple(value.shape[1:]) for name, value in warm[0].items()}
        self.labels = _output_labels(spec.path, self.output_names)
        self.load_s = time.perf_counter() - start
        height, width = self.input_shape[:2]
        self.image_size = height if height == width else None

    def describe(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        return (f"{self.spec.name}: {self.spec.path} ({self.kind}, {self.datatype} {shape}, "
                f"{'dynamic batching' if self.batchable else 'no batching'}, resize {self.spec.resize}, "
                f"{len(self.runners)} worker(s) x {_sizes_text(self.runners[0])}, "
                f"loaded and warmed up in {self.load_s * 1000:.0f} ms)")

    def metadata(self) -> dict:
        """The protocol's model metadata; the batch dimension is -1 (any batch is accepted)."""
        return {
            "name": self.spec.name, "versions": [VERSION], "platform": PLATFORMS[self.kind],
            "inputs": [{"name": INPUT_NAME, "datatype": self.datatype, "shape": [-1, *self.input_shape]}],
            "outputs": [{"name": name, "datatype": "FP32", "shape": [-1, *self.output_shapes[name]]}
                        for name in self.output_names],
        }

    def payload(self, tensor: InferInput) -> Tuple[Any, int]:
        """(payload, image count) of the request's one input: pixels (N, H, W, C), or encoded images (BYTES)."""
        if tensor.name != INPUT_NAME:
            raise RequestError(f"model {self.spec.name!r} has one input, {INPUT_NAME!r}; got {tensor.name!r}")
        shape = list(tensor.shape)
        if tensor.datatype == "BYTES":
            if len(shape) not in (1, 2) or shape[0] < 1 or shape[1:] not in ([], [1]):
                raise RequestError(f"input {INPUT_NAME!r}: BYTES images need shape [N] or [N, 1], got {shape}")
            return list(tensor.data), shape[0]
        if tensor.datatype not in (self.datatype, "UINT8"):
            raise RequestError(f"input {INPUT_NAME!r}: datatype {tensor.datatype} is not accepted by {self.spec.name!r}; "
                               f"send {self.datatype} pixels (0..255) or BYTES holding JPEG/PNG images")
        expected = [-1, *self.input_shape]
        if len(shape) != 4 or shape[0] < 1 or shape[1:] != expected[1:]:
            raise RequestError(f"input {INPUT_NAME!r}: shape {shape} does not match {expected}")
        return tensor.data, shape[0]

    def outputs(self, requested: Optional[Sequence[RequestedOutput]], binary: bool) -> List[RequestedOutput]:
        """The outputs to return: those requested (names checked), else all of them."""
        if requested is None:
            return [RequestedOutput(name, binary) for name in self.output_names]
        for out in requested:
            if out.name not in self.output_names:
                raise RequestError(f"model {self.spec.name!r} has no output {out.name!r} "
                                   f"(outputs: {', '.join(self.output_names)})")
        return list(requested)

    def pixels(self, payload: Any) -> np.ndarray:
        """(N, H, W, C) pixels for this model from a payload (decoding encoded images)."""
        if not isinstance(payload, list):
            if tuple(payload.shape[1:]) != self.input_shape:  # prepared for a generation this reload replaced
                raise RequestError(f"model {self.spec.name!r} was reloaded with input {list(self.input_shape)}; "
                                   "resend the request", status=503, headers={"Retry-After": "1"})
            return payload
        if len(payload) == 1:
            return self.decode(payload[0])[None]  # a view: no copy of the pixels
        return np.stack([self.decode(data) for data in payload])

    def decode(self, data: bytes) -> np.ndarray:
        """One JPEG/PNG/... image through edge.images.decode_image, exactly as validate and bench decode files."""
        if self.image_size is None:
            raise RequestError(f"model {self.spec.name!r} takes {self.input_shape[0]}x{self.input_shape[1]} input; "
                               "image decoding needs a square input, send pixels instead")
        try:
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
        except UnidentifiedImageError:
            raise RequestError("image: not an image Pillow can identify") from None
        except Image.DecompressionBombError as exc:
            raise RequestError(f"image: {exc}", status=413) from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise RequestError(f"image: unreadable ({exc})") from None
        if width * height > MAX_IMAGE_PIXELS:
            raise RequestError(f"image: {width}x{height} is more than {MAX_IMAGE_PIXELS} pixels", status=413)
        try:
            return decode_image(io.BytesIO(data), self.image_size, self.spec.resize)
        except ImageError as exc:
            raise RequestError(f"image: {exc.reason}") from None


def batch_sizes(max_batch: int) -> Tuple[int, ...]:
    """The batch sizes a worker keeps an interpreter for: the powers of two up to `max_batch`, largest first."""
    return tuple(2 ** i for i in reversed(range(max_batch.bit_length())))


class SizedRunners:
    """One worker's runners of one model, one per batch size (`batch_sizes`), each allocated and warmed up at its size.

    A LiteRT interpreter re-allocates its tensors (OpenVINO recompiles) whenever the batch size changes, which costs
    more than batching saves; here every runner keeps its shape, and a batch is run in chunks of those sizes (7 = 4+2+1).
    """

    def __init__(self, open_runner: Callable[[], Any], sizes: Sequence[int], input_shape: Tuple[int, ...]):
        self.sizes = tuple(sorted(sizes, reverse=True))
        self.by_size = {size: open_runner() for size in self.sizes}
        for size, runner in self.by_size.items():
            runner.predict_all(np.zeros((size,) + input_shape, dtype=np.uint8))

    def predict_all(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        """Every output of `images` (N, H, W, C), computed in chunks of the runners' sizes, largest first."""
        parts: List[Dict[str, np.ndarray]] = []
        start = 0
        while start < len(images):
            size = next(size for size in self.sizes if size <= len(images) - start)
            parts.append(self.by_size[size].predict_all(images[start:start + size]))
            start += size
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _sizes_text(runner) -> str:
    """How one worker's runners are described in the log: "1 interpreter" or "interpreters for batch 4, 2, 1"."""
    if isinstance(runner, SizedRunners):
        return f"interpreters for batch {', '.join(map(str, runner.sizes))}"
    return "1 interpreter"


def _accepts_batches(runner) -> bool:
    """Whether the artifact runs a batch of 2 in one call: a fixed-batch TFLite file raises ValueError, and
    onnxruntime raises its own error types for a fixed batch dimension."""
    try:
        runner.time_invoke(batch=2, runs=1, warmup=0)
    except Exception:  # noqa: BLE001 - any refusal means "no batch dimension"
        return False
    return True


def _output_labels(path: Path, output_names: Sequence[str]) -> Dict[str, Optional[List[str]]]:
    """Class names per output: the first as edge.runtime.model_labels finds them; a multi-task head's from
    labels_<head>.txt beside the file, else from the TFLite metadata."""
    labels = {output_names[0]: model_labels(path)[0]}
    for name in output_names[1:]:
        beside = path.with_name(head_labels_name(name))
        labels[name] = read_labels(beside) if beside.is_file() else read_embedded_labels(path, name)
    return labels


class ServedModel:
    """One model name: its current LoadedModel, its Batcher, and the hot-reload check of its file."""

    def __init__(self, spec: ModelSpec, options: ModelOptions, metrics: ServeMetrics):
        self.spec, self.options, self._metrics = spec, options, metrics
        self.current: Optional[LoadedModel] = None
        self._pending: Optional[FileStamp] = None
        self._failed: Optional[FileStamp] = None
        self.batcher = Batcher(spec.name, self.execute, options.batch, self.batch_limit, metrics)

    def load(self) -> LoadedModel:
        """Load (or reload) the file: every worker's interpreter, warmed up. Raises ModelError for a bad file."""
        generation = self.current.generation + 1 if self.current else 1
        batch = self.options.batch
        return LoadedModel(self.spec, self.options.threads, batch.workers, batch.max_batch, generation,
                           self.options.runtime)

    def activate(self, model: LoadedModel) -> None:
        self.current = model
        self._metrics.generation.labels(self.spec.name).set(model.generation)

    def batch_limit(self) -> int:
        return self.options.batch.max_batch if self.current.batchable else 1

    def execute(self, worker: int, payloads: Sequence[Any]) -> List[Any]:
        """Decode and run one batch on worker `worker`'s interpreter of the current model.

        Returns per payload (model, {output: rows}) or the RequestError that made its images unusable.
        """
        model = self.current
        results: List[Any] = [None] * len(payloads)
        arrays, owners = [], []
        for i, payload in enumerate(payloads):
            try:
                arrays.append(model.pixels(payload))
                owners.append(i)
            except RequestError as exc:
                results[i] = exc
        if arrays:
            outputs = model.runners[worker].predict_all(np.concatenate(arrays) if len(arrays) > 1 else arrays[0])
            start = 0
            for i, pixels in zip(owners, arrays):
                results[i] = (model, {name: value[start:start + len(pixels)] for name, value in outputs.items()})
                start += len(pixels)
        return results

    def poll(self) -> None:
        """Reload once the file was replaced and stayed unchanged for one poll interval."""
        try:
            stamp = FileStamp.of(self.spec.path)
        except OSError:  # mid-replacement, or removed: keep serving what is loaded
            return
        if stamp in (self.current.stamp, self._failed):
            self._pending = None
            return
        if stamp != self._pending:
            self._pending = stamp
            return
        self._pending = None
        name = self.spec.name
        try:
            model = self.load()
        except Exception as exc:  # noqa: BLE001 - whatever the runtime raises, the old model keeps serving
            self._failed = stamp
            self._metrics.reloads.labels(name, "failed").inc()
            self._metrics.reload_failed.labels(name).set(1)
            log.error("model %s: reloading %s failed, still serving generation %d: %s",
                      name, self.spec.path, self.current.generation, exc)
            return
        self._failed = None
        self.activate(model)
        self._metrics.reloads.labels(name, "ok").inc()
        self._metrics.reload_failed.labels(name).set(0)
        log.info("model %s: reloaded (generation %d) %s", name, model.generation, model.describe())


class ModelRegistry:
    """Every served model by name, plus the thread that watches their files."""

    def __init__(self, specs: Sequence[ModelSpec], options: ModelOptions, metrics: ServeMetrics):
        self.options = options
        self.models = {spec.name: ServedModel(spec, options, metrics) for spec in specs}
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="edgetl-reload", daemon=True)

    def load(self) -> None:
        """Load and warm up every model before serving; ModelError names the model that failed."""
        for name, served in self.models.items():
            try:
                served.activate(served.load())
            except (ModelError, OSError) as exc:
                raise ModelError(f"model {name!r}: {exc}") from None
            log.info("serving %s", served.current.describe())

    def get(self, name: str) -> Optional[ServedModel]:
        return self.models.get(name)

    def start(self) -> None:
        for served in self.models.values():
            served.batcher.start()
        if self.options.reload_interval_s > 0:
            self._watcher.start()

    def stop(self) -> None:
        """Stop watching, then drain every model's queue and end its workers."""
        self._stop.set()
        if self._watcher.is_alive():
            self._watcher.join()
        for served in self.models.values():
            served.batcher.stop()

    def _watch(self) -> None:
        while not self._stop.wait(self.options.reload_interval_s):
            for served in self.models.values():
                served.poll()
