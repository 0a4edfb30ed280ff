"""TensorFlow Lite Micro kit for a .tflite: measured tensor arena, op check, TFLM-vs-LiteRT run, op resolver, RAM/flash table.

Everything is measured with the `tflite-micro` Python package, whose interpreter is TFLM itself (its
reference kernels, built for this host):

- `find_arena`: the smallest arena TFLM can allocate the model in, by binary search on the interpreter's
  own allocation (an arena one alignment step smaller fails), then `margin` added and rounded up to 1 KiB.
  The margin is for what this host does not see: a Cortex-M build with CMSIS-NN kernels asks for kernel
  scratch buffers that the reference kernels do not, while 32-bit pointers make TFLM's own structs smaller
  than on this 64-bit host. Confirm on the board with `MicroInterpreter::arena_used_bytes()`.
- `check_ops`: every op of the model against TFLM's kernels, each missing one named with where it is and
  the fix; the interpreter's own verdict (it refuses a model with an op it has no kernel for) is final.
- `compare_with_litert`: the same images through TFLM and LiteRT, top-1 agreement and the largest output
  difference in quantization steps (a difference means the device would not behave like the validated file).
- `resolver_snippet`: a `tflite::MicroMutableOpResolver<N>` with exactly the model's ops (no AllOpsResolver,
  whose every kernel ends up in flash).
- `memory_table`: RAM (arena) and flash (model bytes, labels) with the total, against a budget.

`tflm_check` (arrays in, one dict out) is the API for other stages; `micro_report` is `edgetl embed --micro`.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from edgetl.errors import EdgetlError
from edgetl.io import atomic_write_text

DEFAULT_MARGIN = 0.10  # added to the measured minimum arena, then rounded up to ARENA_ROUNDING
ARENA_ROUNDING = 1024
ARENA_ALIGNMENT = 16  # TFLM aligns its arena to 16 bytes: the search resolution
MAX_ARENA = 256 * 1024 * 1024  # the search gives up above this
PROBE_TIMEOUT_S = 120  # one allocation try (a child process)
# The budget the README's MCU model is held to (an MCU with 1 MB flash and 512 KB of SRAM for the arena).
DEFAULT_FLASH_BUDGET = 1024 * 1024
DEFAULT_RAM_BUDGET = 512 * 1024
POINTER_BYTES = 4  # a Cortex-M pointer: each label costs one in the labels array

# What tflite::MicroMutableOpResolver can register: its Add<Op>() methods in tensorflow/tflite-micro
# tensorflow/lite/micro/micro_mutable_op_resolver.h (commit 90b983c, 2026-08-20; the kernels linked into the
# tflite-micro wheel are the same set). The interpreter is the final word; this list names every missing op
# at once, where the interpreter stops at the first.
TFLM_OPS = frozenset("""
Abs Add AddN ArgMax ArgMin AssignVariable AveragePool2D BatchMatMul BatchToSpaceNd BroadcastArgs BroadcastTo CallOnce
Cast Ceil CircularBuffer Concatenation Conv2D Cos CumSum Decode Delay DepthToSpace DepthwiseConv2D Dequantize
DetectionPostprocess Div DynamicUpdateSlice Elu EmbeddingLookup Energy Equal EthosU Exp ExpandDims FftAutoScale Fill
FilterBank FilterBankLog FilterBankSpectralSubtraction FilterBankSquareRoot Floor FloorDiv FloorMod Framer
FullyConnected Gather GatherNd Greater GreaterEqual HardSwish If Irfft L2Normalization L2Pool2D LeakyRelu Less
LessEqual Log LogSoftmax LogicalAnd LogicalNot LogicalOr Logistic MaxPool2D Maximum Mean Minimum MirrorPad Mul Neg
NotEqual OverlapAdd PCAN Pack Pad PadV2 Prelu Quantize ReadVariable ReduceAll ReduceMax ReduceMin Relu Relu6 Reshape
ResizeBilinear ResizeNearestNeighbor ReverseV2 Rfft Round Rsqrt SelectV2 Shape Sin Slice Softmax SpaceToBatchNd
SpaceToDepth Split SplitV Sqrt Square SquaredDifference Squeeze Stacker StridedSlice Sub Sum Svdf Tanh Transpose
TransposeConv UnidirectionalSequenceLSTM Unpack VarHandle While Window ZerosLike
""".split())

# Ops Keras layers commonly turn into that TFLM has no kernel for, with the layer to use instead.
_OP_FIXES = {
    "GELU": "use activation='relu', 'relu6' or 'hard_swish' (TFLM: AddRelu, AddRelu6, AddHardSwish)",
    "ATAN2": "compute it before the model, or approximate it with ops TFLM has (Mul, Add, Div, Logistic)",
    "POW": "use Mul for small integer powers, or Exp(Mul(Log(x), p))",
    "TOPK_V2": "take the top-k of the output in firmware instead of in the graph",
    "REDUCE_PROD": "use Exp(Sum(Log(x))) or compute it in firmware",
    "TILE": "use BroadcastTo (AddBroadcastTo) or Concatenation",
    "ONE_HOT": "feed the one-hot vector as an input, or use Gather",
    "RANGE": "make the range a constant of the model",
    "SELECT": "use SelectV2 (tf.where with broadcasting)",
}


class MicroError(EdgetlError, ValueError):
    """A model TFLM cannot run as asked (missing op, no arena size that allocates); the message says the fix."""


class TflmMissingError(MicroError):
    """The tflite-micro package (TFLM's Python interpreter) is not installed."""


def _runtime():
    """tflite_micro's interpreter module, imported only when needed."""
    try:
        from tflite_micro.python.tflite_micro import runtime
    except ImportError:
        raise TflmMissingError("the TFLM interpreter is not installed: pip install 'edgetl[micro]' "
                               "(or pip install tflite-micro)") from None
    return runtime


@contextlib.contextmanager
def _native_stderr() -> Iterator[list]:
    """Capture what native code writes to file descriptor 2 (TFLM reports through MicroPrintf there).

    Yields a list that holds the captured text once the block has exited.
    """
    captured: list = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))


# ---------------------------------------------------------------------------------------------------------
# Ops


@dataclass(frozen=True)
class OpUse:
    """One operator of the model: its TFLite name, how often it occurs, the first tensor it writes, and
    whether it computes in float (a float island in an integer graph, between DEQUANTIZE and QUANTIZE)."""

    name: str
    count: int
    first_output: str
    float_compute: bool


def _schema():
    from ai_edge_litert import schema_py_generated as schema

    return schema


def model_ops(data: bytes) -> list[OpUse]:
    """The distinct operators of a .tflite (every subgraph), in order of first use; custom ops by their code."""
    schema = _schema()
    model = schema.Model.GetRootAs(data, 0)
    builtin_names = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    float_types = {schema.TensorType.FLOAT32, schema.TensorType.FLOAT16}
    uses: dict[str, dict] = {}
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for i in range(graph.OperatorsLength()):
            op = graph.Operators(i)
            code = model.OperatorCodes(op.OpcodeIndex())
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            name = code.CustomCode().decode("utf-8") if code.CustomCode() else builtin_names.get(builtin, str(builtin))
            outputs = [int(t) for t in op.OutputsAsNumpy()] if op.OutputsLength() else []
            inputs = [int(t) for t in op.InputsAsNumpy() if t >= 0] if op.InputsLength() else []
            is_float = name not in ("QUANTIZE", "DEQUANTIZE") and any(
                graph.Tensors(t).Type() in float_types for t in inputs + outputs if not _is_constant(model, graph, t))
            entry = uses.setdefault(name, {"count": 0, "first_output": "", "float_compute": False})
            entry["count"] += 1
            if not entry["first_output"] and outputs:
                entry["first_output"] = graph.Tensors(outputs[0]).Name().decode("utf-8", "replace")
            entry["float_compute"] |= is_float
    return [OpUse(name, **entry) for name, entry in uses.items()]


def _is_constant(model, graph, index: int) -> bool:
    """A tensor with data in the model (weights, biases, shapes), not an activation."""
    buffer_index = graph.Tensors(index).Buffer()
    if buffer_index <= 0:
        return False
    buffer = model.Buffers(buffer_index)
    return buffer.DataLength() > 0 or buffer.Size() > 0


def resolver_method(op: str) -> str:
    """The MicroMutableOpResolver method that registers `op` (CONV_2D -> AddConv2D), by the rule of TFLM's
    own generator (tools/gen_micro_mutable_op_resolver); custom codes alike (ethos-u -> AddEthosU)."""
    method = ""
    for part in re.split(r"[_-]", op.replace("TFLite", "")):
        if len(part) > 1 and part[0].isalpha():
            method += part[0].upper() + part[1:].lower()
        else:
            method += part.upper()
    return "Add" + method.replace("Lstm", "LSTM").replace("BatchMatmul", "BatchMatMul")


def _fix_for(use: OpUse) -> str:
    specific = _OP_FIXES.get(use.name, f"replace the layer that makes {_layer_of(use)!r} with ops TFLM has")
    island = (" The converter left it in float inside the integer graph (no int8 kernel), so it would run in float "
              "on the device too." if use.float_compute else "")
    return (f"TFLM has no {use.name} kernel.{island} Fix: {specific}; or write the kernel and register it with "
            f"MicroMutableOpResolver::AddCustom.")


def _layer_of(use: OpUse) -> str:
    """The op's first output tensor name up to the first ';' (the converter joins the names of fused layers)."""
    return use.first_output.split(";")[0]


def _unsupported(ops: Sequence[OpUse], interpreter_message: str = "") -> list[dict]:
    """The ops TFLM cannot run: not in TFLM_OPS, or named by the interpreter's own error."""
    named = set(re.findall(r"Didn't find op for builtin opcode '([A-Za-z0-9_]+)'", interpreter_message))
    named |= set(re.findall(r"Failed to get registration from op code ([A-Za-z0-9_-]+)", interpreter_message))
    failed_prepare = set(re.findall(r"Node ([A-Za-z0-9_]+) \(number \d+\) failed to prepare", interpreter_message))
    rows = []
    for use in ops:
        missing = resolver_method(use.name)[3:] not in TFLM_OPS or use.name in named
        if missing:
            rows.append({"op": use.name, "count": use.count, "where": _layer_of(use), "fix": _fix_for(use)})
        elif use.name in failed_prepare:
            rows.append({"op": use.name, "count": use.count, "where": _layer_of(use),
                         "fix": f"TFLM has {use.name} but its kernel refused this use of it (see the interpreter "
                                f"message: usually a tensor type the kernel lacks); quantize the model fully "
                                f"(int8) or change the layer that makes {_layer_of(use)!r}."})
    return rows


def check_ops(data: bytes, interpreter_message: str = "") -> dict:
    """{"ops": [{op, count, method, float_compute}], "unsupported": [{op, count, where, fix}], "supported"}."""
    ops = model_ops(data)
    unsupported = _unsupported(ops, interpreter_message)
    return {"ops": [{"op": u.name, "count": u.count, "method": resolver_method(u.name),
                     "float_compute": u.float_compute} for u in ops],
            "unsupported": unsupported, "supported": not unsupported}


def _unsupported_error(data: bytes, message: str, source: str) -> MicroError:
    rows = check_ops(data, message)["unsupported"]
    lines = [f"  {r['op']} (x{r['count']}, at {r['where']}): {r['fix']}" for r in rows]
    detail = "\n".join(lines) if lines else f"  TFLM said: {message.strip()}"
    return MicroError(f"{source}: TFLM cannot run this model:\n{detail}")


# ---------------------------------------------------------------------------------------------------------
# Interpreter and arena


class _TooSmall(Exception):
    """The arena did not hold the model (TFLM's allocation failed)."""


# TFLM's words when the arena is too small; a kernel whose Prepare could not get memory then also says
# "failed to prepare", so these win over that (but never over a missing op).
_ALLOCATION_FAILURE = re.compile(r"Failed to (allocate|resize buffer)|Unable to allocate|"
                                 r"Failed starting model allocation|missing: \d+")


def _interpreter(data: bytes, arena_size: int, source: str):
    """A TFLM interpreter holding `data` in an arena of `arena_size` bytes; _TooSmall when it does not fit."""
    runtime = _runtime()
    with _native_stderr() as messages:
        try:
            return runtime.Interpreter.from_bytes(data, arena_size=int(arena_size))
        except RuntimeError as exc:
            error = exc
    text = messages[0] if messages else ""
    if _ALLOCATION_FAILURE.search(text) and "Didn't find op" not in text:
        raise _TooSmall(text)
    raise _unsupported_error(data, f"{error}\n{text}", source) from None


def allocates(data: bytes, arena_size: int, source: str = "model") -> bool:
    """Whether TFLM allocates the model in an arena of `arena_size` bytes (MicroError if it cannot run it at all).

    Each try runs in a child process: TFLM crashes (SIGSEGV) on some models when the arena is too small, e.g.
    MobileNetV2 at 224 px in 64 KiB, and a crash there counts as "does not fit" instead of killing edgetl.
    """
    import multiprocessing

    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_probe, args=(sender, data, int(arena_size), source), daemon=True)
    child.start()
    sender.close()
    try:
        outcome = receiver.recv() if receiver.poll(PROBE_TIMEOUT_S) else None
    except EOFError:  # the child died before it answered
        outcome = None
    child.join(PROBE_TIMEOUT_S)
    if child.is_alive():
        child.kill()
        child.join()
    if outcome is None:  # crashed (or hung) before it could answer
        return False
    kind, message = outcome
    if kind == "error":
        raise MicroError(message)
    return kind == "ok"


def _probe(sender, data: bytes, arena_size: int, source: str) -> None:
    """In a child process: try the allocation and send ("ok" | "small" | "error", message)."""
    try:
        _interpreter(data, arena_size, source)
        sender.send(("ok", ""))
    except _TooSmall as exc:
        sender.send(("small", str(exc)))
    except MicroError as exc:
        sender.send(("error", str(exc)))
    finally:
        sender.close()


def _recorded_allocation(interpreter) -> dict:
    """TFLM's RecordingMicroAllocator totals (bytes): total, head (non-persistent), tail (persistent)."""
    with _native_stderr() as messages:
        interpreter.print_allocations()
    found = dict(re.findall(r"Arena allocation (total|head|tail) (\d+) bytes", messages[0]))
    return {key: int(value) for key, value in found.items()}


@dataclass(frozen=True)
class Arena:
    """The measured arena: `minimum_bytes` allocates (one alignment step less fails), `arena_bytes` is what to
    use (minimum plus `margin`, rounded up to `rounding`), `recorded` is TFLM's own accounting at the minimum."""

    minimum_bytes: int
    arena_bytes: int
    margin: float
    rounding: int
    largest_failing_bytes: int
    probes: int
    recorded: dict
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def find_arena(data: bytes, margin: float = DEFAULT_MARGIN, source: str = "model") -> Arena:
    """Binary-search the smallest arena (to 16 bytes) in which TFLM allocates `data`, then check it invokes."""
    if margin < 0:
        raise MicroError(f"arena margin must be >= 0, got {margin}")
    start, probes = time.perf_counter(), 1
    low, high = 0, 64 * 1024  # low: known to fail (nothing fits in 0 bytes); high: to be shown to fit
    while not allocates(data, high, source):
        low, high, probes = high, high * 2, probes + 1
        if high > MAX_ARENA:
            raise MicroError(f"{source}: TFLM could not allocate it in {MAX_ARENA // 2**20} MiB; it is no "
                             f"microcontroller model")
    while high - low > ARENA_ALIGNMENT:
        middle = (low + high) // 2 // ARENA_ALIGNMENT * ARENA_ALIGNMENT
        probes += 1
        if allocates(data, middle, source):
            high = middle
        else:
            low = middle
    interpreter = _interpreter(data, high, source)
    _invoke_zeros(interpreter)
    recorded = _recorded_allocation(interpreter)
    arena = math.ceil(high * (1.0 + margin) / ARENA_ROUNDING) * ARENA_ROUNDING
    return Arena(high, arena, margin, ARENA_ROUNDING, low, probes, recorded, round(time.perf_counter() - start, 3))


def _invoke_zeros(interpreter) -> None:
    """One invoke on an all-zero input: the arena must hold a run, not only the allocation."""
    detail = interpreter.get_input_details(0)
    interpreter.set_input(np.zeros(detail["shape"], dtype=detail["dtype"]), 0)
    interpreter.invoke()


class TflmRunner:
    """A .tflite on the TFLM interpreter (batch 1, one image per invoke): uint8 RGB in, float probabilities out."""

    def __init__(self, data: bytes, arena_size: int, source: str = "model"):
        self._interp = _interpreter(data, arena_size, source)
        self._input = self._interp.get_input_details(0)
        self._output = self._interp.get_output_details(0)
        self.input_shape = tuple(int(d) for d in self._input["shape"][1:])
        self.invoke_seconds: list[float] = []

    def raw(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, classes) outputs in the model's own output type."""
        from edgetl.edge.runtime import image_input

        dtype = np.dtype(self._input["dtype"]).name
        rows = []
        for image in np.asarray(images):
            self._interp.set_input(image_input(image[None], dtype), 0)
            started = time.perf_counter()
            self._interp.invoke()
            self.invoke_seconds.append(time.perf_counter() - started)
            rows.append(np.array(self._interp.get_output(0)).reshape(-1))
        return np.stack(rows)

    def output_quantization(self) -> tuple[float, int]:
        """(scale, zero point) of the first output; (0.0, 0) when it is float."""
        quant = self._output["quantization_parameters"]
        if not len(quant["scales"]):
            return 0.0, 0
        return float(quant["scales"][0]), int(quant["zero_points"][0])

    def predict(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, classes) float32, dequantized like LiteRT's runner."""
        from edgetl.edge.runtime import dequantize

        scale, zero_point = self.output_quantization()
        return dequantize(self.raw(images), scale, zero_point)


def compare_with_litert(model_path: str | os.PathLike, images: np.ndarray, arena_size: int) -> dict:
    """Run `images` through TFLM and LiteRT; top-1 of each, agreement, and the largest output difference in
    output quantization steps. The two round requantization differently, which adds up with depth: 0 steps on
    the tiny test model, up to 9 (of 1/256) on the 50-layer flowers_micro model, whose top-1 agrees on 199/200."""
    from edgetl.edge.runtime import open_model

    path = Path(model_path)
    tflm = TflmRunner(path.read_bytes(), arena_size, str(path))
    litert = open_model(path, threads=1)
    tflm_probs = tflm.predict(images)
    litert_probs = litert.predict(images)
    scale, _ = tflm.output_quantization()
    difference = np.abs(tflm_probs.astype(np.float64) - litert_probs.astype(np.float64))
    steps = float(difference.max() / scale) if scale else None
    tflm_top1, litert_top1 = tflm_probs.argmax(axis=1), litert_probs.argmax(axis=1)
    host_ms = 1000.0 * np.median(tflm.invoke_seconds) if tflm.invoke_seconds else None
    return {"count": int(len(images)), "tflm_top1": tflm_top1.tolist(), "litert_top1": litert_top1.tolist(),
            "agreement": float(np.mean(tflm_top1 == litert_top1)),
            "max_abs_difference": float(difference.max()), "max_difference_steps": steps,
            "tflm_host_invoke_ms_p50": None if host_ms is None else round(float(host_ms), 3)}


# ---------------------------------------------------------------------------------------------------------
# Resolver and memory table


def resolver_snippet(ops: Sequence[str], name: str) -> str:
    """A C++ header registering exactly `ops` with a MicroMutableOpResolver sized to them."""
    methods = list(dict.fromkeys(resolver_method(op) for op in ops))
    guard = f"EDGETL_{name.upper()}_OP_RESOLVER_H_"
    lines = [
        f"// Generated by edgetl: the {len(methods)} op(s) of {name}, and no others (AllOpsResolver would link every",
        "// TFLM kernel into flash). Use: static auto resolver = " + f"{name}_op_resolver();",
        f"#ifndef {guard}",
        f"#define {guard}",
        "",
        '#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"',
        "",
        f"constexpr int {name}_num_ops = {len(methods)};",
        f"using {name}_OpResolver = tflite::MicroMutableOpResolver<{name}_num_ops>;",
        "",
        f"inline {name}_OpResolver {name}_op_resolver() {{",
        f"  {name}_OpResolver resolver;",
        *(f"  resolver.{method}();" for method in methods),
        "  return resolver;",
        "}",
        "",
        f"#endif  // {guard}",
        "",
    ]
    return "\n".join(lines)


def labels_bytes(labels: Sequence[str]) -> int:
    """Flash for the labels array of the C header: each string with its NUL, plus one 32-bit pointer each."""
    return sum(len(label.encode("utf-8")) + 1 + POINTER_BYTES for label in labels)


def memory_table(model_bytes: int, arena_bytes: int, labels: Sequence[str] = (),
                 flash_budget: int = DEFAULT_FLASH_BUDGET, ram_budget: int = DEFAULT_RAM_BUDGET) -> dict:
    """RAM/flash rows (bytes) with totals, and whether they fit the budgets. TFLM's own code and the kernels
    are not counted: they depend on the build (the resolver keeps them to the model's ops)."""
    label_bytes = labels_bytes(labels)
    rows = [{"item": "tensor arena (measured + margin)", "ram": arena_bytes, "flash": 0},
            {"item": "model (.tflite bytes)", "ram": 0, "flash": model_bytes},
            {"item": f"labels ({len(labels)})", "ram": 0, "flash": label_bytes}]
    ram, flash = arena_bytes, model_bytes + label_bytes
    return {"rows": rows, "total": {"ram": ram, "flash": flash},
            "budget": {"ram": ram_budget, "flash": flash_budget},
            "fits": {"ram": ram <= ram_budget, "flash": flash <= flash_budget,
                     "both": ram <= ram_budget and flash <= flash_budget},
            "not_counted": "TFLM runtime and kernel code (build-dependent), stack, the application"}


def _kib(n: int) -> str:
    return f"{n:,} B" if n < 1024 else f"{n / 1024:,.1f} KiB"


def format_table(table: dict) -> str:
    """The RAM/flash table as aligned text, with the verdict against the budget."""
    lines = [f"{'':<34} {'RAM':>12} {'flash':>12}"]
    for row in table["rows"]:
        lines.append(f"{row['item']:<34} {_kib(row['ram']) if row['ram'] else '-':>12} "
                     f"{_kib(row['flash']) if row['flash'] else '-':>12}")
    total, budget, fits = table["total"], table["budget"], table["fits"]
    lines.append(f"{'total':<34} {_kib(total['ram']):>12} {_kib(total['flash']):>12}")
    lines.append(f"{'budget':<34} {_kib(budget['ram']):>12} {_kib(budget['flash']):>12}")
    verdict = "fits" if fits["both"] else "DOES NOT FIT: " + ", ".join(
        f"{kind} over by {_kib(total[kind] - budget[kind])}" for kind in ("ram", "flash") if not fits[kind])
    lines.append(f"{'verdict':<34} {verdict}")
    lines.append(f"(not counted: {table['not_counted']})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The whole check


def tflm_check(model_path: str | os.PathLike, images: Optional[np.ndarray] = None,
               labels: Optional[Sequence[int]] = None, margin: float = DEFAULT_MARGIN) -> dict:
    """Op check, measured arena and, given images (N, H, W, 3 uint8), TFLM-vs-LiteRT agreement and, given their
    class indices, TFLM top-1 accuracy. Keys: ops, arena (Arena.to_dict()), flash_bytes (model file),
    comparison (or None), accuracy (or None), litert_accuracy, host_latency_note.

    Raises MicroError (naming each op TFLM lacks and the fix) when TFLM cannot run the model.
    """
    path = Path(model_path)
    data = path.read_bytes()
    ops = check_ops(data)
    if not ops["supported"]:
        raise _unsupported_error(data, "", str(path))
    arena = find_arena(data, margin, str(path))
    result = {"model": str(path), "ops": ops, "arena": arena.to_dict(), "flash_bytes": len(data),
              "comparison": None, "accuracy": None, "litert_accuracy": None,
              "host_latency_note": "tflm_host_invoke_ms_p50 is TFLM's reference kernels on this host, "
                                   "not a device latency"}
    if images is not None and len(images):
        comparison = compare_with_litert(path, images, arena.minimum_bytes)
        result["comparison"] = comparison
        if labels is not None:
            truth = np.asarray(labels)
            result["accuracy"] = float(np.mean(np.asarray(comparison["tflm_top1"]) == truth))
            result["litert_accuracy"] = float(np.mean(np.asarray(comparison["litert_top1"]) == truth))
    return result


def load_image_folder(folder: str | os.PathLike, class_names: Optional[Sequence[str]], size: int,
                      resize: str = "plain") -> tuple[np.ndarray, Optional[np.ndarray], list[dict]]:
    """(images uint8, class indices or None, skipped files) of a class-per-folder or flat images folder."""
    from edgetl.edge.evaluate import _class_index, collect_images
    from edgetl.edge.images import ImageError, decode_image

    layout, items = collect_images(folder)
    root = Path(folder)
    index = _class_index(root, items, list(class_names) if class_names else None) \
        if layout == "class_folders" else {}
    images, truth, skipped = [], [], []
    for rel, cls in items:
        try:
            images.append(decode_image(root / rel, size, resize))
        except ImageError as exc:
            skipped.append({"path": rel, "reason": exc.reason})
            continue
        truth.append(index.get(cls, -1) if index else -1)
    labels = np.asarray(truth) if index else None
    return np.stack(images) if images else np.empty((0, size, size, 3), np.uint8), labels, skipped


def micro_report(model_path: str | os.PathLike, images_dir: Optional[str | os.PathLike] = None,
                 resize: str = "plain", margin: float = DEFAULT_MARGIN, labels: Optional[Sequence[str]] = None,
                 flash_budget: int = DEFAULT_FLASH_BUDGET, ram_budget: int = DEFAULT_RAM_BUDGET) -> dict:
    """`edgetl embed --micro`: tflm_check on the images of `images_dir` (class folders scored against the
    model's labels) plus the RAM/flash table. `labels` default to the model's (metadata or labels.txt)."""
    from edgetl.edge.runtime import model_labels

    path = Path(model_path)
    if labels is None:
        labels = model_labels(path)[0] or []
    images = truth = None
    skipped: list = []
    if images_dir is not None:
        size = input_size(path)
        images, truth, skipped = load_image_folder(images_dir, labels, size, resize)
    result = tflm_check(path, images, truth, margin)
    result["images"] = None if images_dir is None else {"folder": str(images_dir), "resize": resize,
                                                        "skipped": skipped}
    result["labels"] = list(labels)
    result["memory"] = memory_table(result["flash_bytes"], result["arena"]["arena_bytes"], labels,
                                    flash_budget, ram_budget)
    return result


def input_size(path: Path) -> int:
    """The square input size of a .tflite's first input (from the flatbuffer, no interpreter)."""
    schema = _schema()
    graph = schema.Model.GetRootAs(path.read_bytes(), 0).Subgraphs(0)
    shape = graph.Tensors(int(graph.InputsAsNumpy()[0])).ShapeAsNumpy()
    return int(shape[1])



def write_resolver(path: str | os.PathLike, data: bytes, name: str) -> Path:
    """Write `resolver_snippet` for the ops of model bytes `data`, atomically."""
    return atomic_write_text(path, resolver_snippet([use.name for use in model_ops(data)], name))


def format_report(report: dict) -> str:
    """The human summary of `micro_report`: ops, arena, agreement, the RAM/flash table."""
    arena, ops = report["arena"], report["ops"]
    lines = [f"TFLM ops ({len(ops['ops'])}): " + ", ".join(f"{o['op']} x{o['count']}" for o in ops["ops"]),
             f"tensor arena: {arena['minimum_bytes']:,} bytes measured (TFLM recorded {arena['recorded'].get('total', 0):,};"
             f" {arena['largest_failing_bytes']:,} fails; {arena['probes']} probes, {arena['seconds']:.1f} s); "
             f"{arena['arena_bytes']:,} with a {arena['margin']:.0%} margin, rounded up to "
             f"{arena['rounding']} bytes"]
    comparison = report.get("comparison")
    if comparison:
        steps = comparison["max_difference_steps"]
        lines.append(f"TFLM vs LiteRT on {comparison['count']} images: top-1 agreement {comparison['agreement']:.2%}, "
                     f"largest output difference {'n/a' if steps is None else f'{steps:g} quantization step(s)'}")
        if report.get("accuracy") is not None:
            lines.append(f"top-1 accuracy: TFLM {report['accuracy']:.2%}, LiteRT {report['litert_accuracy']:.2%}")
        lines.append(f"TFLM invoke on this host (reference kernels, not a device latency): "
                     f"{comparison['tflm_host_invoke_ms_p50']} ms p50")
    lines.append(format_table(report["memory"]))
    return "\n".join(lines)
