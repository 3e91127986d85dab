#!/usr/bin/env python3
"""Host-only benchmark: the reference plugin at zero token delay, so every cost measured is the host's.

Prints aggregate streamed chunks/s over concurrent streams, cancel-to-terminal-event
latency, and the host's idle resident memory. Run it with a release build:

    swift build -c release && python3 Benchmarks/host_bench.py
    PATCHBAY_BUILD_DIR=/path/to/release python3 Benchmarks/host_bench.py --streams 32 --tokens 20000

Targets (DESIGN.md): >= 50,000 chunks/s over 32 streams on 2 cores; cancel p95 <= 5 ms; idle RSS <= 40 MB.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_dir() -> Path:
    if "PATCHBAY_BUILD_DIR" in os.environ:
        return Path(os.environ["PATCHBAY_BUILD_DIR"]).resolve()
    out = subprocess.run(["swift", "build", "-c", "release", "--show-bin-path"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def post(base, path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_stream(port, body) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
    return sock


def count_stream(sock) -> tuple[int, bool]:
    """Reads a whole SSE response; returns (content chunks, saw [DONE])."""
    chunks, tail, done = 0, b"", False
    marker = b'"delta":{"content"'
    marker_first = b'"delta":{"role":"assistant","content"'
    while True:
        data = sock.recv(1 << 18)
        if not data:
            break
        window = tail + data
        chunks += window.count(marker) + window.count(marker_first)
        done = done or b"[DONE]" in window
        tail = data[-40:]
        # Matches wholly inside the carried tail were already counted.
        chunks -= tail.count(marker) + tail.count(marker_first)
    sock.close()
    return chunks, done


def throughput(port, streams, tokens):
    results = [None] * streams

    def run(i):
        sock = open_stream(port, {"model": "fast", "stream": True, "max_tokens": tokens,
                                  "messages": [{"role": "user", "content": "go"}]})
        results[i] = count_stream(sock)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    total = sum(r[0] for r in results)
    assert all(r[1] for r in results), "a stream did not end with [DONE]"
    assert total == streams * tokens, f"expected {streams * tokens} chunks, counted {total}"
    return total / elapsed, total, elapsed


def cancel_latency(port, base, rounds):
    """Time from sending the cancel to the client seeing the stream's [DONE]."""
    latencies = []
    for i in range(rounds):
        sock = open_stream(port, {"model": "fast", "stream": True, "cancel_id": f"bench-{i}",
                                  "messages": [{"role": "user", "content": "go"}]})
        first = threading.Event()
        done_at = {}

        def reader():
            buffer = b""
            while True:
                data = sock.recv(1 << 18)
                if not data:
                    break
                if not first.is_set() and b"data:" in data:
                    first.set()
                buffer = buffer[-16:] + data
                if b"[DONE]" in buffer:
                    done_at["t"] = time.perf_counter()
                    break
            first.set()

        thread = threading.Thread(target=reader)
        thread.start()
        first.wait(10)
        time.sleep(0.01)
        sent = time.perf_counter()
        assert post(base, "/api/inference/cancel", {"cancel_id": f"bench-{i}"}) == {"cancelled": 1}
        thread.join(10)
        sock.close()
        latencies.append((done_at["t"] - sent) * 1000)
    latencies.sort()
    return statistics.median(latencies), latencies[int(0.95 * (len(latencies) - 1))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=20000, help="tokens per stream")
    parser.add_argument("--cancel-rounds", type=int, default=100)
    args = parser.parse_args()

    bin_dir = build_dir()
    work = Path(tempfile.mkdtemp(prefix="patchbay-bench-"))
    plugins = work / "plugins"
    plugins.mkdir()
    os.symlink(bin_dir / "libPatchbayReferencePlugin.so", plugins / "libPatchbayReferencePlugin.so")
    (work / "fast.ref").write_text("repeat=1\ntoken_delay_ms=0\ncontext_length=1000000\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(bin_dir / "patchbay"), "serve", "--port", str(port), "--plugin-dir", str(plugins),
                               "--log-level", "warning"])
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        time.sleep(1)
        idle_rss = rss_kib(server.pid)
        post(base, "/api/inference/load", {"model_path": str(work / "fast.ref")})
        loaded_rss = rss_kib(server.pid)

        throughput(port, 4, 2000)  # warm-up
        rate, total, elapsed = throughput(port, args.streams, args.tokens)
        p50, p95 = cancel_latency(port, base, args.cancel_rounds)
        after_rss = rss_kib(server.pid)

        print(f"machine: {os.cpu_count()} cores; build: {bin_dir}")
        print(f"throughput: {rate:,.0f} chunks/s aggregate over {args.streams} streams "
              f"({total:,} chunks in {elapsed:.2f} s)   target >= 50,000")
        print(f"cancel -> [DONE] at the client: p50 {p50:.2f} ms, p95 {p95:.2f} ms over {args.cancel_rounds} runs   target p95 <= 5 ms")
        print(f"host RSS: idle {idle_rss / 1024:.1f} MiB (target <= 40), with a model loaded {loaded_rss / 1024:.1f} MiB, "
              f"after the runs {after_rss / 1024:.1f} MiB")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
