#!/usr/bin/env python3
"""Host-only benchmark: the reference plugin at zero token delay, so every cost measured is the host's.

Prints aggregate streamed chunks/s over concurrent streams, cancel-to-terminal-event
latency, and the host's idle resident memory. Run it with a release build:

    swift build -c release && python3 Benchmarks/host_bench.py
    PATCHBAY_BUILD_DIR=/path/to/release python3 Benchmarks/host_bench.py --streams 32 --tokens 20000

Targets (DESIGN.md): >= 50,000 chunks/s over 32 streams on 2 cores; cancel p95 <= 5 ms; idle RSS <= 40 MB.

--compare-observability measures instead what metrics and access logs cost the host. It starts
two servers alike but for them: one as a service runs by default (GET /metrics recording, one
access-log line per request, --log-level info, its log written to a file) and one with
--no-metrics --no-access-log (its log to a file too). Both get the model and a warm-up; then the
same streaming-throughput measurement runs against each in turn, --rounds times, the first
server alternating, so that a busy machine slows both alike. It prints each round, the median
aggregate chunks/s of each and the median of the per-round ratios with/without (target >= 0.95).
A stream is one request, so that measurement mostly weighs per-chunk costs; to weigh the
per-request ones (a log line, counters and histograms per request) it then does the same
with short non-streaming requests (max_tokens 1, 8 keep-alive clients): requests/s of each
and their ratio. It checks that the settings took (/metrics 200 and counting on one, 404 on
the other; access-log lines in one log only), and fails only on a broken stream or request,
never on a missed target:

    PATCHBAY_BUILD_DIR=.build/debug python3 Benchmarks/host_bench.py --compare-observability --tokens 5000
"""
import argparse
import http.client
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
import urllib.error
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(base, process, what="patchbay"):
    for _ in range(1200):
        if process.poll() is not None:
            raise SystemExit(f"{what} exited at start ({process.returncode})")
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not start")


def short_requests(port, clients, per_client):
    """Non-streaming chats of one token, `clients` keep-alive connections in parallel; requests/s."""
    body = json.dumps({"model": "fast", "max_tokens": 1, "messages": [{"role": "user", "content": "go"}]})
    failures = []

    def run():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            for _ in range(per_client):
                conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 200 or b'"choices"' not in data:
                    failures.append(f"{resp.status} {data[:200]!r}")
                    return
        except OSError as err:
            failures.append(repr(err))
        finally:
            conn.close()

    threads = [threading.Thread(target=run) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    assert not failures, f"short requests failed: {failures[:3]}"
    return clients * per_client / elapsed


def compare_observability(bin_dir, work, plugins, args):
    """Streaming throughput (and short requests/s) with metrics and access log on and off,
    two servers, interleaved rounds (see the docstring)."""
    from harness import interleaved  # beside this script; only the comparison needs it
    binary = bin_dir / "patchbay"
    help_text = subprocess.run([str(binary), "serve", "--help"], capture_output=True, text=True).stdout
    if "--no-metrics" not in help_text or "--no-access-log" not in help_text:
        raise SystemExit(f"{binary} predates --no-metrics / --no-access-log; rebuild it, or point "
                         "PATCHBAY_BUILD_DIR at a build that has them (e.g. .build/debug)")
    sides = {"with": [], "without": ["--no-metrics", "--no-access-log"]}
    servers = {}
    try:
        for name, extra in sides.items():
            port = free_port()
            log_path = work / f"server-{name}.log"
            process = subprocess.Popen([str(binary), "serve", "--host", "127.0.0.1", "--port", str(port),
                                        "--plugin-dir", str(plugins), "--log-level", "info", *extra],
                                       stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
            servers[name] = {"port": port, "base": f"http://127.0.0.1:{port}", "process": process, "log": log_path}
            wait_health(servers[name]["base"], process)
            post(servers[name]["base"], "/api/inference/load", {"model_path": str(work / "fast.ref")})
            throughput(port, 4, 2000)  # warm-up
            short_requests(port, 4, 50)

        print(f"machine: {os.cpu_count()} cores; build: {bin_dir}; load average {os.getloadavg()[0]:.2f}")
        print(f"with:    {' '.join(servers['with']['process'].args[1:])}\n"
              f"without: {' '.join(servers['without']['process'].args[1:])}")
        print(f"streaming: {args.streams} streams x {args.tokens} tokens per round, {args.rounds} rounds per server")
        rates = {name: {} for name in servers}
        for r, name in interleaved(list(servers), args.rounds):
            rate, total, elapsed = throughput(servers[name]["port"], args.streams, args.tokens)
            rates[name][r] = rate
            print(f"  round {r + 1} {name:8s}: {rate:10,.0f} chunks/s ({total:,} chunks in {elapsed:.2f} s)")
        ratios = [rates["with"][r] / rates["without"][r] for r in range(args.rounds)]
        with_rate = statistics.median(rates["with"].values())
        without_rate = statistics.median(rates["without"].values())
        ratio = statistics.median(ratios)

        clients, per_client = 8, args.short_requests // 8
        print(f"short requests: {clients} keep-alive clients x {per_client} non-streaming chats of 1 token, "
              f"{args.rounds} rounds per server")
        short = {name: {} for name in servers}
        for r, name in interleaved(list(servers), args.rounds):
            short[name][r] = short_requests(servers[name]["port"], clients, per_client)
            print(f"  round {r + 1} {name:8s}: {short[name][r]:8,.0f} requests/s")
        short_ratio = statistics.median(short["with"][r] / short["without"][r] for r in range(args.rounds))

        # The settings took: /metrics counts on one and is gone on the other; log lines in one log only.
        with urllib.request.urlopen(servers["with"]["base"] + "/metrics", timeout=10) as resp:
            exposition = resp.read().decode()
        counted = "patchbay_generated_tokens_total" in exposition
        try:
            urllib.request.urlopen(servers["without"]["base"] + "/metrics", timeout=10)
            without_metrics = 200
        except urllib.error.HTTPError as err:
            without_metrics = err.code
        lines = {name: sum(1 for line in server["log"].read_text(errors="replace").splitlines()
                           if "route=POST /v1/chat/completions" in line) for name, server in servers.items()}

        print(f"\nmetrics + access log on / off (median of {args.rounds} rounds each; ratio: median of per-round ratios)")
        print(f"  streaming chunks/s:  with {with_rate:10,.0f}   without {without_rate:10,.0f}   "
              f"ratio {ratio:.3f}   target >= 0.95{'' if ratio >= 0.95 else '   (missed)'}")
        print(f"  short requests/s:    with {statistics.median(short['with'].values()):10,.0f}   "
              f"without {statistics.median(short['without'].values()):10,.0f}   ratio {short_ratio:.3f}")
        print(f"  check: /metrics with: 200, generated tokens counted: {counted}; without: {without_metrics}; "
              f"access-log lines for chat requests: with {lines['with']:,}, without {lines['without']:,}; "
              f"load average now {os.getloadavg()[0]:.2f}")
        if not counted or without_metrics != 404 or lines["with"] == 0 or lines["without"] != 0:
            raise SystemExit("FAIL: the servers did not run with the observability settings asked for")
    finally:
        for server in servers.values():
            server["process"].send_signal(signal.SIGTERM)
            server["process"].wait(timeout=30)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=20000, help="tokens per stream")
    parser.add_argument("--cancel-rounds", type=int, default=100)
    parser.add_argument("--compare-observability", action="store_true",
                        help="metrics and access log on against off, two servers, interleaved (see above)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per server with --compare-observability")
    parser.add_argument("--short-requests", type=int, default=2000,
                        help="short requests per round with --compare-observability")
    args = parser.parse_args()

    bin_dir = build_dir()
    work = Path(tempfile.mkdtemp(prefix="patchbay-bench-"))
    plugins = work / "plugins"
    plugins.mkdir()
    os.symlink(bin_dir / "libPatchbayReferencePlugin.so", plugins / "libPatchbayReferencePlugin.so")
    (work / "fast.ref").write_text("repeat=1\ntoken_delay_ms=0\ncontext_length=1000000\n")
    if args.compare_observability:
        try:
            compare_observability(bin_dir, work, plugins, args)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
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
