"""Run one function in a spawned process, its progress lines streamed back live, its result or error returned.

Pipeline stages and the groups of an export run this way so that the memory a stage or a fine-tune takes
(TensorFlow graphs, onnxruntime calibration buffers) goes back to the system when it ends, instead of piling up
in one process: peak memory is then that of the largest step, not of the whole run. The caller's `echo` stays in
the parent (it need not be picklable): the child's echo sends each line through a pipe.
"""
from __future__ import annotations

import multiprocessing
import traceback
from typing import Any, Callable

from edgetl.errors import EdgetlError


class ChildDied(EdgetlError, RuntimeError):
    """The child process ended without a result (killed, e.g. out of memory); the message says what to do."""


class ChildFailed(RuntimeError):
    """An unexpected exception of the child (a bug): its type, message and traceback are in the message."""


def run_in_child(function: Callable[..., Any], args: tuple, echo: Callable[[str], None], what: str) -> Any:
    """`function(*args, echo=<pipe echo>)` in a spawned process; returns its result or raises its exception.

    `function` and `args` must be picklable (module-level function, plain data); `what` names the work in the
    error raised when the process dies without answering.
    """
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(function, args, send))  # not daemonic: it may start its own
    process.start()
    send.close()  # the child holds the only sending end now: its exit ends recv() with EOFError
    try:
        while True:
            try:
                kind, payload = receive.recv()
            except EOFError:
                process.join()
                raise ChildDied(f"the process of {what} ended without finishing (exit code {process.exitcode}: "
                                f"killed, e.g. out of memory); run the same command again") from None
            if kind == "echo":
                echo(payload)
            elif kind == "result":
                return payload
            else:
                raise payload
    finally:
        receive.close()
        process.join()


def _child(function: Callable[..., Any], args: tuple, send) -> None:
    def echo(line: str) -> None:
        send.send(("echo", str(line)))

    try:
        send.send(("result", function(*args, echo=echo)))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent, which raises it
        send.send(("error", _sendable(exc)))
    finally:
        send.close()


def _sendable(exc: BaseException) -> BaseException:
    """An expected error (EdgetlError) as itself when it survives pickling; anything else, a bug, as a ChildFailed
    carrying the child's traceback, which would otherwise be lost on the way."""
    import pickle

    if isinstance(exc, EdgetlError):
        try:
            return pickle.loads(pickle.dumps(exc))
        except Exception:  # noqa: BLE001 - not picklable: described below instead
            pass
    return ChildFailed("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip())
