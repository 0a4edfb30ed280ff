"""KServe Open Inference Protocol V2 (REST) messages: JSON tensors, the binary tensor data extension, classification.

Pure functions over bytes and NumPy arrays (no web framework), so the wire format is testable on its own and the
server and its tests agree on one encoding. A request that breaks the protocol raises `RequestError` (HTTP 400).
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from edgetl.errors import EdgetlError

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/octet-stream"
JSON_CONTENT_TYPE = "application/json"
DATATYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
_NUMPY_TO_DATATYPE = {np.dtype(v).name: k for k, v in DATATYPES.items()}
_LENGTH = struct.Struct("<I")  # BYTES elements: 4-byte little-endian length, then the bytes


class RequestError(EdgetlError):
    """A request the server refuses; `status` is the HTTP code, `headers` any extra response headers."""

    def __init__(self, message: str, status: int = 400, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class InferInput:
    """One input tensor: numeric data as an array of `shape`, or BYTES elements as a list of bytes."""

    name: str
    datatype: str
    shape: Tuple[int, ...]
    data: Union[np.ndarray, List[bytes]]


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client asked for: in binary or JSON, and as top-`classification` strings when > 0."""

    name: str
    binary: bool
    classification: int = 0


@dataclass(frozen=True)
class InferRequest:
    """A parsed infer request. `outputs` is None when the client asked for every output.

    `timeout_us` is the optional `parameters.timeout` (microseconds) that tritonclient sends.
    """

    id: Optional[str]
    inputs: Tuple[InferInput, ...]
    outputs: Optional[Tuple[RequestedOutput, ...]]
    binary_output: bool
    timeout_us: Optional[int]


def datatype_of(dtype) -> str:
    """The protocol datatype name of a NumPy dtype (FP32 for float32, ...)."""
    return _NUMPY_TO_DATATYPE[np.dtype(dtype).name]


def parse_infer_request(body: bytes, header_length: Optional[str] = None) -> InferRequest:
    """Parse an infer request body; `header_length` is the Inference-Header-Content-Length header, if sent."""
    if header_length is None:
        header, binary = body, b""
    else:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise RequestError(f"{HEADER_LENGTH} {header_length!r} is not a length within the {len(body)}-byte body")
        header, binary = body[:int(header_length)], body[int(header_length):]
    try:
        doc = json.loads(header)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise RequestError(f"request body is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise RequestError("request body must be a JSON object with an 'inputs' list")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise RequestError("'inputs' must be a non-empty list of tensors")
    parameters = _object(doc.get("parameters"), "parameters")
    offset = 0
    inputs = []
    for raw in raw_inputs:
        tensor, offset = _parse_input(raw, binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise RequestError(f"the binary section has {len(binary) - offset} bytes that no input's binary_data_size claims")
    binary_output = _boolean(parameters.get("binary_data_output", False), "parameters.binary_data_output")
    raw_outputs = doc.get("outputs")
    outputs = None
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise RequestError("'outputs' must be a list")
        outputs = tuple(_parse_output(raw, binary_output) for raw in raw_outputs)
    timeout = parameters.get("timeout")
    if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 0):
        raise RequestError(f"parameters.timeout must be microseconds >= 0, got {timeout!r}")
    request_id = doc.get("id")
    return InferRequest(None if request_id is None else str(request_id), tuple(inputs), outputs, binary_output, timeout)


def _parse_input(raw, binary: bytes, offset: int) -> Tuple[InferInput, int]:
    """One input tensor from its JSON and (binary extension) its slice of the binary section."""
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise RequestError("every input must be an object with a 'name'")
    name, datatype = raw["name"], raw.get("datatype")
    if datatype != "BYTES" and datatype not in DATATYPES:
        raise RequestError(f"input {name!r}: datatype {datatype!r} is not one of BYTES, {', '.join(DATATYPES)}")
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise RequestError(f"input {name!r}: shape must be a list of sizes >= 0, got {shape!r}")
    parameters = _object(raw.get("parameters"), f"input {name!r} parameters")
    count = math.prod(shape)
    size = parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            raise RequestError(f"input {name!r}: binary_data_size {size!r} overruns the {len(binary)}-byte binary section")
        chunk = binary[offset:offset + size]
        data = _bytes_from_binary(name, chunk, count) if datatype == "BYTES" else _array_from_binary(name, datatype, chunk, shape)
        return InferInput(name, datatype, tuple(shape), data), offset + size
    if "data" not in raw:
        raise RequestError(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    if datatype == "BYTES":
        data = _bytes_from_json(name, raw["data"], count, parameters.get("content_type"))
    else:
        data = _array_from_json(name, datatype, raw["data"], shape)
    return InferInput(name, datatype, tuple(shape), data), offset


def _array_from_binary(name: str, datatype: str, chunk: bytes, shape) -> np.ndarray:
    dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize
    if len(chunk) != expected:
        raise RequestError(f"input {name!r}: {len(chunk)} binary bytes for shape {shape} of {datatype} (expected {expected})")
    return np.frombuffer(chunk, dtype=dtype).reshape(shape)


def _array_from_json(name: str, datatype: str, data, shape) -> np.ndarray:
    """JSON numbers (flat row-major or nested) into `datatype`; integers must be whole and in range."""
    try:
        values = np.asarray(data)
    except ValueError as exc:  # ragged nesting
        raise RequestError(f"input {name!r}: data is not a regular array ({exc})") from None
    dtype = np.dtype(DATATYPES[datatype])
    kinds = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}[dtype.kind]
    if values.size and values.dtype.kind not in kinds:
        raise RequestError(f"input {name!r}: data of kind {values.dtype.name} does not fit datatype {datatype}")
    if values.size != math.prod(shape):
        raise RequestError(f"input {name!r}: {values.size} values do not fill shape {shape}")
    if dtype.kind in "iu" and values.size:
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise RequestError(f"input {name!r}: values outside {datatype}'s range {info.min}..{info.max}")
    return values.astype(dtype).reshape(shape)


def _bytes_from_binary(name: str, chunk: bytes, count: int) -> List[bytes]:
    """BYTES elements from the binary extension: each a 4-byte little-endian length, then its bytes."""
    items, pos = [], 0
    while pos < len(chunk):
        if pos + _LENGTH.size > len(chunk):
            raise RequestError(f"input {name!r}: BYTES element length cut off at byte {pos}")
        (length,) = _LENGTH.unpack_from(chunk, pos)
        pos += _LENGTH.size
        if pos + length > len(chunk):
            raise RequestError(f"input {name!r}: BYTES element of {length} bytes overruns its {len(chunk)}-byte buffer")
        items.append(chunk[pos:pos + length])
        pos += length
    if len(items) != count:
        raise RequestError(f"input {name!r}: {len(items)} BYTES elements for a shape of {count}")
    return items


def _bytes_from_json(name: str, data, count: int, content_type) -> List[bytes]:
    """BYTES elements from JSON strings: UTF-8 text, or base64 when parameters.content_type is "base64"."""
    flat = np.asarray(data, dtype=object).reshape(-1).tolist() if isinstance(data, list) else [data]
    if not all(isinstance(item, str) for item in flat):
        raise RequestError(f"input {name!r}: BYTES data must be strings")
    if len(flat) != count:
        raise RequestError(f"input {name!r}: {len(flat)} BYTES elements for a shape of {count}")
    if content_type != "base64":
        return [item.encode("utf-8") for item in flat]
    try:
        return [base64.b64decode(item, validate=True) for item in flat]
    except binascii.Error as exc:
        raise RequestError(f"input {name!r}: data is not base64 ({exc})") from None


def _parse_output(raw, binary_default: bool) -> RequestedOutput:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise RequestError("every requested output must be an object with a 'name'")
    parameters = _object(raw.get("parameters"), f"output {raw['name']!r} parameters")
    classes = parameters.get("classification", 0)
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 0:
        raise RequestError(f"output {raw['name']!r}: classification must be a count >= 0, got {classes!r}")
    binary = _boolean(parameters.get("binary_data", binary_default), f"output {raw['name']!r} binary_data")
    return RequestedOutput(raw["name"], binary, classes)


def _object(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(f"{what} must be a JSON object")
    return value


def _boolean(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise RequestError(f"{what} must be true or false, got {value!r}")
    return value


def classification(scores: np.ndarray, count: int, labels: Optional[Sequence[str]]) -> np.ndarray:
    """(N, classes) scores -> (N, k) BYTES "score:index[:label]" of the top k, as Triton's extension writes them."""
    k = min(count, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    rows = []
    for row, indices in zip(scores, order):
        rows.append([(f"{row[i]:f}:{i}" + (f":{labels[i]}" if labels and i < len(labels) else "")).encode("utf-8")
                     for i in indices])
    out = np.empty((len(rows), k), dtype=object)
    out[:] = rows
    return out


def serialize_bytes(items: Sequence[bytes]) -> bytes:
    """BYTES elements in the binary extension's layout (length-prefixed)."""
    return b"".join(_LENGTH.pack(len(item)) + item for item in items)


def encode_infer_response(model: str, version: str, request_id: Optional[str],
                          outputs: Sequence[Tuple[str, np.ndarray, bool]]) -> Tuple[bytes, Dict[str, str]]:
    """(body, headers) of an infer response; `outputs` are (name, array, binary). BYTES arrays hold bytes objects.

    With any binary output the body is the JSON header followed by the outputs' raw data in order, and the
    Inference-Header-Content-Length header says where the JSON ends.
    """
    described, chunks = [], []
    for name, array, binary in outputs:
        is_bytes = array.dtype == object
        entry = {"name": name, "datatype": "BYTES" if is_bytes else datatype_of(array.dtype), "shape": list(array.shape)}
        if binary:
            if is_bytes:
                raw = serialize_bytes(array.reshape(-1).tolist())
            else:
                raw = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            flat = array.reshape(-1).tolist()
            entry["data"] = [item.decode("utf-8") for item in flat] if is_bytes else flat
        described.append(entry)
    doc = {"model_name": model, "model_version": version, "outputs": described}
    if request_id is not None:
        doc["id"] = request_id
    header = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    if not chunks:
        return header, {"content-type": JSON_CONTENT_TYPE}
    return header + b"".join(chunks), {"content-type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(header))}
