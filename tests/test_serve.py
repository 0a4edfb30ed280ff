"""`edgetl serve` as a client sees it: real server processes on 127.0.0.1, tritonclient, raw HTTP, signals, reloads.

Three servers are started: the main one (every model variant, API key, hot reload, batching), a tiny-queue one
from the zipapp runner (overload), and one through `edgetl serve` (SIGTERM drain). Every wait is bounded in time.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import gzip
import http.client
import io
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
from edge_support import CLASSES, env_with_repo, tiny_model, to_onnx, to_tflite
from PIL import Image

tritonhttp = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from edgetl.edge.images import decode_image  # noqa: E402
from edgetl.edge.runtime import open_model  # noqa: E402
from edgetl.edge.serve.models import TargetError, parse_targets  # noqa: E402

API_KEY = "s3cret-key"
AUTH = MappingProxyType({"Authorization": f"Bearer {API_KEY}"})  # read-only: tritonclient adds to the headers it gets
MAX_BODY_MB = 0.25
COLORS = ("dark", "light")
START_TIMEOUT_S = 60


class Server:
    """A server subprocess: waits for its 'listening on' line and for ready; stopped (killed if need be) at teardown."""

    def __init__(self, argv, log_path: Path, env=None):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv + ["--port", "0"], stdout=subprocess.PIPE, stderr=self.log,
                                     env=env or env_with_repo())
        self.port = self._read_port()
        self.wait_ready()

    def _read_port(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            line = self.proc.stdout.readline().decode()
            if not line:
                break
            match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if match:
                return int(match.group(1))
        self.stop()
        raise AssertionError(f"server did not start: {self.log_path.read_text()[-3000:]}")

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/v2/health/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("server never became ready")

    def request(self, method, path, body=None, headers=None, timeout=30.0):
        """(status, headers (case-insensitive), body bytes) of one request on a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.headers, response.read()
        finally:
            conn.close()

    def metrics(self) -> str:
        return self.request("GET", "/metrics", headers=dict(AUTH))[2].decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.log.close()


def wait_for(condition, what: str, timeout_s: float = 20.0) -> None:
    """Poll `condition` every 0.1 s until it holds; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text, 0.0 when absent."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def jpeg_bytes(rng, height: int, width: int, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """fp32, uint8 and int8 TFLite and an fp32 ONNX of one tiny model, a second model to reload to, labels beside."""
    root = tmp_path_factory.mktemp("serve_models")
    model = tiny_model()
    paths = {"fp32": to_tflite(model, root / "fp32.tflite"), "uint8": to_tflite(model, root / "uint8.tflite", "uint8"),
             "int8": to_tflite(model, root / "int8.tflite", "int8"), "onnx": to_onnx(model, root / "onnx.onnx")}
    weights = model.get_weights()
    model.set_weights(weights[:-2] + [-weights[-2], weights[-1]])  # other predictions, same shapes
    paths["other"] = to_tflite(model, root / "other.tflite")
    (root / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    heads = root / "heads"
    heads.mkdir()
    paths["heads"] = to_tflite(tiny_model((("probs", 3), ("color", 2))), heads / "heads.tflite")
    (heads / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    (heads / "labels_color.txt").write_text("\n".join(COLORS) + "\n")
    return paths


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """Non-square JPEG and PNG files (so the resize mode matters) and one large JPEG for slow requests."""
    root = tmp_path_factory.mktemp("serve_images")
    rng = np.random.default_rng(3)
    files = []
    for i in range(3):
        path = root / f"img{i}.jpg"
        path.write_bytes(jpeg_bytes(rng, 40, 56))
        files.append(path)
    png = root / "img.png"
    Image.fromarray(rng.integers(0, 256, (50, 36, 3), dtype=np.uint8)).save(png)
    files.append(png)
    big = root / "big.jpg"
    big.write_bytes(jpeg_bytes(rng, 1600, 1600, quality=95))
    return {"small": files, "big": big}


@pytest.fixture(scope="session")
def main_server(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("main_server")
    key = root / "key.txt"
    key.write_text(API_KEY + "\n")
    reload_path = root / "reload.tflite"
    reload_path.write_bytes(models["fp32"].read_bytes())
    (root / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    argv = [sys.executable, "-m", "edgetl.edge.serve", str(models["fp32"]), str(models["uint8"]), str(models["int8"]),
            f"onnx={models['onnx']}", str(models["heads"]), str(reload_path), "--workers", "2", "--threads", "1",
            "--max-batch", "4", "--max-delay-ms", "5", "--max-body-mb", str(MAX_BODY_MB), "--api-key-file", str(key),
            "--resize", "center_crop", "--reload-interval", "0.2"]
    server = Server(argv, root / "server.log")
    server.reload_path = reload_path
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(main_server):
    triton = tritonhttp.InferenceServerClient(url=f"127.0.0.1:{main_server.port}", connection_timeout=30,
                                              network_timeout=30)
    yield triton
    triton.close()


def expected(path, pixels):
    return open_model(path, threads=1).predict(pixels)


def pixels_of(files, mode="center_crop"):
    return np.stack([decode_image(f, 32, mode) for f in files])


def test_tritonclient_binary_infer_and_classification(client, models):
    assert client.is_server_live() and client.is_server_ready()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    for name in ("fp32", "uint8", "int8", "onnx"):
        meta = client.get_model_metadata(name, headers=dict(AUTH))
        datatype = meta["inputs"][0]["datatype"]
        assert meta["inputs"][0]["shape"] == [-1, 32, 32, 3] and meta["outputs"][0]["name"] == "probs"
        assert datatype == ("FP32" if name in ("fp32", "onnx") else "UINT8")
        assert client.is_model_ready(name, headers=dict(AUTH))
        tensor = tritonhttp.InferInput("image", list(pixels.shape), datatype)
        tensor.set_data_from_numpy(pixels.astype(np.float32 if datatype == "FP32" else np.uint8), binary_data=True)
        outputs = [tritonhttp.InferRequestedOutput("probs", binary_data=True)]
        result = client.infer(name, [tensor], outputs=outputs, headers=dict(AUTH))
        want = expected(models[name], pixels)
        np.testing.assert_array_equal(result.as_numpy("probs"), want)

        top = client.infer(name, [tensor], outputs=[tritonhttp.InferRequestedOutput("probs", class_count=2)],
                           headers=dict(AUTH)).as_numpy("probs")
        assert top.shape == (3, 2)
        for row, probs in zip(top, want):
            order = np.argsort(-probs, kind="stable")[:2]
            assert [item.decode() for item in row] == [f"{probs[i]:f}:{i}:{CLASSES[i]}" for i in order]


def test_json_infer_and_requested_json_outputs(main_server, models):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    doc = {"id": "req-7", "inputs": [{"name": "image", "shape": [2, 32, 32, 3], "datatype": "UINT8",
                                      "data": pixels.tolist()}],
           "outputs": [{"name": "probs", "parameters": {"binary_data": False, "classification": 1}}]}
    status, headers, body = main_server.request("POST", "/v2/models/uint8/infer", json.dumps(doc), AUTH)
    assert status == 200, body
    answer = json.loads(body)
    want = expected(models["uint8"], pixels)
    assert answer["id"] == "req-7" and answer["model_name"] == "uint8"
    (out,) = answer["outputs"]
    assert out["datatype"] == "BYTES" and out["shape"] == [2, 1]
    assert out["data"] == [f"{p.max():f}:{int(p.argmax())}:{CLASSES[int(p.argmax())]}" for p in want]

    doc = {"inputs": [{"name": "image", "shape": [2, 32, 32, 3], "datatype": "FP32",
                       "data": pixels.astype(np.float32).reshape(-1).tolist()}]}
    status, _, body = main_server.request("POST", "/v2/models/fp32/infer", json.dumps(doc), AUTH)
    assert status == 200, body
    (out,) = json.loads(body)["outputs"]
    assert out["datatype"] == "FP32" and out["shape"] == [2, 3]
    np.testing.assert_array_equal(np.asarray(out["data"], dtype=np.float32).reshape(2, 3), expected(models["fp32"], pixels))

    gzipped = gzip.compress(json.dumps(doc).encode())  # tritonclient's request_compression_algorithm="gzip"
    status, _, body = main_server.request("POST", "/v2/models/fp32/infer", gzipped, {**AUTH, "Content-Encoding": "gzip"})
    assert status == 200 and json.loads(body)["outputs"][0]["data"] == out["data"]


def test_encoded_images_equal_edge_runtime_exactly(client, main_server, models, images):
    files = images["small"]
    encoded = np.array([f.read_bytes() for f in files], dtype=object)
    want = expected(models["int8"], pixels_of(files))
    assert not np.array_equal(want, expected(models["int8"], pixels_of(files, "plain")))  # the mode matters here
    tensor = tritonhttp.InferInput("image", [len(files)], "BYTES")
    tensor.set_data_from_numpy(encoded, binary_data=True)
    result = client.infer("int8", [tensor], headers=dict(AUTH))
    np.testing.assert_array_equal(result.as_numpy("probs"), want)

    doc = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"content_type": "base64"},
                       "data": [base64.b64encode(files[0].read_bytes()).decode()]}]}
    status, _, body = main_server.request("POST", "/v2/models/int8/infer", json.dumps(doc), AUTH)
    assert status == 200, body
    np.testing.assert_array_equal(np.asarray(json.loads(body)["outputs"][0]["data"], np.float32), want[0])

    for path, row in zip(files, want):
        kind = "png" if path.suffix == ".png" else "jpeg"
        status, _, body = main_server.request("POST", "/v2/models/int8/classify?top_k=3", path.read_bytes(),
                                              {**AUTH, "Content-Type": f"image/{kind}"})
        assert status == 200, body
        predictions = json.loads(body)["predictions"]
        order = np.argsort(-row, kind="stable")
        assert [(p["index"], p["label"], p["score"]) for p in predictions] == \
            [(int(i), CLASSES[i], float(row[i])) for i in order]


def test_multi_head_model_names_each_heads_classes(client, main_server, models, images):
    path = images["small"][0]
    want = open_model(models["heads"], threads=1).predict_all(pixels_of([path]))
    tensor = tritonhttp.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([path.read_bytes()], dtype=object))
    top = client.infer("heads", [tensor], outputs=[tritonhttp.InferRequestedOutput("color", class_count=1)],
                       headers=dict(AUTH)).as_numpy("color")
    best = int(np.argmax(want["color"][0]))
    assert top[0][0].decode() == f"{want['color'][0][best]:f}:{best}:{COLORS[best]}"

    status, _, body = main_server.request("POST", "/v2/models/heads/classify?top_k=1", path.read_bytes(),
                                          {**AUTH, "Content-Type": "image/jpeg"})
    assert status == 200, body
    answer = json.loads(body)
    assert answer["predictions"][0]["label"] == CLASSES[int(np.argmax(want["probs"][0]))]
    assert answer["heads"]["color"] == [{"index": best, "label": COLORS[best], "score": float(want["color"][0][best])}]


def test_server_modules_import_without_tensorflow():
    heavy = ["tensorflow", "tf_keras", "keras", "tf2onnx", "onnx", "sklearn", "matplotlib", "yaml"]  # uvicorn brings click
    code = ("import sys\nimport edgetl.edge.serve, edgetl.edge.serve.app, edgetl.edge.serve.models\n"
            f"print([m for m in {heavy!r} if m in sys.modules])\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env_with_repo())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def server_policies(server: Server) -> set:
    """The Linux scheduling policies of every thread of a server process."""
    return {os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{server.proc.pid}/task")}


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux-only")
def test_server_threads_run_under_sched_batch_and_ignore_forwarded_headers(main_server):
    assert len(os.listdir(f"/proc/{main_server.proc.pid}/task")) >= 3  # event loop and two workers, at least
    assert server_policies(main_server) == {os.SCHED_BATCH}
    # without --proxy-headers a forged X-Forwarded-For is not believed: the access log names the socket's peer
    assert main_server.request("GET", "/v2/health/live?forged", headers={"X-Forwarded-For": "10.9.8.7"})[0] == 200
    wait_for(lambda: re.search(r'127\.0\.0\.1 "GET /v2/health/live\?forged" 200', main_server.log_path.read_text()),
             "the access-log line of the forged request")
    assert "10.9.8.7" not in main_server.log_path.read_text()


def test_concurrent_requests_batch_and_stay_exact(main_server, models):
    """Eight clients at once on a model with dynamic batching: every answer equals its own batch-1 prediction."""
    rng = np.random.default_rng(5)
    batches = [rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8) for _ in range(16)]

    def infer(pixels):
        doc = {"inputs": [{"name": "image", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": pixels.reshape(-1).tolist()}]}
        status, _, body = main_server.request("POST", "/v2/models/onnx/infer", json.dumps(doc), AUTH)
        assert status == 200, body
        return np.asarray(json.loads(body)["outputs"][0]["data"], dtype=np.float32)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(infer, batches))
    for pixels, answer in zip(batches, answers):
        np.testing.assert_array_equal(answer, expected(models["onnx"], pixels)[0])
    text = main_server.metrics()  # some interpreter call ran more than one request's image
    assert metric(text, "edgetl_batch_size_sum", model="onnx") > metric(text, "edgetl_batch_size_count", model="onnx")


def test_tflite_batches_run_on_an_interpreter_per_size_without_reallocating(models, monkeypatch):
    """--max-batch 4 gives a TFLite worker interpreters for batch 4, 2 and 1, allocated at load: batches of any size
    (7 = 4+2+1) never resize or re-allocate one, and every answer equals its own batch-1 prediction exactly."""
    from edgetl.edge.serve.batcher import BatchOptions
    from edgetl.edge.serve.metrics import ServeMetrics
    from edgetl.edge.serve.models import ModelOptions, ModelSpec, ServedModel

    for name in ("fp32", "int8"):
        options = ModelOptions(threads=1, batch=BatchOptions(workers=1, max_batch=4))
        served = ServedModel(ModelSpec(name, models[name]), options, ServeMetrics())
        served.activate(served.load())
        sizes = served.current.runners[0].by_size
        assert sorted(sizes) == [1, 2, 4]
        calls = []
        for size, runner in sizes.items():
            for method in ("resize_tensor_input", "allocate_tensors"):
                monkeypatch.setattr(runner._interp, method, lambda *a, m=method, s=size: calls.append((s, m)))
        pixels = np.random.default_rng(11).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
        bare = open_model(models[name], threads=1)
        single = np.concatenate([bare.predict(pixels[i:i + 1]) for i in range(len(pixels))])
        for count in (7, 1, 3, 2, 4, 5):
            results = served.execute(0, [pixels[i:i + 1] for i in range(count)])
            for i, (_, outputs) in enumerate(results):
                np.testing.assert_array_equal(outputs["probs"][0], single[i])
        assert calls == []


def raw_chunked_status(port: int, path: str, total: int) -> int:
    """Stream `total` bytes chunked and never finish the body: only a server that checks while reading answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
                      "Content-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
        chunk = b"x" * 65536
        for _ in range(total // len(chunk) + 1):
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        reply = sock.recv(4096).decode("latin-1")
    return int(reply.split()[1])


def test_every_error_code_from_real_bad_requests(main_server, client, images):
    good = {"inputs": [{"name": "image", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [0] * 3072}]}
    jpeg = images["small"][0].read_bytes()
    infer = "/v2/models/uint8/infer"
    cases = [
        (400, "POST", infer, b'{"inputs": [', AUTH),                                                   # malformed JSON
        (400, "POST", infer, b"[" * 100000, AUTH),                                                     # nested too deep
        (400, "POST", infer, json.dumps({**good, "inputs": [{**good["inputs"][0], "shape": [1, 16, 16, 3],
                                                             "data": [0] * 768}]}), AUTH),            # wrong shape
        (400, "POST", infer, json.dumps({**good, "inputs": [{**good["inputs"][0], "datatype": "FP32"}]}), AUTH),
        (400, "POST", infer, json.dumps({**good, "inputs": [{**good["inputs"][0], "data": [0] * 3071}]}), AUTH),
        (400, "POST", infer, json.dumps({**good, "inputs": [{**good["inputs"][0], "data": [256] * 3072}]}), AUTH),
        (400, "POST", infer, json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                     "data": ["not an image"]}]}), AUTH),             # non-image bytes
        (400, "POST", "/v2/models/uint8/classify", jpeg[:len(jpeg) // 2], {**AUTH, "Content-Type": "image/jpeg"}),
        (400, "POST", "/v2/models/uint8/classify", b"hello", {**AUTH, "Content-Type": "text/plain"}),
        (413, "POST", "/v2/models/uint8/classify", b"x" * int(MAX_BODY_MB * 2 ** 20 + 1),
         {**AUTH, "Content-Type": "image/jpeg"}),                                                      # oversized
        (404, "POST", "/v2/models/nope/infer", json.dumps(good), AUTH),                               # unknown model
        (404, "GET", "/v2/models/uint8/versions/2", None, AUTH),
        (404, "POST", "/v2/models/uint8/versions/2/infer", json.dumps(good), AUTH),
        (405, "GET", infer, None, AUTH),
        (401, "POST", infer, json.dumps(good), {}),                                                   # no key
        (401, "POST", infer, json.dumps(good), {"Authorization": "Bearer wrong"}),                    # wrong key
    ]
    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 10}}]}).encode()
    binary = {**AUTH, "Inference-Header-Content-Length": str(len(header))}
    cases += [
        (400, "POST", infer, header + b"\x05\x00", binary),                                        # binary overrun
        (400, "POST", infer, header + b"\xff\x00\x00\x00" + b"x" * 6, binary),                  # bad BYTES length
    ]
    for status, method, path, body, headers in cases:
        got, response_headers, answer = main_server.request(method, path, body, headers)
        assert got == status, (path, body[:60] if body else body, answer)
        assert isinstance(json.loads(answer)["error"], str) and json.loads(answer)["error"]
    assert raw_chunked_status(main_server.port, "/v2/models/uint8/classify", int(MAX_BODY_MB * 2 ** 20)) == 413

    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("nope", headers=dict(AUTH))
    assert main_server.request("GET", "/v2/health/ready")[0] == 200
    assert main_server.request("POST", infer, json.dumps(good), AUTH)[0] == 200
    text = main_server.metrics()
    assert metric(text, "edgetl_requests_total", model="uint8", endpoint="infer", code="400") >= 6
    assert metric(text, "edgetl_requests_total", model="", endpoint="infer", code="404") == 1
    assert "code=\"500\"" not in text
    wait_for(lambda: re.search(r'"POST /v2/models/uint8/classify" 413 \d+ [\d.]+ms', main_server.log_path.read_text()),
             "the 413's access-log line (written in blocks, at most 0.5 s late)")


def test_a_lone_request_is_not_held_back_to_fill_a_batch():
    """With batching on (max delay 2 s), a request with no other admitted request in flight runs at once."""
    from edgetl.edge.serve.batcher import Batcher, BatchOptions
    from edgetl.edge.serve.metrics import ServeMetrics

    batches = []

    def execute(worker, payloads):
        batches.append(list(payloads))
        return [payload * 2 for payload in payloads]

    options = BatchOptions(workers=1, max_batch=4, max_delay_s=2.0)
    batcher = Batcher("m", execute, options, lambda: options.max_batch, ServeMetrics())
    batcher.start()

    async def one(value):
        with batcher.admit():
            return await batcher.run(value, 1, lambda out: out, time.monotonic() + 10)

    try:
        start = time.monotonic()
        assert asyncio.run(one(21)) == 42
        assert time.monotonic() - start < 1.0 and batches == [[21]]
    finally:
        batcher.stop()


def test_parse_targets_names_run_dirs_and_resize(tmp_path, models):
    run = tmp_path / "run"
    (run / "exports").mkdir(parents=True)
    for name in ("tflite-int8.tflite", "onnx-fp32.onnx"):
        (run / "exports" / name).write_bytes(b"model")
    (run / "exports" / "manifest.json").write_text(json.dumps({"artifacts": [
        {"path": "tflite-int8.tflite", "status": "ok"}, {"path": None, "status": "failed"},
        {"path": "onnx-fp32.onnx", "status": "ok"}]}))
    specs = parse_targets([str(run), f"mine={models['fp32']}"], resize_of=lambda p: "center_crop" if "run" in str(p) else "plain")
    assert [(s.name, s.path.name, s.resize) for s in specs] == [
        ("tflite-int8", "tflite-int8.tflite", "center_crop"), ("onnx-fp32", "onnx-fp32.onnx", "center_crop"),
        ("mine", "fp32.tflite", "plain")]
    assert [s.resize for s in parse_targets([str(models["fp32"])], resize="center_crop")] == ["center_crop"]
    with pytest.raises(TargetError, match="two models are named"):
        parse_targets([str(models["fp32"]), f"fp32={models['uint8']}"])
    with pytest.raises(TargetError, match="not a .tflite or .onnx file"):
        parse_targets([str(tmp_path / "missing.tflite")])


def test_edgetl_serve_resizes_as_the_runs_recipe(tmp_path, models):
    """`edgetl serve RUN` hands the recipe's data.resize to the server for each artifact of the run."""
    from edgetl.cli import _recipe_resize

    run = tmp_path / "run"
    (run / "exports").mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: x\ndata:\n  source: digits\n  resize: center_crop\n")
    (run / "exports" / "tflite-fp32.tflite").write_bytes(models["fp32"].read_bytes())
    specs = parse_targets([str(run), str(models["fp32"])], resize_of=_recipe_resize)
    assert [(s.name, s.resize) for s in specs] == [("tflite-fp32", "center_crop"), ("fp32", "plain")]


def test_hot_reload_serves_the_new_file_and_survives_a_broken_one(main_server, models):
    rng = np.random.default_rng(9)
    pixels = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    doc = json.dumps({"inputs": [{"name": "image", "shape": [1, 32, 32, 3], "datatype": "UINT8",
                                  "data": pixels.reshape(-1).tolist()}]})

    def served():
        status, _, body = main_server.request("POST", "/v2/models/reload/infer", doc, AUTH)
        assert status == 200, body
        return np.asarray(json.loads(body)["outputs"][0]["data"], dtype=np.float32)

    old, new = expected(models["fp32"], pixels)[0], expected(models["other"], pixels)[0]
    assert not np.array_equal(old, new)
    np.testing.assert_array_equal(served(), old)
    path = main_server.reload_path
    tmp = path.with_name(".reload.tmp")
    tmp.write_bytes(models["other"].read_bytes())
    os.replace(tmp, path)
    wait_for(lambda: np.array_equal(served(), new), "the replacement's predictions")
    text = main_server.metrics()
    assert metric(text, "edgetl_model_generation", model="reload") == 2
    assert metric(text, "edgetl_model_reloads_total", model="reload", result="ok") == 1

    tmp.write_bytes(b"this is not a model")
    os.replace(tmp, path)
    wait_for(lambda: metric(main_server.metrics(), "edgetl_model_reload_failed", model="reload") == 1, "a failed reload")
    np.testing.assert_array_equal(served(), new)
    assert metric(main_server.metrics(), "edgetl_model_reloads_total", model="reload", result="failed") == 1
    log = main_server.log_path.read_text()
    assert "reloading" in log and "failed, still serving generation 2" in log


def burst(server: Server, body: bytes, count: int, headers=None):
    """`count` classify requests released at once; (status, Retry-After, body) of each."""
    gate = threading.Barrier(count)

    def one(_):
        gate.wait(timeout=30)
        status, response_headers, answer = server.request(
            "POST", "/v2/models/uint8/classify", body, {"Content-Type": "image/jpeg", **(headers or {})}, timeout=60)
        return status, response_headers.get("Retry-After"), answer

    pool = concurrent.futures.ThreadPoolExecutor(count)
    return pool, [pool.submit(one, i) for i in range(count)]


def slow_sender_status(port: int) -> int:
    """Status of a request that announces 1000 body bytes, sends 10 and waits."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(b"POST /v2/models/uint8/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                     b"Content-Length: 1000\r\n\r\n" + b"x" * 10)
        return int(sock.recv(4096).decode("latin-1").split()[1])


def test_overload_sheds_with_503_and_no_500(models, images, tmp_path):
    from edgetl.edge.zipapp import build_runner

    runner = build_runner(tmp_path / "runner.pyz")
    server = Server([sys.executable, str(runner), "serve", str(models["uint8"]), "--workers", "1", "--threads", "1",
                     "--max-queue", "1", "--timeout-ms", "1500"], tmp_path / "server.log")
    try:
        pool, futures = burst(server, images["big"].read_bytes(), 12)
        results = [f.result(timeout=90) for f in futures]
        pool.shutdown()
        statuses = sorted(status for status, _, _ in results)
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
        for status, retry_after, answer in results:
            if status == 503:
                assert retry_after == "1" and "capacity" in json.loads(answer)["error"]
        assert server.request("GET", "/v2/health/ready")[0] == 200
        text = server.metrics()
        assert metric(text, "edgetl_requests_total", model="uint8", endpoint="classify", code="503") == statuses.count(503)
        assert slow_sender_status(server.port) == 408  # a trickling body does not hold its slot past the deadline
        assert metric(server.metrics(), "edgetl_admitted_requests", model="uint8") == 0
    finally:
        server.stop()


def test_sigterm_during_a_burst_answers_every_admitted_request(models, images, tmp_path):
    argv = [sys.executable, "-m", "edgetl.cli", "serve", str(models["uint8"]), "--workers", "1", "--threads", "1",
            "--max-queue", "32", "--cpu-policy", "normal", "--proxy-headers"]
    server = Server(argv, tmp_path / "server.log")
    count = 10
    try:
        if hasattr(os, "SCHED_OTHER"):
            assert server_policies(server) == {os.SCHED_OTHER}
        assert server.request("GET", "/v2/health/live", headers={"X-Forwarded-For": "10.9.8.7"})[0] == 200
        pool, futures = burst(server, images["big"].read_bytes(), count)
        deadline = time.monotonic() + 30
        while True:  # every request admitted (in progress or already answered) before the signal
            text = server.metrics()
            if metric(text, "edgetl_admitted_requests", model="uint8") + metric(
                    text, "edgetl_requests_total", model="uint8", endpoint="classify", code="200") >= count:
                break
            assert time.monotonic() < deadline, "the burst was never admitted"
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        results = [f.result(timeout=90) for f in futures]
        pool.shutdown()
        assert [status for status, _, _ in results] == [200] * count
        assert server.proc.wait(timeout=30) == 0
        log = server.log_path.read_text()
        assert "draining" in log
        # the access log, written in blocks, is flushed at exit: one line per answered request
        assert len(re.findall(r'"POST /v2/models/uint8/classify" 200 \d+ [\d.]+ms', log)) == count
        assert re.search(r'10\.9\.8\.7 "GET /v2/health/live" 200', log)  # --proxy-headers: the forwarded client
    finally:
        server.stop()


def test_openvino_backend_serves_what_openvino_computes(models, tmp_path):
    pytest.importorskip("openvino", reason="OpenVINO is an optional runtime (pip install openvino)")
    server = Server([sys.executable, "-m", "edgetl.edge.serve", str(models["fp32"]), "--runtime", "openvino",
                     "--threads", "1"], tmp_path / "server.log")
    try:
        pixels = np.random.default_rng(5).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
        doc = {"inputs": [{"name": "image", "shape": [2, 32, 32, 3], "datatype": "FP32",
                           "data": pixels.astype(np.float32).reshape(-1).tolist()}]}
        status, _, body = server.request("POST", "/v2/models/fp32/infer", json.dumps(doc))
        assert status == 200, body
        served = np.asarray(json.loads(body)["outputs"][0]["data"], dtype=np.float32).reshape(2, 3)
        np.testing.assert_array_equal(served, open_model(models["fp32"], threads=1, runtime="openvino").predict(pixels))
    finally:
        server.stop()
