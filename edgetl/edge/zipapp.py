"""Build the portable runner: one zipapp of `edgetl.edge` that runs as `python3 runner.pyz MODEL ...`.

The board needs only Python 3.8+, NumPy, Pillow and a runtime; the archive carries the edgetl code
(`edgetl/__init__.py`, `edgetl/rundir.py` for atomic writes, `edgetl/edge/*.py`) and nothing else.
`python3 runner.pyz serve TARGET...` runs the inference server (`edgetl.edge.serve`), which also needs
uvicorn, starlette and prometheus-client (`pip install uvicorn starlette prometheus-client httptools uvloop`;
httptools and uvloop are optional and triple the requests per second).
"""
from __future__ import annotations

import tempfile
import zipapp
from pathlib import Path

import edgetl
from edgetl.io import atomic_path

MIN_PYTHON = (3, 8)

# Plain old syntax on purpose: an old Python must get this message, not a SyntaxError.
MAIN = '''import sys
if sys.version_info < %r:
    sys.stderr.write("edgetl-bench: error: Python %%d.%%d is too old for the runner; it needs Python %d.%d or newer "
                     "(point --python at a newer interpreter)\\n" %% tuple(sys.version_info[:2]))
    sys.exit(3)
try:
    import numpy, PIL
except ImportError as exc:
    sys.stderr.write("edgetl-bench: error: %%s on this machine: pip install numpy pillow\\n" %% exc)
    sys.exit(3)
if sys.argv[1:2] == ["serve"]:
    from edgetl.edge.serve import main
    sys.exit(main(sys.argv[2:], prog="runner.pyz serve"))
from edgetl.edge.bench import main
sys.exit(main())
''' % (MIN_PYTHON, MIN_PYTHON[0], MIN_PYTHON[1])


def runner_sources() -> dict:
    """Archive name -> source file for everything the runner needs."""
    package = Path(edgetl.__file__).parent
    files = [package / "__init__.py", package / "io.py", package / "errors.py", *sorted((package / "edge").glob("*.py")),
             *sorted((package / "edge" / "serve").glob("*.py"))]
    return {path.relative_to(package.parent).as_posix(): path for path in files}


def build_runner(out_path) -> Path:
    """Write the runner zipapp to `out_path` atomically (executable, `#!/usr/bin/env python3`)."""
    out = Path(out_path)
    with tempfile.TemporaryDirectory() as staging:
        root = Path(staging)
        for name, source in runner_sources().items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(source.read_bytes())
        (root / "__main__.py").write_text(MAIN, encoding="utf-8")
        with atomic_path(out) as tmp:
            zipapp.create_archive(root, tmp, interpreter="/usr/bin/env python3", compressed=True)
            tmp.chmod(0o755)
    return out
