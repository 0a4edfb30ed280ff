"""`edgetl serve`: a TensorFlow-free inference server for exported models, speaking the Open Inference Protocol V2.

`main(argv)` is the command line shared by `edgetl serve`, `python -m edgetl.edge.serve` and the zipapp runner
(`python3 runner.pyz serve ...`); it needs uvicorn, starlette and prometheus-client (`pip install 'edgetl[serve]'`)
besides NumPy, Pillow and one runtime.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from edgetl.edge.images import RESIZE_MODES
from edgetl.edge.runtime import RUNTIMES

REQUIREMENTS = ("pip install 'edgetl[serve]' (or: pip install uvicorn starlette prometheus-client, "
                "plus httptools and uvloop for 3x the requests per second)")
EXIT_FAILED, EXIT_USAGE, EXIT_ENVIRONMENT = 1, 2, 3


def _count(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= {low}")
        return int(text)
    return parse


def _amount(positive: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number {'>' if positive else '>='} 0")
        return value
    return parse


def build_parser(prog: str = "edgetl serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Serve .tflite/.onnx models over the KServe Open Inference Protocol V2 (REST), "
        "the protocol of Triton and KServe; tritonclient[http] works against it unmodified.")
    parser.add_argument("targets", nargs="+", metavar="TARGET",
                        help="a .tflite/.onnx file, a run directory (every artifact in its exports/), or NAME=FILE; "
                             "the model name is the file's stem unless NAME= is given")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=_count(0), default=8000, help="TCP port (default 8000; 0 picks a free one)")
    parser.add_argument("--workers", type=_count(1), default=1,
                        help="worker threads per model, each with its own interpreter (default 1)")
    parser.add_argument("--threads", type=_count(1),
                        help="CPU threads per interpreter (default: CPU count / workers)")
    parser.add_argument("--max-batch", type=_count(1), default=2,
                        help="largest dynamic batch, for artifacts with a batch dimension (default 2; 1: off); a TFLite "
                             "worker keeps an interpreter per power-of-two batch size up to it")
    parser.add_argument("--max-delay-ms", type=_amount(False), default=0.0,
                        help="how long a worker waits for admitted requests still on their way to fill a batch "
                             "(default 0: it batches what is queued, as Triton's dynamic batcher does by default)")
    parser.add_argument("--max-queue", type=_count(0), default=16,
                        help="requests a model admits beyond those its workers compute; more get 503 (default 16)")
    parser.add_argument("--max-body-mb", type=_amount(True), default=8.0, help="largest request body (default 8)")
    parser.add_argument("--timeout-ms", type=_amount(True), default=10000.0,
                        help="deadline of a request from its arrival; past it, 503 (default 10000)")
    parser.add_argument("--api-key-file", help="require 'Authorization: Bearer KEY' with the key in this file "
                                               "(health probes stay open)")
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto",
                        help="engine for every model: auto (.tflite on LiteRT, .onnx on ONNX Runtime), litert, "
                             "onnxruntime or openvino")
    parser.add_argument("--resize", choices=RESIZE_MODES,
                        help="how encoded images are resized (default: the run's recipe via `edgetl serve`, else plain)")
    parser.add_argument("--cpu-policy", choices=("batch", "normal"), default="batch",
                        help="Linux scheduling policy of the server's threads: batch (default; SCHED_BATCH: a waking "
                             "thread does not preempt a running inference, +6-15 %% throughput on 2 busy cores) or "
                             "normal")
    parser.add_argument("--proxy-headers", action="store_true",
                        help="behind a reverse proxy on this machine: take the client address and scheme from its "
                             "X-Forwarded-For / X-Forwarded-Proto (trusted from 127.0.0.1 only)")
    parser.add_argument("--reload-interval", type=_amount(False), default=2.0,
                        help="seconds between checks for a replaced model file (default 2; 0 turns hot reload off)")
    return parser


def main(argv: Optional[Sequence[str]] = None, resize_of: Optional[Callable[[Path], str]] = None,
         prog: str = "edgetl serve") -> int:
    """Parse the command line and serve until SIGTERM; 0 ok, 1 bad target/model/address, 2 usage, 3 missing packages.

    `resize_of(model path)` gives the resize mode when --resize is not given (`edgetl serve` reads the run's recipe).
    """
    args = build_parser(prog).parse_args(argv)
    try:
        from edgetl.edge.serve.app import ServeOptions, serve
        from edgetl.edge.serve.batcher import BatchOptions
        from edgetl.edge.serve.models import parse_targets
    except ImportError as exc:
        print(f"{prog}: error: {exc}; {REQUIREMENTS}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        api_key = None
        if args.api_key_file:
            api_key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
            if not api_key:
                raise ValueError(f"{args.api_key_file}: the API key file is empty")
        specs = parse_targets(args.targets, args.resize, resize_of)
        options = ServeOptions(
            host=args.host, port=args.port, threads=args.threads or max(1, (os.cpu_count() or 1) // args.workers),
            runtime=args.runtime,
            batch=BatchOptions(workers=args.workers, max_batch=args.max_batch, max_delay_s=args.max_delay_ms / 1000,
                               max_queue=args.max_queue),
            max_body_bytes=int(args.max_body_mb * 2 ** 20), timeout_s=args.timeout_ms / 1000, api_key=api_key,
            reload_interval_s=args.reload_interval, proxy_headers=args.proxy_headers, cpu_policy=args.cpu_policy)
        return serve(specs, options, announce=lambda line: print(line, flush=True))
    except (ValueError, OSError) as exc:  # TargetError, ModelError (a ValueError), unreadable key, address in use
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 0
