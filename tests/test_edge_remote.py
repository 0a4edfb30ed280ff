"""`run_remote` against a real OpenSSH server on 127.0.0.1 (throwaway keys and config, started per module).

The "device" is this machine; its temp folder is redirected (TMPDIR via SetEnv/AcceptEnv) to a private
directory so the tests can check that nothing is left behind.
"""
from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from types import SimpleNamespace

import pytest
from edge_support import CLASSES, LITERT, NUMPY_PILLOW, make_venv, tiny_model, to_tflite, write_images

from edgetl.edge.bench import BenchOptions, run_bench
from edgetl.edge.remote import RemoteError, Target, format_side_by_side, run_remote

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
OPTIONS = BenchOptions(threads=(1,), runs=2, warmup=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A private sshd on a free 127.0.0.1 port accepting one throwaway key; skips if it cannot start."""
    missing = [tool for tool in (SSHD, "ssh", "scp", "ssh-keygen") if not shutil.which(tool)]
    if missing:
        pytest.skip(f"OpenSSH not installed ({', '.join(missing)} missing): apt-get install openssh-server openssh-client")
    root = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True, timeout=30)
    shutil.copy(root / "client_key.pub", root / "authorized_keys")
    if os.geteuid() == 0:  # root sshd insists on its privilege-separation directory
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    port = _free_port()
    (root / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {root / 'host_key'}",
        f"AuthorizedKeysFile {root / 'authorized_keys'}", f"PidFile {root / 'sshd.pid'}",
        "UsePAM no", "StrictModes no", "PermitRootLogin prohibit-password", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "AcceptEnv TMPDIR", "Subsystem sftp internal-sftp",
    ]) + "\n")
    log = open(root / "sshd.log", "w")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(root / "sshd_config")], stdout=log, stderr=subprocess.STDOUT)
    try:
        if not _wait_for_port(port, proc):
            reason = (root / "sshd.log").read_text().strip().splitlines()
            pytest.skip(f"sshd could not be started: {reason[-1] if reason else 'no output'}")
        device_tmp = root / "device-tmp"
        device_tmp.mkdir()
        yield SimpleNamespace(
            target=f"{getpass.getuser()}@127.0.0.1:{port}", identity=str(root / "client_key"), tmp=device_tmp,
            ssh_options=["-F", "/dev/null", "-o", f"UserKnownHostsFile={root / 'known_hosts'}",
                         "-o", f"SetEnv=TMPDIR={device_tmp}"],
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    """A tiny TFLite model with labels.txt beside it, class-folder images, and two device Pythons."""
    root = tmp_path_factory.mktemp("device")
    (root / "model").mkdir()
    model = to_tflite(tiny_model(), root / "model" / "tiny.tflite")
    (root / "model" / "labels.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    return SimpleNamespace(
        model=model, images=write_images(root / "images", per_class=2),
        python=make_venv(root / "venv-litert", NUMPY_PILLOW + LITERT),
        python_without_runtime=make_venv(root / "venv-bare", NUMPY_PILLOW),
    )


def _remote(sshd, device, options=OPTIONS, **overrides):
    kwargs = {"target": sshd.target, "identity": sshd.identity, "python": str(device.python),
              "ssh_options": sshd.ssh_options, "connect_timeout": 5, "timeout_s": 120, **overrides}
    return run_remote(device.model, options=options, **kwargs)


def test_remote_bench_returns_device_json_and_cleans_up(sshd, device):
    options = BenchOptions(threads=(1,), runs=2, warmup=0, images=str(device.images))
    doc = _remote(sshd, device, options=options)
    assert doc["device"]["python_executable"] == str(device.python)
    assert doc["remote"]["dir"].startswith(str(sshd.tmp))
    assert list(sshd.tmp.iterdir()) == []  # the device's temp folder is gone
    assert doc["model"]["labels"] == "labels.txt"  # labels.txt beside the model was copied along
    assert doc["images"]["count"] == 2 * len(CLASSES) and doc["accuracy"] is not None
    host = run_bench(device.model, options)
    assert doc["predictions"] == host["predictions"] and doc["accuracy"] == host["accuracy"]
    table = format_side_by_side(host, doc)
    assert "device/host" in table and "tiny.tflite" in table


def test_unreachable_port_is_one_clear_line(sshd, device):
    target = f"{getpass.getuser()}@127.0.0.1:{_free_port()}"
    with pytest.raises(RemoteError) as err:
        _remote(sshd, device, target=target)
    message = str(err.value)
    assert message.startswith(f"host unreachable: cannot connect to {target}") and "\n" not in message


def test_missing_runtime_on_device_is_reported_and_nothing_left(sshd, device):
    with pytest.raises(RemoteError) as err:
        _remote(sshd, device, python=str(device.python_without_runtime))
    assert str(err.value) == (
        f"{sshd.target}: no TFLite runtime installed: pip install ai-edge-litert (or tflite-runtime on older boards) "
        f"(with {device.python_without_runtime} on the device)"
    )
    assert list(sshd.tmp.iterdir()) == []


def test_wrong_python_on_device_is_reported(sshd, device):
    with pytest.raises(RemoteError, match="Python 'no-such-python3' not found there; pass --python"):
        _remote(sshd, device, python="no-such-python3")
    assert list(sshd.tmp.iterdir()) == []


def test_target_parsing():
    assert Target.parse("pi@raspberry.local") == Target("raspberry.local", "pi", None)
    assert Target.parse("root@10.0.0.2:2222") == Target("10.0.0.2", "root", 2222)
    assert Target.parse("me@[fe80::1]:22") == Target("fe80::1", "me", 22)
    assert str(Target.parse("root@10.0.0.2:2222")) == "root@10.0.0.2:2222"
    with pytest.raises(RemoteError, match="not a remote target"):
        Target.parse("a@b:c:d")
