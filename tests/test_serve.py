"""tuneforge serve: a real server process on localhost, its predictions, and every limit's status code."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tuneforge import finetune, load
from tuneforge.inference import predict_run


@pytest.fixture
def text_run(small_text_run):
    result, data = small_text_run
    return result.run_dir, data


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server(run_dir: Path, *options: str, env: dict | None = None):
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "tuneforge", "serve", str(run_dir), "--port", str(port), *options],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stdout.read().decode()
            with contextlib.suppress(OSError):
                if call(port, "GET", "/ready")[0] == 200:
                    break
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.2)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def call(port: int, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    raw = response.read().decode()
    connection.close()
    assert "Traceback" not in raw and 'File "' not in raw  # errors never show code
    return response.status, json.loads(raw) if raw else {}


def test_predictions_equal_tuneforge_predict_and_the_python_api(text_run, tmp_path):
    run_dir, data = text_run
    texts = [line.split("\t")[0] for line in data["test"].read_text().splitlines()[1:]]
    predict_run(run_dir, data["test"], tmp_path / "p.jsonl")
    expected = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    in_process = load(run_dir).predict(texts)
    with server(run_dir) as port:
        status, body = call(port, "POST", "/predict", {"inputs": texts})
        assert status == 200
        for got, offline, api in zip(body["predictions"], expected, in_process):
            assert got["label"] == offline["label"] == api["label"]
            for name, p in got["probabilities"].items():
                assert abs(p - offline["probabilities"][name]) < 1e-5 and abs(p - api["probabilities"][name]) < 1e-5
        status, one = call(port, "POST", "/predict", {"input": texts[0]})
        assert status == 200 and one["prediction"] == body["predictions"][0]
        assert call(port, "GET", "/health") == (200, {"status": "ok"})
        status, meta = call(port, "GET", "/metadata")
        assert status == 200 and meta["labels"] == ["0", "1"] and meta["task"] == "classification"
        assert meta["run"]["evaluation"]["split"] == "test" and meta["run"]["strategy"] == "full"
        assert call(port, "GET", "/openapi.json")[0] == 200


def test_each_limit_answers_with_its_status(text_run):
    run_dir, _ = text_run
    with server(run_dir, "--max-body-bytes", "2000", "--max-inputs", "4", "--max-text-chars", "50") as port:
        assert call(port, "POST", "/predict", {"inputs": ["good " * 100] * 6})[0] == 413
        status, body = call(port, "POST", "/predict", {"inputs": ["good"] * 5})
        assert status == 422 and "limit is 4" in body["error"]
        status, body = call(port, "POST", "/predict", {"inputs": ["good", "x" * 51]})
        assert status == 422 and "input 1 is longer than 50" in body["error"]
        assert call(port, "POST", "/predict", b"{not json")[0] == 422
        assert call(port, "POST", "/predict", {"inputs": [3]})[0] == 422
        assert call(port, "POST", "/predict", {"inputs": []})[0] == 422
        assert call(port, "POST", "/predict", {"inputs": ["fine"]})[0] == 200  # and the server is still well


def test_busy_server_says_429_at_once_and_slow_requests_get_504(text_run):
    run_dir, _ = text_run
    # Every request waits 1.5 s for company before it is predicted, longer than its 0.5 s timeout.
    with server(run_dir, "--max-concurrent", "1", "--max-wait-ms", "1500", "--timeout", "0.5") as port:
        first = {}
        thread = threading.Thread(target=lambda: first.update(result=call(port, "POST", "/predict", {"input": "good"})))
        thread.start()
        time.sleep(0.2)
        started = time.monotonic()
        status, body = call(port, "POST", "/predict", {"input": "bad"})
        assert status == 429 and time.monotonic() - started < 0.3 and "in progress" in body["error"]
        thread.join()
        assert first["result"][0] == 504


def test_bearer_token(text_run):
    run_dir, _ = text_run
    token = uuid.uuid4().hex
    with server(run_dir, "--token-env", "SERVE_TOKEN", env={"SERVE_TOKEN": token}) as port:
        assert call(port, "POST", "/predict", {"input": "good"})[0] == 401
        assert call(port, "POST", "/predict", {"input": "good"}, {"Authorization": "Bearer wrong"})[0] == 401
        assert call(port, "POST", "/predict", {"input": "good"}, {"Authorization": f"Bearer {token}"})[0] == 200
        assert call(port, "GET", "/metadata")[0] == 401
        assert call(port, "GET", "/health")[0] == 200


def test_concurrent_requests_are_micro_batched(text_run):
    run_dir, _ = text_run
    with server(run_dir, "--max-batch", "32", "--max-wait-ms", "200") as port:
        results = []
        threads = [threading.Thread(target=lambda i=i: results.append(call(port, "POST", "/predict", {"input": f"good {i}"})))
                   for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [status for status, _ in results] == [200] * 16
        served = call(port, "GET", "/metadata")[1]["served"]
        assert served["inputs"] == 16 + 0 and served["batches"] < 16  # several requests shared a forward pass


def test_images_as_base64_and_multipart(tiny_vit_dir, image_data, tmp_path):
    run = finetune({"model": {"name": str(tiny_vit_dir)},
                    "data": {"train": str(image_data["train"]), "validation": str(image_data["validation"])},
                    "train": {"epochs": 1, "batch_size": 4}, "output": {"dir": str(tmp_path / "run")}})
    images = sorted(Path(image_data["validation"]).rglob("*.png"))[:3]
    expected = load(run.run_dir).predict([str(path) for path in images])
    with server(run.run_dir) as port:
        encoded = [base64.b64encode(path.read_bytes()).decode() for path in images]
        status, body = call(port, "POST", "/predict", {"inputs": encoded})
        assert status == 200 and [p["label"] for p in body["predictions"]] == [p["label"] for p in expected]
        boundary = "tuneforge-test-boundary"
        parts = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{p.name}\"\r\n"
                         f"Content-Type: image/png\r\n\r\n".encode() + p.read_bytes() + b"\r\n" for p in images)
        status, body = call(port, "POST", "/predict", parts + f"--{boundary}--\r\n".encode(),
                            {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert status == 200 and [p["label"] for p in body["predictions"]] == [p["label"] for p in expected]
        status, body = call(port, "POST", "/predict", {"inputs": ["bm90IGFuIGltYWdl"]})  # base64 of "not an image"
        assert status == 422 and "not a readable image" in body["error"]
