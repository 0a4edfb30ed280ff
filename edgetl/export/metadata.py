"""TFLite Model Metadata: class names, input normalization and model info carried inside the .tflite file.

MediaPipe Tasks (Android, iOS, web, Python) and other TFLite tooling read it, so an app gets category
names and pixel preprocessing from the model file alone. The layout is metadata schema 1.0.0 (file
identifier "M001", the same as Google's published models): a ModelMetadata flatbuffer in the model buffer
named by Model.metadata "TFLITE_METADATA", and the label files it names in an uncompressed zip appended
to the model. tflite-support, which normally writes this, cannot be installed beside TensorFlow 2.21 and
mediapipe cannot be a dependency, so the few tables needed are built and read here with `flatbuffers`.
"""
from __future__ import annotations

import contextlib
import io
import os
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Mapping, Sequence, Union

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as tfl
from flatbuffers.table import Table

from edgetl.errors import EdgetlError
from edgetl.io import embedded_labels_name

METADATA_NAME = "TFLITE_METADATA"
_METADATA_IDENTIFIER = b"M001"
_MODEL_IDENTIFIER = b"TFL3"
# Every field written here exists since schema 1.0.0, so parsers from 1.0.0 on read all of it.
_MIN_PARSER_VERSION = "1.0.0"

# Enum values and union type tags from metadata_schema.fbs.
_TENSOR_AXIS_LABELS = 2  # AssociatedFileType
_RGB = 1  # ColorSpaceType
_FEATURE_PROPERTIES, _IMAGE_PROPERTIES = 1, 2  # ContentProperties union
_NORMALIZATION_OPTIONS = 1  # ProcessUnitOptions union

_TENSOR_TYPES = {tfl.TensorType.FLOAT32: "float32", tfl.TensorType.UINT8: "uint8", tfl.TensorType.INT8: "int8"}
_INT_RANGES = {tfl.TensorType.UINT8: (0.0, 255.0), tfl.TensorType.INT8: (-128.0, 127.0)}

Labels = Union[Sequence[str], Mapping[Union[int, str], Sequence[str]]]


class MetadataError(EdgetlError, ValueError):
    """The model or the metadata asked for is not valid (the message names what and how to fix it)."""


class NoMetadataError(MetadataError):
    """The model is a valid TFLite model without TFLite metadata."""


class MetadataWarning(UserWarning):
    """The metadata was written, but some consumers (MediaPipe) will misread the model."""


def add_metadata(
    tflite_bytes: bytes,
    *,
    labels: Labels,
    name: str,
    description: str,
    version: str,
    input_mean: Sequence[float] = (0.0,),
    input_std: Sequence[float] = (1.0,),
    author: str = "edgetl",
    license: str | None = None,
) -> bytes:
    """Return `tflite_bytes` with TFLite metadata and its label files; existing metadata is replaced.

    `labels`: one list of class names (single-output model, stored as `labels.txt`), or a dict
    {output index or output name: class names} for several heads (stored as `labels_<head>.txt`).
    `input_mean`/`input_std` (1 or 3 values) map 0..255 RGB pixels to the model input as
    (pixel - mean) / std; edgetl models take raw pixels, hence the defaults 0 and 1.
    """
    model = _read_model_object(tflite_bytes)
    subgraph = model.subgraphs[0]
    if len(subgraph.inputs) != 1:
        raise MetadataError(f"image models have one input tensor; this model has {len(subgraph.inputs)}")
    input_tensor = subgraph.tensors[subgraph.inputs[0]]
    mean, std = _normalization(input_mean, input_std)
    _check_input_quantization(input_tensor, mean, std)
    heads = _output_heads(model)
    label_files = _label_files(labels, heads, subgraph)

    metadata = _build_metadata(
        name=name, description=description, version=version, author=author, license=license,
        input_tensor=input_tensor, mean=mean, std=std, heads=heads, label_files=label_files,
    )
    _set_metadata_buffer(model, metadata)
    return _append_zip(_pack_model(model), {file: "\n".join(names) + "\n" for file, names in label_files.values()})


def name_outputs(tflite_bytes: bytes, names: Sequence[str]) -> bytes:
    """Put the output tensors in the order of the signature outputs `names` and name each tensor after its output.

    For a multi-output Keras model the converter orders the outputs by signature name and gives the
    tensors opaque names (StatefulPartitionedCall:1); afterwards they come in `names` order under those
    names, whichever API (signature runner or plain output details) reads them.
    """
    model = _read_model_object(tflite_bytes)
    subgraph = model.subgraphs[0]
    heads = _output_heads(model)
    if sorted(heads) != sorted(names):
        raise MetadataError(f"the model's outputs are {heads}, not {list(names)}")
    by_name = dict(zip(heads, subgraph.outputs))
    subgraph.outputs = [int(by_name[name]) for name in names]
    for name in names:
        subgraph.tensors[by_name[name]].name = name
    return _pack_model(model)


def read_metadata(tflite: bytes | str | os.PathLike) -> dict:
    """The metadata of a .tflite (bytes or path) as a JSON-ready dict; NoMetadataError if it has none.

    Keys: name, description, version, author, license, min_parser_version, input_mean, input_std,
    input_min, input_max (first input), labels (first output that has labels), outputs (per output
    tensor: name, label_file, labels) and associated_files (names in the appended zip).
    """
    is_path = isinstance(tflite, (str, os.PathLike))
    data, where = (Path(tflite).read_bytes(), str(tflite)) if is_path else (bytes(tflite), "the model")
    model = _read_model_object(data, where)
    with _damaged(where):
        raw = _metadata_buffer(model)
    if raw is None:
        raise NoMetadataError(
            f"{where} has no TFLite metadata (no 'TFLITE_METADATA' entry); add it with "
            f"edgetl.export.metadata.add_metadata"
        )
    if len(raw) < 8 or not flatbuffers.util.BufferHasIdentifier(raw, 0, _METADATA_IDENTIFIER):
        raise MetadataError(
            f"the TFLITE_METADATA buffer of {where} is not a metadata flatbuffer (identifier {raw[4:8]!r})"
        )
    with _damaged(where):
        return _read_tables(raw, _zip_files(data), where)


def _read_tables(raw: bytes, files: dict[str, bytes], where: str) -> dict:
    """The fields of read_metadata from the ModelMetadata flatbuffer `raw` and the associated `files`."""
    root = _Reader(raw, flatbuffers.encode.Get(flatbuffers.packer.uoffset, raw, 0))
    subgraphs = root.tables(3)
    inputs = subgraphs[0].tables(2) if subgraphs else []
    outputs = [_read_output(t, files, where) for t in (subgraphs[0].tables(3) if subgraphs else [])]
    norm = _find_normalization(inputs[0]) if inputs else None
    stats = inputs[0].table(5) if inputs else None
    return {
        "name": root.string(0),
        "description": root.string(1),
        "version": root.string(2),
        "author": root.string(4),
        "license": root.string(5),
        "min_parser_version": root.string(7),
        "input_mean": norm.floats(0) if norm else None,
        "input_std": norm.floats(1) if norm else None,
        "input_min": stats.floats(1) if stats else None,
        "input_max": stats.floats(0) if stats else None,
        "labels": next((o["labels"] for o in outputs if o["labels"] is not None), None),
        "outputs": outputs,
        "associated_files": sorted(files),
    }


# --- the TFLite model ---------------------------------------------------------------------------------

def _require_identifier(data: bytes, where: str) -> None:
    """Raise MetadataError unless `data` starts like a TFLite flatbuffer (identifier "TFL3")."""
    if len(data) < 8 or not flatbuffers.util.BufferHasIdentifier(data, 0, _MODEL_IDENTIFIER):
        raise MetadataError(f"{where} is damaged or not a TFLite model: the flatbuffer identifier 'TFL3' is missing")


def check_tflite(data: bytes, where: str = "the model") -> None:
    """Raise MetadataError unless `data` is a whole TFLite flatbuffer (every table and vector inside the file)."""
    _read_model_object(data, where)


def _read_model_object(tflite_bytes: bytes, where: str = "the model") -> tfl.ModelT:
    """The model as objects; reading every table finds the truncated and garbled files the identifier misses."""
    data = bytes(tflite_bytes)
    _require_identifier(data, where)
    with _damaged(where):
        model = tfl.ModelT.InitFromPackedBuf(data, 0)
    if any(b.offset for b in model.buffers or []):
        raise MetadataError(f"{where}: models that keep weights outside the flatbuffer (over 2 GB) are not supported")
    return model


@contextlib.contextmanager
def _damaged(where: str):
    """A flatbuffer read that runs off the data or finds nonsense (offsets, sizes, text) becomes a MetadataError."""
    try:
        yield
    except (struct.error, ValueError, TypeError, IndexError) as exc:  # UnicodeDecodeError is a ValueError
        if isinstance(exc, MetadataError):
            raise
        raise MetadataError(f"{where} is damaged or not a TFLite model: its flatbuffer cannot be read "
                            f"({type(exc).__name__}: {exc}); export it again, or copy the whole file") from exc


class _AlignedBuilder(flatbuffers.Builder):
    """Aligns byte vectors to 16 bytes: the TFLite schema asks this of Buffer.data (force_align: 16,
    which TensorFlow Lite Micro relies on) and the generated Python object API forgets it."""

    def CreateNumpyVector(self, x):
        if x.dtype == np.uint8:
            self.Prep(16, x.nbytes)
        return super().CreateNumpyVector(x)


def _pack_model(model: tfl.ModelT) -> bytes:
    builder = _AlignedBuilder(1024)
    builder.Finish(model.Pack(builder), file_identifier=_MODEL_IDENTIFIER)
    return bytes(builder.Output())


def _set_metadata_buffer(model: tfl.ModelT, metadata: bytes) -> None:
    """Point Model.metadata "TFLITE_METADATA" at a buffer holding `metadata`, reusing an existing one."""
    buffer = tfl.BufferT()
    buffer.data = np.frombuffer(metadata, dtype=np.uint8)
    model.metadata = model.metadata or []
    entry = next((m for m in model.metadata if _text(m.name) == METADATA_NAME), None)
    if entry is None:
        entry = tfl.MetadataT()
        entry.name = METADATA_NAME
        entry.buffer = len(model.buffers)
        model.buffers.append(buffer)
        model.metadata.append(entry)
    else:
        model.buffers[entry.buffer] = buffer


def _metadata_buffer(model: tfl.ModelT) -> bytes | None:
    for entry in model.metadata or []:
        if _text(entry.name) == METADATA_NAME:
            data = model.buffers[entry.buffer].data
            return b"" if data is None else np.asarray(data, dtype=np.uint8).tobytes()
    return None


def _output_heads(model: tfl.ModelT) -> list[str]:
    """A name per output tensor: the signature's output name (the Keras output), else the tensor name."""
    subgraph = model.subgraphs[0]
    by_tensor = {}
    for signature in model.signatureDefs or []:
        if signature.subgraphIndex == 0:
            by_tensor.update({m.tensorIndex: _text(m.name) for m in signature.outputs or []})
    return [by_tensor.get(t, _text(subgraph.tensors[t].name)) for t in subgraph.outputs]


def _label_files(labels: Labels, heads: list[str], subgraph: tfl.SubGraphT) -> dict[int, tuple[str, list[str]]]:
    """{output position: (label file name, class names)}, checked against the output tensor shapes."""
    if isinstance(labels, Mapping):
        files = {}
        for key, names in labels.items():
            pos = _output_position(key, heads, subgraph)
            files[pos] = (embedded_labels_name(heads[pos]), list(names))
    elif isinstance(labels, str) or len(heads) != 1:
        raise MetadataError(
            f"labels must be a list of class names for a single-output model, or a dict "
            f"{{output name or index: class names}}; the model's outputs are {heads}"
        )
    else:
        files = {0: ("labels.txt", list(labels))}
    for pos, (_, names) in files.items():
        bad = [n for n in names if not isinstance(n, str) or not n.strip() or "\n" in n or "\r" in n]
        if bad:
            raise MetadataError(
                f"class names for output {heads[pos]!r} must be non-empty one-line strings; got {bad!r}"
            )
        classes = int(subgraph.tensors[subgraph.outputs[pos]].shape[-1])
        if len(names) != classes:
            raise MetadataError(
                f"{len(names)} class names given for output {heads[pos]!r}, which has {classes} classes"
            )
    if len({file for file, _ in files.values()}) != len(files):
        raise MetadataError(f"output names {heads} give clashing label file names")
    return files


def _output_position(key: int | str, heads: list[str], subgraph: tfl.SubGraphT) -> int:
    if isinstance(key, int) and 0 <= key < len(heads):
        return key
    tensor_names = [_text(subgraph.tensors[t].name) for t in subgraph.outputs]
    for names in (heads, tensor_names):
        if key in names:
            return names.index(key)
    raise MetadataError(f"labels key {key!r} is not an output of the model; outputs: {heads} (or 0..{len(heads) - 1})")


def _normalization(mean: Sequence[float], std: Sequence[float]) -> tuple[list[float], list[float]]:
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) not in (1, 3) or len(mean) != len(std):
        raise MetadataError(f"input_mean and input_std need 1 or 3 values each; got {mean} and {std}")
    if any(s == 0 for s in std):
        raise MetadataError(f"input_std must not contain 0; got {std}")
    return mean, std


def _check_input_quantization(tensor: tfl.TensorT, mean: list[float], std: list[float]) -> None:
    """Warn when MediaPipe, which feeds raw pixels to integer inputs, would not give the model what it expects."""
    if tensor.type == tfl.TensorType.INT8:
        warnings.warn("the model input is int8: MediaPipe Tasks accept only uint8 or float32 image inputs",
                      MetadataWarning, stacklevel=3)
    quant = tensor.quantization
    if tensor.type != tfl.TensorType.UINT8 or quant is None or quant.scale is None or len(quant.scale) == 0:
        return
    scale, zero_point = float(quant.scale[0]), float(quant.zeroPoint[0])
    # The model sees scale * (pixel - zero_point) and expects (pixel - mean) / std, at pixels 0 and 255.
    errors = [abs(scale * (p - zero_point) - (p - m) / s) * abs(s) / 255.0 for p in (0, 255) for m, s in zip(mean, std)]
    if max(errors) > 0.01:
        warnings.warn(
            f"the uint8 input is quantized with scale {scale:.6g} and zero point {zero_point:g}, but pixels "
            f"normalized with mean {mean} and std {std} need scale {1 / std[0]:.6g} and zero point {mean[0]:g}: "
            f"apps that feed raw pixels (MediaPipe) will be off by up to {100 * max(errors):.1f}% of the range. "
            f"Calibrate with representative images that span pixel values 0..255.",
            MetadataWarning, stacklevel=3,
        )


def _append_zip(model: bytes, files: dict[str, str]) -> bytes:
    """Append the associated files as a stored (uncompressed) zip, as MediaPipe and tflite-support read them."""
    stream = io.BytesIO(model)
    with zipfile.ZipFile(stream, "a", compression=zipfile.ZIP_STORED) as archive:
        for name, text in files.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), text.encode("utf-8"))
    return stream.getvalue()


def _zip_files(data: bytes) -> dict[str, bytes]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return {info.filename: archive.read(info) for info in archive.infolist()}
    except zipfile.BadZipFile:
        return {}


def _text(value: bytes | str | None) -> str | None:
    return value.decode("utf-8") if isinstance(value, bytes) else value


# --- the metadata flatbuffer (tables and field slots of metadata_schema.fbs) -------------------------

def _build_metadata(
    *, name, description, version, author, license, input_tensor, mean, std, heads, label_files
) -> bytes:
    """The ModelMetadata flatbuffer: image input with normalization and stats, label files per output."""
    b = flatbuffers.Builder(1024)
    if input_tensor.type in _INT_RANGES:  # the stored values' range
        low, high = ([v] for v in _INT_RANGES[input_tensor.type])
    else:  # float input: the range of normalized 0..255 pixels
        low = [(0.0 - m) / s for m, s in zip(mean, std)]
        high = [(255.0 - m) / s for m, s in zip(mean, std)]
    input_type = _TENSOR_TYPES.get(input_tensor.type, "other")
    image = _tensor_metadata(
        b,
        name="image",
        description=f"RGB image, {input_type}; pixels 0..255 are normalized as (pixel - mean) / std.",
        content=_table(b, {1: _table(b, {}, {0: _RGB})}, {0: _IMAGE_PROPERTIES}),
        process_units=[
            _table(b, {1: _table(b, {0: _floats(b, mean), 1: _floats(b, std)})}, {0: _NORMALIZATION_OPTIONS})
        ],
        stats=_table(b, {0: _floats(b, high), 1: _floats(b, low)}),
    )
    outputs = []
    for pos, head in enumerate(heads):
        files = []
        if pos in label_files:
            file, names = label_files[pos]
            files.append(_table(
                b,
                {0: b.CreateString(file), 1: b.CreateString("Class names, one per line, in output index order.")},
                {2: _TENSOR_AXIS_LABELS},
            ))
        outputs.append(_tensor_metadata(
            b,
            name="probability" if len(heads) == 1 else head,
            description="Class probabilities." if len(heads) == 1 else f"Class probabilities of head {head!r}.",
            content=_table(b, {1: _table(b, {})}, {0: _FEATURE_PROPERTIES}),
            associated_files=files,
        ))
    subgraph = _table(b, {2: _offsets(b, [image]), 3: _offsets(b, outputs)})
    root = _table(b, {
        0: b.CreateString(name),
        1: b.CreateString(description),
        2: b.CreateString(version),
        3: _offsets(b, [subgraph]),
        4: b.CreateString(author) if author else None,
        5: b.CreateString(license) if license else None,
        7: b.CreateString(_MIN_PARSER_VERSION),
    })
    b.Finish(root, file_identifier=_METADATA_IDENTIFIER)
    return bytes(b.Output())


def _tensor_metadata(b, *, name, description, content, process_units=(), stats=None, associated_files=()) -> int:
    return _table(b, {
        0: b.CreateString(name),
        1: b.CreateString(description),
        3: content,
        4: _offsets(b, process_units) if process_units else None,
        5: stats,
        6: _offsets(b, associated_files) if associated_files else None,
    })


def _table(b: flatbuffers.Builder, offsets: dict[int, int | None], bytes_: dict[int, int] | None = None) -> int:
    """Write a table: `offsets` maps field slots to already-built strings/tables/vectors, `bytes_` to enum bytes."""
    bytes_ = bytes_ or {}
    b.StartObject(max([*offsets, *bytes_], default=-1) + 1)
    for slot, offset in offsets.items():
        if offset is not None:
            b.PrependUOffsetTRelativeSlot(slot, offset, 0)
    for slot, value in bytes_.items():
        b.PrependUint8Slot(slot, value, 0)
    return b.EndObject()


def _offsets(b: flatbuffers.Builder, items: Sequence[int]) -> int:
    b.StartVector(4, len(items), 4)
    for item in reversed(items):
        b.PrependUOffsetTRelative(item)
    return b.EndVector()


def _floats(b: flatbuffers.Builder, values) -> int:
    return b.CreateNumpyVector(np.asarray(values, dtype=np.float32))


class _Reader:
    """Reads fields of one metadata table by slot number."""

    def __init__(self, buf: bytes, pos: int):
        self._t = Table(buf, pos)

    def _at(self, slot: int) -> int:
        return self._t.Offset(4 + 2 * slot)

    def string(self, slot: int) -> str | None:
        o = self._at(slot)
        return self._t.String(o + self._t.Pos).decode("utf-8") if o else None

    def byte(self, slot: int) -> int:
        o = self._at(slot)
        return self._t.Get(flatbuffers.number_types.Uint8Flags, o + self._t.Pos) if o else 0

    def table(self, slot: int) -> _Reader | None:
        o = self._at(slot)
        return _Reader(self._t.Bytes, self._t.Indirect(o + self._t.Pos)) if o else None

    def tables(self, slot: int) -> list[_Reader]:
        o = self._at(slot)
        if not o:
            return []
        start = self._t.Vector(o)
        return [_Reader(self._t.Bytes, self._t.Indirect(start + 4 * i)) for i in range(self._t.VectorLen(o))]

    def floats(self, slot: int) -> list[float] | None:
        o = self._at(slot)
        return self._t.GetVectorAsNumpy(flatbuffers.number_types.Float32Flags, o).tolist() if o else None


def _find_normalization(tensor: _Reader) -> _Reader | None:
    """The NormalizationOptions of a TensorMetadata's process units, if any."""
    for unit in tensor.tables(4):
        if unit.byte(0) == _NORMALIZATION_OPTIONS:
            return unit.table(1)
    return None


def _read_output(tensor: _Reader, files: dict[str, bytes], where: str) -> dict:
    label_file = next((f.string(0) for f in tensor.tables(6) if f.byte(2) == _TENSOR_AXIS_LABELS), None)
    labels = None
    if label_file is not None:
        if label_file not in files:
            raise MetadataError(f"{where} is damaged or incomplete: its metadata names label file {label_file!r}, "
                                f"but the zip appended to the model does not hold it (a truncated copy?)")
        labels = [line for line in files[label_file].decode("utf-8").splitlines() if line]
    return {"name": tensor.string(0), "label_file": label_file, "labels": labels}
