"""What a variant's builder receives (`Conversion`) and returns (`Built`): the contract between export and builders."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from edgetl.export.inputs import ExportInputs
    from edgetl.export.optimize import Prepared
    from edgetl.variants import Variant


@dataclass(frozen=True)
class Conversion:
    """What a builder converts: its row, the prepared Keras model and its converter input, the run's inputs."""

    variant: Variant
    source: Prepared  # the Keras model and what preparing it changed
    graph: Any  # the converter's input made from source.model by the row's `graph` function
    inputs: ExportInputs
    calibration: np.ndarray | None = None  # float32 (N,S,S,3) training images when the row calibrates
    bias_shifts: dict | None = None  # {Keras layer: its int8 bias correction} (edgetl.export.bias_correction)


@dataclass
class Built:
    """One converted artifact in memory, before it is checked and written."""

    data: bytes
    quantization: dict
    converter: str
    layers_left_float: list[str] = field(default_factory=list)
    sparsity: dict | None = None
    warnings: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)  # {path under exports/: bytes} written after the artifact
