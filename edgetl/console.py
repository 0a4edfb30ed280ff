"""What a command shows on the terminal: TensorFlow's native start-up lines are filtered out unless asked for.

TensorFlow and XLA log through absl before any Python code can configure them ("oneDNN custom operations
are on", "Could not find cuda drivers", cuInit errors), so `TF_CPP_MIN_LOG_LEVEL` cannot silence them. The
CLI routes file descriptor 2 through a filter instead; worker processes inherit it, so their noise goes too.
"""
from __future__ import annotations

import atexit
import os
import re
import threading

# absl's native line format (I/W/E + MMDD time thread file:line]), TensorFlow's Python-logging prefixes, and the
# TFLite converter's and interpreter's own printf lines.
NOISE = re.compile(rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
                   rb"|[IWE]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [\w.]+:\d+\] "
                   rb"|WARNING:(tensorflow|absl):"
                   rb"|fully_quantize: \d|INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.)")


def drop_noise(data: bytes) -> bytes:
    """`data` (whole lines) without TensorFlow's native and Python log lines."""
    return b"".join(line for line in data.splitlines(keepends=True) if not NOISE.match(line))


def filter_native_stderr() -> None:
    """Route this process's fd 2 (and its children's) through a thread that drops TensorFlow's log lines.

    Partial lines wait for their newline; at exit fd 2 is restored and whatever is left is written out.
    """
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        pending = b""
        while chunk := os.read(read_end, 65536):
            pending += chunk
            cut = pending.rfind(b"\n") + 1
            if cut:
                os.write(real, drop_noise(pending[:cut]))
                pending = pending[cut:]
        if pending:
            os.write(real, drop_noise(pending))
        os.close(read_end)

    thread = threading.Thread(target=pump, name="edgetl-stderr-filter", daemon=True)
    thread.start()

    def restore() -> None:
        import sys

        sys.stderr.flush()
        os.dup2(real, 2)  # closes the pipe's last write end held by this process: the pump sees EOF
        thread.join(timeout=2.0)

    atexit.register(restore)
