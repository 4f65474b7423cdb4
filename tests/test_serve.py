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
from conftest import write_image_folder

from tuneforge import finetune, load
from tuneforge.errors import DataError
from tuneforge.use.evaluate import predict_run


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


@pytest.fixture(scope="module")
def image_run(tiny_vit_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("image-run")
    data = {"train": write_image_folder(root / "train", 12, seed=1),
            "validation": write_image_folder(root / "val", 6, seed=2)}
    run = finetune({"model": {"name": str(tiny_vit_dir)},
                    "data": {"train": str(data["train"]), "validation": str(data["validation"])},
                    "train": {"epochs": 1, "batch_size": 4}, "output": {"dir": str(root / "run")}})
    return run.run_dir, sorted(Path(data["validation"]).rglob("*.png"))[:3]


@pytest.fixture(scope="module")
def image_server(image_run):
    with server(image_run[0]) as port:
        yield port


def test_images_as_base64_and_multipart(image_run, image_server):
    run_dir, images = image_run
    port = image_server
    expected = load(run_dir).predict([str(path) for path in images])
    encoded = [base64.b64encode(path.read_bytes()).decode() for path in images]
    status, body = call(port, "POST", "/predict", {"inputs": encoded})
    assert status == 200 and [p["label"] for p in body["predictions"]] == [p["label"] for p in expected]
    status, body = post_form(port, [("files", path.name, path.read_bytes()) for path in images])
    assert status == 200 and [p["label"] for p in body["predictions"]] == [p["label"] for p in expected]
    status, body = call(port, "POST", "/predict", {"inputs": ["bm90IGFuIGltYWdl"]})  # base64 of "not an image"
    assert status == 422 and "not a readable image" in body["error"]


# Requests that once crashed the handler (HTTP 500) or were misread; each must be a 4xx with a one-line reason,
# and the server must stay well afterwards.

@pytest.fixture(scope="module")
def text_server(small_text_run):
    with server(small_text_run[0].run_dir) as port:  # default limits: 64 inputs per request
        yield port


def one_line_error(response: tuple[int, dict], status: int) -> str:
    got, body = response
    assert got == status, body
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"]
    assert "\n" not in body["error"]
    return body["error"]


def post_form(port: int, parts: list[tuple[str, str | None, bytes]]) -> tuple[int, dict]:
    """multipart/form-data with (field name, file name or None for a plain field, content) parts."""
    boundary = "tuneforge-test-boundary"
    body = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        kind = "Content-Type: application/octet-stream\r\n" if filename else ""
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n{kind}\r\n".encode() + content + b"\r\n"
    return call(port, "POST", "/predict", body + f"--{boundary}--\r\n".encode(),
                {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def test_an_integer_past_pythons_digit_limit_is_422(text_server):
    # json.loads raises ValueError, not JSONDecodeError, for an int literal past Python's 4,300-digit conversion limit.
    body = b'{"inputs": [' + b"7" * 4301 + b"]}"
    assert "has more than 4300 digits" in one_line_error(call(text_server, "POST", "/predict", body), 422)
    assert call(text_server, "POST", "/predict", {"inputs": ["fine"]})[0] == 200


def test_json_nested_100k_deep_is_422(text_server):
    # json.loads raises RecursionError long before 100,000 levels.
    body = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert "nested too deeply" in one_line_error(call(text_server, "POST", "/predict", body), 422)
    assert call(text_server, "POST", "/predict", {"inputs": ["fine"]})[0] == 200


def test_a_lone_surrogate_is_422(text_server, small_text_run):
    # "\ud800" is valid JSON and becomes a Python str that no tokenizer or UTF-8 encoder takes.
    body = b'{"inputs": ["fine", "bad \\ud800 text"]}'
    assert "input 1" in one_line_error(call(text_server, "POST", "/predict", body), 422)
    assert "input 0" in one_line_error(call(text_server, "POST", "/predict", b'{"input": "\\ud800"}'), 422)
    with pytest.raises(DataError, match="input 0 is not valid Unicode"):  # the Python API checks it the same way
        load(small_text_run[0].run_dir).predict("\ud800")
    assert call(text_server, "POST", "/predict", {"inputs": ["fine"]})[0] == 200


def test_too_many_multipart_inputs_is_422_like_json(text_server, image_server, image_run):
    parts = [("texts", None, b"good movie")] * 70
    message = one_line_error(post_form(text_server, parts), 422)
    assert message == "more than 64 inputs in one request; the limit is 64"
    image = image_run[1][0].read_bytes()
    message = one_line_error(post_form(image_server, [("files", "x.png", image)] * 70), 422)
    assert message == "more than 64 inputs in one request; the limit is 64"
    assert post_form(text_server, [("texts", None, b"good movie")] * 64)[0] == 200  # the limit itself is fine


def test_a_file_under_texts_or_a_text_under_files_is_422(text_server, image_server, image_run):
    message = one_line_error(post_form(text_server, [("texts", None, b"good"), ("texts", "a.txt", b"good")]), 422)
    assert "input 1" in message and "file" in message
    image = image_run[1][0].read_bytes()
    message = one_line_error(post_form(image_server, [("files", "a.png", image), ("files", None, b"good")]), 422)
    assert "input 1" in message and "file" in message
    assert post_form(text_server, [("texts", None, b"good")])[0] == 200


def test_a_decompression_bomb_is_422(image_server):
    """A 48 KB PNG of 20000 x 20000 pixels: PIL refuses to decode it, and that is the client's problem, not a 500."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buffer, format="PNG")
    bomb = buffer.getvalue()
    message = one_line_error(call(image_server, "POST", "/predict", {"inputs": [base64.b64encode(bomb).decode()]}), 422)
    assert "input 0 is not a readable image" in message and "DecompressionBomb" in message
    assert one_line_error(post_form(image_server, [("files", "bomb.png", bomb)]), 422)
    assert call(image_server, "POST", "/predict", {"inputs": []})[0] == 422  # and the server goes on


def test_a_body_that_never_arrives_times_out_and_frees_its_place(small_text_run):
    """A client that announces a body and sends one byte of it would hold a place in flight for ever: after
    --timeout it gets 408 and its place is free again, so slow clients cannot lock everyone out."""
    with server(small_text_run[0].run_dir, "--timeout", "2", "--max-concurrent", "2") as port:
        stalled = []
        for _ in range(2):  # every place in flight taken by a stalled body
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{")
            stalled.append(sock)
        time.sleep(0.5)
        assert call(port, "POST", "/predict", {"inputs": ["good"]})[0] == 429
        for sock in stalled:
            sock.settimeout(10)
            answer = b""
            while b"did not arrive" not in answer and (chunk := sock.recv(4096)):  # headers and body may come apart
                answer += chunk
            answer = answer.decode()
            assert answer.startswith("HTTP/1.1 408") and "did not arrive within 2 s" in answer
            sock.close()
        assert call(port, "POST", "/predict", {"inputs": ["good"]})[0] == 200
