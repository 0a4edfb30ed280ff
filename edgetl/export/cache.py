"""A small cache for what the variants of one export share: prepared models and their converter inputs."""
from __future__ import annotations

from typing import Any, Callable, TypeVar

T = TypeVar("T")


class Cache:
    """Each value is built once, on first use; a failed build is kept and raised again to every variant needing it.

    A QAT fine-tune that failed for tflite-qat_int8 is not run again for onnx-qat_int8. `prepare` is for the
    preparations that return (value, report): their reports are kept in `reports` for the manifest.
    """

    def __init__(self) -> None:
        self._built: dict[Any, tuple[Any, Exception | None]] = {}
        self.reports: dict[str, dict] = {}

    def get(self, key: Any, build: Callable[[], T]) -> T:
        if key not in self._built:
            try:
                self._built[key] = (build(), None)
            except Exception as exc:  # noqa: BLE001 - recorded per variant by the export stage
                self._built[key] = (None, exc)
        value, error = self._built[key]
        if error is not None:
            raise error
        return value

    def prepare(self, key: str, prepare: Callable[[], tuple[T, dict]]) -> T:
        """The value of a preparation returning (value, report), built once; its report lands in `reports[key]`."""

        def build() -> T:
            value, report = prepare()
            self.reports[key] = report
            return value

        return self.get(key, build)
