"""Run a .tflite or .onnx artifact on raw RGB images with whichever runtime is installed.

`open_model` hides the difference between ai_edge_litert / tflite_runtime and onnxruntime behind one
`Runner`: feed uint8 pixels, get float probabilities back, time the bare invoke. Runtimes are imported
lazily so this module (and the on-device runner) never needs TensorFlow.
"""
from __future__ import annotations

import re
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from edgetl.io import parse_labels, read_labels

TFLITE_RUNTIMES = (("ai_edge_litert", "ai_edge_litert.interpreter"), ("tflite_runtime", "tflite_runtime.interpreter"))
MODEL_SUFFIXES = (".tflite", ".onnx")
_ONNX_DTYPES = {"tensor(float)": "float32", "tensor(uint8)": "uint8", "tensor(int8)": "int8"}


class ModelError(ValueError):
    """A model file that cannot be opened or run; the message names the file and the fix."""


class RuntimeMissingError(ModelError):
    """No runtime for this kind of model is installed; the message says what to pip install."""


@dataclass(frozen=True)
class LatencyStats:
    """Latency of the bare invoke call over `runs` timed runs at a fixed batch size."""

    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    std_ms: float
    runs: int
    batch: int

    @classmethod
    def from_seconds(cls, seconds: List[float], batch: int) -> "LatencyStats":
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
        return cls(float(ms.mean()), p50, p90, p99, float(ms.std()), len(ms), batch)

    def to_dict(self) -> dict:
        return asdict(self)


def quantize(pixels: np.ndarray, dtype: str, scale: float, zero_point: int) -> np.ndarray:
    """Raw 0..255 pixels into the input dtype: float32 as-is, integers via q = round(x/scale + zp), clipped."""
    if dtype == "float32":
        return pixels.astype(np.float32)
    info = np.iinfo(dtype)
    values = pixels.astype(np.float32)
    if scale:
        values = np.round(values / np.float32(scale) + np.float32(zero_point))
    return np.clip(values, info.min, info.max).astype(dtype)


def dequantize(values: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Integer outputs back to float32 via (q - zp) * scale; float outputs pass through."""
    if values.dtype == np.float32 or not scale:
        return values.astype(np.float32)
    return ((values.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)).astype(np.float32)


class Runner:
    """One loaded artifact. Attributes: path, kind, runtime_name, runtime_version, input_shape (H, W, C),
    input_dtype, output_names, load_time_s, threads, xnnpack (None for ONNX), labels (embedded or None)."""

    path: Path
    kind: str
    runtime_name: str
    runtime_version: str
    input_shape: tuple
    input_dtype: str
    output_names: List[str]
    load_time_s: float
    threads: Optional[int]
    xnnpack: Optional[bool]
    labels: Optional[List[str]]

    def predict(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB -> (N, classes) float32 probabilities of the first output."""
        return self._run(images)[self.output_names[0]]

    def predict_all(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        """Every output (e.g. one per multi-task head) by name, dequantized to float32."""
        return self._run(images)

    def time_invoke(self, batch: int = 1, runs: int = 50, warmup: int = 5, seed: int = 0) -> LatencyStats:
        """Time only the runtime's invoke on a fixed random batch (no decoding, no conversion)."""
        if runs < 1 or warmup < 0 or batch < 1:
            raise ValueError(f"runs ({runs}) and batch ({batch}) must be >= 1 and warmup ({warmup}) >= 0")
        pixels = np.random.default_rng(seed).integers(0, 256, (batch,) + tuple(self.input_shape), dtype=np.uint8)
        invoke = self._prepare_invoke(pixels)
        for _ in range(warmup):
            invoke()
        seconds = []
        for _ in range(runs):
            start = time.perf_counter()
            invoke()
            seconds.append(time.perf_counter() - start)
        return LatencyStats.from_seconds(seconds, batch)

    def describe(self) -> dict:
        """The artifact facts a benchmark report records."""
        return {
            "path": str(self.path), "name": self.path.name, "size_bytes": self.path.stat().st_size,
            "kind": self.kind, "runtime": self.runtime_name, "runtime_version": self.runtime_version,
            "input_shape": list(self.input_shape), "input_dtype": self.input_dtype, "outputs": list(self.output_names),
        }

    def _run(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        raise NotImplementedError

    def _prepare_invoke(self, pixels: np.ndarray):
        raise NotImplementedError

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 4 and len(images) == 0:
            raise ValueError(f"{self.path.name}: no images to predict")
        if images.ndim != 4 or tuple(images.shape[1:]) != tuple(self.input_shape):
            raise ValueError(
                f"{self.path.name} expects images of shape (N, {', '.join(map(str, self.input_shape))}), "
                f"got {images.shape}; decode with size={self.input_shape[0]}"
            )
        return images


class TFLiteRunner(Runner):
    """A .tflite file on ai_edge_litert (or tflite_runtime); batch N via resize_tensor_input when allowed."""

    def __init__(self, path: Path, threads: Optional[int], xnnpack: bool):
        module, self.runtime_name, self.runtime_version = _import_tflite_runtime()
        kwargs = {"model_path": str(path), "num_threads": threads}
        if not xnnpack:
            resolver = getattr(module, "OpResolverType", None)
            if resolver is None:
                raise ModelError(
                    f"{self.runtime_name} {self.runtime_version} cannot turn XNNPACK off; "
                    "upgrade it or pass --xnnpack on"
                )
            kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        start = time.perf_counter()
        try:
            self._interp = module.Interpreter(**kwargs)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"{path}: {self.runtime_name} cannot load this model ({exc})") from None
        self.load_time_s = time.perf_counter() - start
        self.path, self.kind, self.threads, self.xnnpack = path, "tflite", threads, xnnpack
        inputs = self._interp.get_input_details()
        if len(inputs) != 1:
            raise ModelError(f"{path}: expected one image input, found {len(inputs)}")
        self._input = inputs[0]
        self.input_shape = tuple(int(d) for d in self._input["shape"][1:])
        self.input_dtype = np.dtype(self._input["dtype"]).name
        self._batch = int(self._input["shape"][0])
        self._resizable = int(self._input["shape_signature"][0]) == -1
        self._outputs = self._interp.get_output_details()
        names = self._signature_output_names()
        self.output_names = [names.get(d["index"], d["name"]) for d in self._outputs]
        self.labels = read_embedded_labels(path, self.output_names[0])

    def _signature_output_names(self) -> Dict[int, str]:
        """Tensor index -> name from the single signature (tensor names are opaque, e.g. StatefulPartitionedCall:1)."""
        signatures = self._interp.get_signature_list() if hasattr(self._interp, "get_signature_list") else {}
        if len(signatures) != 1:
            return {}
        details = self._interp.get_signature_runner(next(iter(signatures))).get_output_details()
        return {d["index"]: name for name, d in details.items()}

    def _set_batch(self, batch: int) -> None:
        if batch != self._batch:
            self._interp.resize_tensor_input(self._input["index"], [batch, *self.input_shape])
            self._interp.allocate_tensors()
            self._batch = batch

    def _quantized_input(self, images: np.ndarray) -> np.ndarray:
        scale, zero_point = self._input["quantization"]
        return quantize(images, self.input_dtype, scale, zero_point)

    def _prepare_invoke(self, pixels: np.ndarray):
        if not self._resizable and len(pixels) != self._batch:
            raise ValueError(f"{self.path.name} has a fixed batch size of {self._batch}; time it with batch={self._batch}")
        self._set_batch(len(pixels))
        self._interp.set_tensor(self._input["index"], self._quantized_input(pixels))
        return self._interp.invoke

    def _run(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        images = self._check_images(images)
        chunk = len(images) if self._resizable else self._batch
        parts: Dict[str, list] = {name: [] for name in self.output_names}
        for start in range(0, len(images), chunk):
            batch = images[start:start + chunk]
            self._set_batch(len(batch))
            self._interp.set_tensor(self._input["index"], self._quantized_input(batch))
            self._interp.invoke()
            for name, detail in zip(self.output_names, self._outputs):
                scale, zero_point = detail["quantization"]
                parts[name].append(dequantize(self._interp.get_tensor(detail["index"]), scale, zero_point))
        return {name: np.concatenate(chunks) for name, chunks in parts.items()}


class OnnxRunner(Runner):
    """A .onnx file on onnxruntime's CPU provider; intra-op threads set from `threads`."""

    def __init__(self, path: Path, threads: Optional[int]):
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeMissingError(f"no ONNX runtime installed: pip install onnxruntime (needed for {path.name})") from None
        self.runtime_name, self.runtime_version = "onnxruntime", ort.__version__
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.inter_op_num_threads = 1
        if threads:
            options.intra_op_num_threads = threads
        start = time.perf_counter()
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelError(f"{path}: onnxruntime cannot load this model ({exc})") from None
        self.load_time_s = time.perf_counter() - start
        self.path, self.kind, self.threads, self.xnnpack = path, "onnx", threads, None
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"{path}: expected one image input, found {len(inputs)}")
        self._input_name = inputs[0].name
        self.input_dtype = _ONNX_DTYPES.get(inputs[0].type, "")
        if not self.input_dtype:
            raise ModelError(f"{path}: unsupported input type {inputs[0].type} (expected float32, uint8 or int8)")
        dims = list(inputs[0].shape[1:])
        self._channels_first = len(dims) == 3 and dims[0] in (1, 3) and dims[2] not in (1, 3)
        if self._channels_first:
            dims = dims[1:] + dims[:1]
        if len(dims) != 3 or not all(isinstance(d, int) for d in dims):
            raise ModelError(f"{path}: input {inputs[0].name} has shape {inputs[0].shape}; need a fixed (N, H, W, C) image")
        self.input_shape = tuple(dims)
        self.output_names = [o.name for o in self._session.get_outputs()]
        self.labels = _parse_labels(self._session.get_modelmeta().custom_metadata_map.get("labels"))

    def _feed(self, pixels: np.ndarray) -> dict:
        values = quantize(pixels, self.input_dtype, 0.0, 0)
        if self._channels_first:
            values = np.ascontiguousarray(values.transpose(0, 3, 1, 2))
        return {self._input_name: values}

    def _prepare_invoke(self, pixels: np.ndarray):
        feed = self._feed(pixels)
        return lambda: self._session.run(None, feed)

    def _run(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        images = self._check_images(images)
        outputs = self._session.run(None, self._feed(images))
        return {name: dequantize(np.asarray(value), 0.0, 0) for name, value in zip(self.output_names, outputs)}


def open_model(path, threads: Optional[int] = None, xnnpack: bool = True) -> Runner:
    """Load a .tflite or .onnx artifact (picked by suffix) with `threads` CPU threads (None: runtime default)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    suffix = path.suffix.lower()
    if suffix == ".tflite":
        return TFLiteRunner(path, threads, xnnpack)
    if suffix == ".onnx":
        return OnnxRunner(path, threads)
    raise ModelError(f"{path}: unknown model type {suffix!r}; expected one of {', '.join(MODEL_SUFFIXES)}")


def read_embedded_labels(model_path, output_name: Optional[str] = None) -> Optional[List[str]]:
    """Labels from TFLite metadata: the associated files are a zip appended to the flatbuffer.

    edgetl.metadata stores `labels.txt` for a single output and `labels_<head>.txt` per head; any
    other model counts only if it carries exactly one .txt file.
    """
    try:
        with zipfile.ZipFile(model_path) as archive:
            names = archive.namelist()
            wanted = ["labels.txt"] + ([f"labels_{_file_stem(output_name)}.txt"] if output_name else [])
            texts = [n for n in names if n.lower().endswith(".txt")]
            entry = next((n for n in wanted if n in names), texts[0] if len(texts) == 1 else None)
            return _parse_labels(archive.read(entry).decode("utf-8")) if entry else None
    except (zipfile.BadZipFile, OSError):
        return None


def _file_stem(head: str) -> str:
    """An output name as edgetl.metadata spells it in label file names."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", head).strip("_.") or "output"


def model_labels(model_path, labels_file=None) -> Tuple[Optional[List[str]], Optional[str]]:
    """(class names, where they came from): `labels_file`, else the model's metadata, else labels.txt beside it."""
    if labels_file:
        if not Path(labels_file).is_file():
            raise ModelError(f"{labels_file}: labels file not found")
        return read_labels(labels_file) or None, str(labels_file)
    embedded = read_embedded_labels(model_path)
    if embedded:
        return embedded, "embedded"
    beside = Path(model_path).with_name("labels.txt")
    return (read_labels(beside) or None, str(beside)) if beside.is_file() else (None, None)


def peak_rss_mb() -> Optional[float]:
    """Peak resident memory of this process in MiB: VmHWM on Linux, else ru_maxrss (None if neither exists).

    VmHWM starts afresh at exec; ru_maxrss keeps the forking parent's peak across exec, so a worker
    started from a big process would report the parent's figure.
    """
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _parse_labels(text: Optional[str]) -> Optional[List[str]]:
    return parse_labels(text or "") or None


def _import_tflite_runtime():
    """(interpreter module, package name, version) of the first TFLite runtime that imports."""
    import importlib

    for package, module_name in TFLITE_RUNTIMES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        version = getattr(importlib.import_module(package), "__version__", "unknown")
        return module, package, version
    raise RuntimeMissingError(
        "no TFLite runtime installed: pip install ai-edge-litert (or tflite-runtime on older boards)"
    )

