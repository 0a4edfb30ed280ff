"""Benchmark on a device over SSH: ship model, labels and runner to a temp folder there, run, bring the JSON back.

One `ssh` call (the system client, so the user's keys, agent and config apply, in batch mode) streams a
tar of the files to a `mktemp -d` folder, runs the zipapp runner, prints its JSON and removes the
folder; the device needs only `sh`, `mktemp`, `tar` and Python, no SFTP server. Every failure becomes
a `RemoteError` with a one-line cause.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional, Sequence

from edgetl.edge.bench import EXIT_ENVIRONMENT, BenchOptions, format_table
from edgetl.edge.zipapp import build_runner
from edgetl.errors import EdgetlError

SSH_FAILED = 255  # ssh's own exit status for connection and authentication failures
NOT_FOUND = 127  # the shell's status for a command it cannot find
NO_TEMP_DIR, NO_UNPACK, NO_CLEANUP = 90, 91, 92  # statuses of the device-side script below
DIR_MARKER = "edgetl-remote-dir: "
_TARGET = re.compile(r"^(?:(?P<user>[^@\s]+)@)?(?:\[(?P<ipv6>[^\]]+)\]|(?P<host>[^:@\s\[\]]+))(?::(?P<port>\d+))?$")


class RemoteError(EdgetlError, RuntimeError):
    """A remote benchmark that failed; the message is one line naming the cause and the fix."""


@dataclass(frozen=True)
class Target:
    """`user@host[:port]` (IPv6 as `user@[::1]:port`)."""

    host: str
    user: Optional[str] = None
    port: Optional[int] = None

    @classmethod
    def parse(cls, text: str) -> "Target":
        match = _TARGET.match(text.strip())
        if not match:
            raise RemoteError(f"{text!r} is not a remote target; use user@host or user@host:port")
        port = int(match["port"]) if match["port"] else None
        return cls(host=match["ipv6"] or match["host"], user=match["user"], port=port)

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        return self.destination + (f":{self.port}" if self.port else "")


@dataclass(frozen=True)
class Connection:
    """How to reach the device: target, identity file, extra ssh options, connect timeout (seconds)."""

    target: Target
    identity: Optional[str] = None
    ssh_options: Sequence[str] = ()
    connect_timeout: int = 10

    def argv(self, command: str) -> List[str]:
        """ssh in batch mode (never prompts), accepting a new host key but never a changed one."""
        args = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new",
                "-o", f"ConnectTimeout={self.connect_timeout}", *self.ssh_options]
        args += ["-i", str(self.identity)] if self.identity else []
        args += ["-p", str(self.target.port)] if self.target.port else []
        return args + [self.target.destination, command]


def run_remote(model_path, target: str, options: BenchOptions = BenchOptions(), identity: Optional[str] = None,
               python: str = "python3", ssh_options: Sequence[str] = (), connect_timeout: int = 10,
               timeout_s: float = 900.0) -> dict:
    """Run edgetl-bench on `target` with `python` there and return its JSON document (plus a "remote" section).

    Copies the model, its labels (`options.labels`, else labels.txt beside the model), `options.images`
    and the runner. `ssh_options` are extra ssh arguments (e.g. ["-o", "UserKnownHostsFile=..."]).
    The device's temp folder is removed whether the run succeeds or not.
    """
    model = Path(model_path)
    labels = Path(options.labels) if options.labels else model.with_name("labels.txt")
    if not model.is_file():
        raise RemoteError(f"{model}: model file not found")
    if options.labels and not labels.is_file():
        raise RemoteError(f"{labels}: labels file not found")
    if options.images and not Path(options.images).is_dir():
        raise RemoteError(f"{options.images}: images folder not found")
    conn = Connection(Target.parse(target), identity, tuple(ssh_options), connect_timeout)
    device_options = replace(options, labels="labels.txt" if labels.is_file() else None,
                             images="images" if options.images else None)
    with tempfile.TemporaryDirectory(prefix="edgetl-remote.") as local:
        bundle = Path(local) / "bundle.tar"
        with tarfile.open(bundle, "w") as tar:
            tar.add(build_runner(Path(local) / "runner.pyz"), "runner.pyz")
            tar.add(model, model.name)
            if labels.is_file():
                tar.add(labels, "labels.txt")
            if options.images:
                tar.add(options.images, "images")
        script = _device_script([python, "runner.pyz", model.name, "--json", "result.json", *device_options.to_args()])
        with open(bundle, "rb") as stdin:
            result, remote_dir = _ssh(conn, script, stdin, timeout_s)
    if result.returncode != 0:
        raise RemoteError(_failure(conn.target, python, result))
    try:
        doc = json.loads(result.stdout)
    except ValueError:
        raise RemoteError(f"{conn.target}: the runner printed no JSON document ({_last_line(result.stderr)})") from None
    doc["remote"] = {"target": str(conn.target), "python": python, "dir": remote_dir}
    return doc


def _device_script(argv: List[str]) -> str:
    """One-line sh script: temp folder, unpack stdin, run (report to stderr), JSON to stdout, remove folder."""
    command = " ".join(shlex.quote(a) for a in argv)
    script = (
        f'd=$(mktemp -d "${{TMPDIR:-/tmp}}/edgetl-bench.XXXXXX") || exit {NO_TEMP_DIR}; '
        f'echo "{DIR_MARKER}$d" >&2; '
        f'cd "$d" && tar -xf - || {{ cd /; rm -rf "$d"; exit {NO_UNPACK}; }}; '
        f"{command} >&2; status=$?; "
        '[ "$status" -eq 0 ] && cat result.json; '
        f'cd / && rm -rf "$d" || exit {NO_CLEANUP}; exit "$status"'
    )
    return f"sh -c {shlex.quote(script)}"


def _ssh(conn: Connection, script: str, stdin, timeout_s: float):
    """(completed ssh call, device temp folder or None); on timeout, remove the folder and raise."""
    try:
        result = subprocess.run(conn.argv(script), stdin=stdin, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise RemoteError("`ssh` is not installed on this machine; install the OpenSSH client") from None
    except subprocess.TimeoutExpired as exc:
        remote_dir = _remote_dir(exc.stderr)
        if remote_dir:
            _remove(conn, remote_dir)
        raise RemoteError(f"{conn.target}: no result within {timeout_s:.0f} s; raise the timeout or use fewer --runs") from None
    return result, _remote_dir(result.stderr)


def _remote_dir(stderr) -> Optional[str]:
    if isinstance(stderr, bytes):
        stderr = stderr.decode("utf-8", "replace")
    dirs = [line[len(DIR_MARKER):].strip() for line in (stderr or "").splitlines() if line.startswith(DIR_MARKER)]
    return dirs[0] if dirs else None


def _remove(conn: Connection, remote_dir: str) -> None:
    """Best-effort removal after a timeout (the script removes the folder itself in every other case)."""
    try:
        subprocess.run(conn.argv(f"rm -rf {shlex.quote(remote_dir)}"), stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        pass


def _failure(target: Target, python: str, result: subprocess.CompletedProcess) -> str:
    """The one-line cause of a failed run, by exit status."""
    cause = _last_line(result.stderr) or f"exit status {result.returncode}"
    code = result.returncode
    if code == SSH_FAILED:
        if "Permission denied" in cause or "Too many authentication failures" in cause:
            return f"cannot log in to {target}: {cause} (check the user and --identity key)"
        if "Host key verification failed" in cause:
            return f"cannot trust {target}: {cause} (its host key changed; fix ~/.ssh/known_hosts)"
        return f"host unreachable: cannot connect to {target}: {cause}"
    if code == NOT_FOUND:
        return f"{target}: Python {python!r} not found there; pass --python with the path of a Python 3.8+ interpreter"
    if code in (NO_TEMP_DIR, NO_UNPACK):
        return f"{target}: could not {'create a temp folder' if code == NO_TEMP_DIR else 'unpack the files'} there: {cause}"
    if code == NO_CLEANUP:
        return f"{target}: the benchmark ran but its temp folder could not be removed there: {cause}"
    cause = cause.replace("edgetl-bench: error: ", "")
    if code == EXIT_ENVIRONMENT:
        return f"{target}: {cause} (with {python} on the device)"
    return f"{target}: benchmark failed on the device: {cause}"


def _last_line(text: str) -> str:
    """The runner's own error line if there is one, else the last non-empty line."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip() and not line.startswith(DIR_MARKER)]
    errors = [line for line in lines if line.startswith("edgetl-bench: error:")]
    return (errors or lines or [""])[-1]


def format_side_by_side(host: dict, device: dict) -> str:
    """Host-vs-device table: machine facts, then load/mean/p90 latency per (threads, XNNPACK) and the ratio."""
    facts = [[key, host["device"].get(key), device["device"].get(key)]
             for key in ("hostname", "machine", "os", "cpu", "cpu_count", "python", "runtime", "runtime_version")]
    facts += [["model", host["model"]["name"], device["model"]["name"]],
              ["peak RSS MB", host.get("peak_rss_mb"), device.get("peak_rss_mb")],
              ["accuracy", host.get("accuracy"), device.get("accuracy")]]
    device_rows = {(r["threads"], r["xnnpack"]): r for r in device["latency"]}
    latency = []
    for h in host["latency"]:
        d = device_rows.get((h["threads"], h["xnnpack"]))
        latency.append([h["threads"], h["xnnpack"], h["load_time_s"] * 1000, d and d["load_time_s"] * 1000,
                        h["mean_ms"], d and d["mean_ms"], h["p90_ms"], d and d["p90_ms"],
                        d and h["mean_ms"] and d["mean_ms"] / h["mean_ms"]])
    return "\n\n".join([
        format_table(["", "host", "device"], facts),
        format_table(["threads", "xnnpack", "host load ms", "device load ms", "host mean ms", "device mean ms",
                      "host p90 ms", "device p90 ms", "device/host x"], latency),
    ])
