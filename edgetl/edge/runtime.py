"""Run a .tflite or .onnx artifact on raw RGB images with whichever runtime is installed.

`open_model` hides the difference between ai_edge_litert / tflite_runtime, onnxruntime and OpenVINO
behind one `Runner`: feed uint8 pixels, get float probabilities back, time the bare invoke. Runtimes are
imported lazily so this module (and the on-device runner) never needs TensorFlow.
"""
from __future__ import annotations

import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from edgetl.errors import EdgetlError
from edgetl.io import embedded_labels_name, parse_labels, read_labels

TFLITE_RUNTIMES = (("ai_edge_litert", "ai_edge_litert.interpreter"), ("tflite_runtime", "tflite_runtime.interpreter"))
MODEL_SUFFIXES = (".tflite", ".onnx")
# "auto" runs .tflite on LiteRT and .onnx on ONNX Runtime; OpenVINO reads both kinds.
RUNTIMES = ("auto", "litert", "onnxruntime", "openvino")
_RUNTIME_SUFFIXES = {"litert": (".tflite",), "onnxruntime": (".onnx",), "openvino": MODEL_SUFFIXES}
ONNX_DTYPES = {"tensor(float)": "float32", "tensor(uint8)": "uint8", "tensor(int8)": "int8"}
INPUT_DTYPES = ("float32", "uint8", "int8")


class ModelError(EdgetlError, ValueError):
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


def image_input(pixels: np.ndarray, dtype: str) -> np.ndarray:
    """Raw 0..255 RGB pixels as an image input of `dtype` takes them: float32 as-is, integers as the camera byte.

    The contract for integer inputs: uint8 gets the byte itself and int8 the byte - 128, whatever the input's
    quantization. Its scale and zero point only say what the network reads the byte as, (q - zero_point) * scale:
    (1, 0) is the pixel (the preprocessing runs as ops in the model), (1/127.5, 127) the pixel already
    preprocessed as x / 127.5 - 1 (the quantization carries it, as in Google's reference MobileNetV2).
    TFLite Task Library and MediaPipe feed uint8 image inputs the same way.
    """
    if dtype == "float32":
        return pixels.astype(np.float32)
    values = np.clip(np.round(pixels.astype(np.float32)), 0, 255)
    return (values - 128 if dtype == "int8" else values).astype(dtype)


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

    def _check_timed_batch(self, fixed: Optional[int], batch: int) -> None:
        """Timing a batch other than a fixed batch dimension would time a model that does not exist."""
        if fixed is not None and batch != fixed:
            raise ValueError(f"{self.path.name} has a fixed batch size of {fixed}; time it with batch={fixed}")

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

    def _prepare_invoke(self, pixels: np.ndarray):
        self._check_timed_batch(None if self._resizable else self._batch, len(pixels))
        self._set_batch(len(pixels))
        self._interp.set_tensor(self._input["index"], image_input(pixels, self.input_dtype))
        return self._interp.invoke

    def _run(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        images = self._check_images(images)
        chunk = len(images) if self._resizable else self._batch
        parts: Dict[str, list] = {name: [] for name in self.output_names}
        for start in range(0, len(images), chunk):
            batch = images[start:start + chunk]
            self._set_batch(len(batch))
            self._interp.set_tensor(self._input["index"], image_input(batch, self.input_dtype))
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
        self.input_dtype = _check_input_dtype(path, ONNX_DTYPES.get(inputs[0].type, inputs[0].type))
        self.input_shape, self._channels_first = _image_layout(path, inputs[0].name, inputs[0].shape)
        self.output_names = [o.name for o in self._session.get_outputs()]
        self.labels = _parse_labels(self._session.get_modelmeta().custom_metadata_map.get("labels"))

    def _feed(self, pixels: np.ndarray) -> dict:
        values = image_input(pixels, self.input_dtype)
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


class OpenVinoRunner(Runner):
    """A .onnx or .tflite file read directly by OpenVINO and compiled for its CPU plugin (see `openvino_config`).

    A dynamic batch dimension is reshaped to the batch at hand and recompiled (once per new size, like
    LiteRT's resize); a fixed one is fed in chunks of that size. OpenVINO folds a .tflite's integer
    input/output quantization into its graph and names tensors, not signature outputs, so the scales and
    the output names come from the flatbuffer itself (`tflite_tensor_info`).
    """

    def __init__(self, path: Path, threads: Optional[int]):
        self._ov = _import_openvino()
        self.runtime_name, self.runtime_version = "openvino", self._ov.__version__.split("-")[0]
        self.path, self.kind, self.threads, self.xnnpack = path, path.suffix.lower()[1:], threads, None
        self._core, self._config = self._ov.Core(), openvino_config(threads)
        start = time.perf_counter()
        try:
            model = self._core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises a bare RuntimeError with a multi-line trace
            raise ModelError(f"{path}: openvino cannot load this model ({_first_line(exc)})") from None
        if len(model.inputs) != 1:
            raise ModelError(f"{path}: expected one image input, found {len(model.inputs)}")
        port = model.inputs[0]
        self.input_dtype = _check_input_dtype(path, port.get_element_type().to_dtype().name)
        dims = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
        self.input_shape, channels_first = _image_layout(path, port.get_any_name(), dims)
        self._batch = dims[0] if dims else None  # None: dynamic, reshaped per batch
        info = tflite_tensor_info(path) if self.kind == "tflite" else None
        integer = {t.get_element_type().to_dtype().name for t in [port, *model.outputs]} != {"float32"}
        if info is None and self.kind == "tflite" and integer:
            raise RuntimeMissingError(
                f"{path.name}: reading the input/output quantization of an integer .tflite for OpenVINO needs the "
                "TFLite schema: pip install ai-edge-litert")
        self._input_name = port.get_any_name()
        self._tensor_names = [o.get_any_name() for o in model.outputs]
        self._quantization = {name: info[name][1:] if info else (0.0, 0) for name in self._tensor_names}
        self.output_names = [info[name][0] if info else name for name in self._tensor_names]
        self.labels = (read_embedded_labels(path, self.output_names[0]) if self.kind == "tflite"
                       else _parse_labels(_rt_info_text(model, ["framework", "labels"])))
        self._model = self._nhwc(model) if channels_first else model
        self._compiled_batch, self._request = None, None
        self._request_for(self._batch or 1)
        self.load_time_s = time.perf_counter() - start

    def _nhwc(self, model):
        """Let OpenVINO transpose NHWC pixels into the NCHW model (fused into the compiled graph)."""
        ppp = self._ov.preprocess.PrePostProcessor(model)
        ppp.input().tensor().set_layout(self._ov.Layout("NHWC"))
        ppp.input().model().set_layout(self._ov.Layout("NCHW"))
        return ppp.build()

    def _request_for(self, batch: int):
        """The infer request of the model compiled for `batch` (a dynamic batch is reshaped and recompiled)."""
        if batch != self._compiled_batch:
            if self._batch is None:
                self._model.reshape({self._input_name: [batch, *self.input_shape]})
            try:
                compiled = self._core.compile_model(self._model, "CPU", self._config)
            except Exception as exc:
                raise ModelError(f"{self.path}: openvino cannot compile this model ({_first_line(exc)})") from None
            self._request, self._compiled_batch = compiled.create_infer_request(), batch
        return self._request

    def _feed(self, pixels: np.ndarray) -> np.ndarray:
        return image_input(pixels, self.input_dtype)

    def _prepare_invoke(self, pixels: np.ndarray):
        self._check_timed_batch(self._batch, len(pixels))
        request = self._request_for(len(pixels))
        request.set_input_tensor(self._ov.Tensor(self._feed(pixels)))
        return lambda: request.infer(share_outputs=True)

    def _run(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        images = self._check_images(images)
        chunk = self._batch or len(images)
        parts: Dict[str, list] = {name: [] for name in self.output_names}
        for start in range(0, len(images), chunk):
            batch = images[start:start + chunk]
            results = self._request_for(len(batch)).infer({0: self._feed(batch)}).to_tuple()
            for name, tensor, value in zip(self.output_names, self._tensor_names, results):
                parts[name].append(dequantize(np.asarray(value), *self._quantization[tensor]))
        return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def openvino_config(threads: Optional[int]) -> dict:
    """CPU plugin settings: one stream for one request at a time, `threads` threads, fp32 arithmetic.

    LATENCY is the hint for batch-1 requests issued one after another, which is what the other runners
    are timed on (THROUGHPUT splits the threads over parallel streams for async pipelines); an explicit
    INFERENCE_NUM_THREADS then fixes the thread count as for them. The precision is pinned to f32
    because on CPUs with AMX or AVX512_BF16 the plugin would otherwise run fp32 models in bf16, so an
    fp32 row would measure different arithmetic (and accuracy) than the file's.
    """
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


def resolve_runtime(path, runtime: str = "auto") -> str:
    """The runtime that runs `path`: `runtime`, or by suffix for "auto"; ModelError if it cannot read the file."""
    suffix = Path(path).suffix.lower()
    if runtime not in RUNTIMES:
        raise ModelError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    if suffix not in MODEL_SUFFIXES:
        raise ModelError(f"{path}: unknown model type {suffix!r}; expected one of {', '.join(MODEL_SUFFIXES)}")
    if runtime == "auto":
        return "litert" if suffix == ".tflite" else "onnxruntime"
    if suffix not in _RUNTIME_SUFFIXES[runtime]:
        readers = [name for name, suffixes in _RUNTIME_SUFFIXES.items() if suffix in suffixes]
        raise ModelError(f"{path}: {runtime} does not run {suffix} files; use --runtime {' or '.join(readers)}")
    return runtime


def open_model(path, threads: Optional[int] = None, xnnpack: bool = True, runtime: str = "auto") -> Runner:
    """Load a .tflite or .onnx artifact with `threads` CPU threads (None: runtime default) on `runtime`
    ("auto": LiteRT for .tflite, ONNX Runtime for .onnx; or "litert", "onnxruntime", "openvino")."""
    path = Path(path)
    chosen = resolve_runtime(path, runtime)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    if chosen == "litert":
        return TFLiteRunner(path, threads, xnnpack)
    if chosen == "onnxruntime":
        return OnnxRunner(path, threads)
    return OpenVinoRunner(path, threads)


def tflite_tensor_info(path) -> Optional[Dict[str, Tuple[str, float, int]]]:
    """Tensor name -> (signature name, scale, zero point) of a .tflite's inputs and outputs; None without the schema.

    The names are those of the single signature (as LiteRT's runner reports them), else the tensor's;
    scale 0.0 means a float tensor. The schema is the flatbuffer code that ships with ai-edge-litert.
    """
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        return None
    model = schema.Model.GetRootAs(Path(path).read_bytes(), 0)
    graph = model.Subgraphs(0)
    signature = {}
    if model.SignatureDefsLength() == 1:
        outputs = model.SignatureDefs(0)
        signature = {outputs.Outputs(i).TensorIndex(): outputs.Outputs(i).Name().decode("utf-8")
                     for i in range(outputs.OutputsLength())}
    info = {}
    for index in [*graph.InputsAsNumpy(), *graph.OutputsAsNumpy()]:
        tensor = graph.Tensors(int(index))
        name, quant = tensor.Name().decode("utf-8"), tensor.Quantization()
        scale = float(quant.Scale(0)) if quant is not None and quant.ScaleLength() else 0.0
        zero_point = int(quant.ZeroPoint(0)) if quant is not None and quant.ZeroPointLength() else 0
        info[name] = (signature.get(int(index), name), scale, zero_point)
    return info


def read_embedded_labels(model_path, output_name: Optional[str] = None) -> Optional[List[str]]:
    """Labels from TFLite metadata: the associated files are a zip appended to the flatbuffer.

    edgetl.export.metadata stores `labels.txt` for a single output and `labels_<head>.txt` per head; any
    other model counts only if it carries exactly one .txt file.
    """
    try:
        with zipfile.ZipFile(model_path) as archive:
            names = archive.namelist()
            wanted = ["labels.txt"] + ([embedded_labels_name(output_name)] if output_name else [])
            texts = [n for n in names if n.lower().endswith(".txt")]
            entry = next((n for n in wanted if n in names), texts[0] if len(texts) == 1 else None)
            return _parse_labels(archive.read(entry).decode("utf-8")) if entry else None
    except (zipfile.BadZipFile, OSError):
        return None


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


def _check_input_dtype(path: Path, dtype: str) -> str:
    if dtype not in INPUT_DTYPES:
        raise ModelError(f"{path}: unsupported input type {dtype} (expected {', '.join(INPUT_DTYPES)})")
    return dtype


def _image_layout(path: Path, name: str, shape) -> Tuple[tuple, bool]:
    """((H, W, C), channels_first) of an (N, H, W, C) or (N, C, H, W) input; ModelError unless H, W, C are fixed."""
    dims = list(shape[1:])
    channels_first = len(dims) == 3 and dims[0] in (1, 3) and dims[2] not in (1, 3)
    if channels_first:
        dims = dims[1:] + dims[:1]
    if len(dims) != 3 or not all(isinstance(d, int) for d in dims):
        raise ModelError(f"{path}: input {name} has shape {list(shape)}; need a fixed (N, H, W, C) image")
    return tuple(dims), channels_first


def _rt_info_text(model, key: List[str]) -> Optional[str]:
    """A string OpenVINO kept from the source model's metadata (ONNX metadata_props land under "framework")."""
    return str(model.get_rt_info(key).value) if model.has_rt_info(key) else None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _import_openvino():
    try:
        import openvino
    except ImportError:
        raise RuntimeMissingError("OpenVINO is not installed: pip install openvino (or edgetl[openvino])") from None
    return openvino


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

