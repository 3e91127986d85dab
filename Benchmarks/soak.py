#!/usr/bin/env python3
"""Soak benchmark: concurrent streams against the real `patchbay` binary and the reference
plugin for a long while, under a cancel storm, with clients that misbehave.

    ~/.cache/patchbay/venv/bin/python Benchmarks/soak.py                    # 32 clients, 10 minutes
    ~/.cache/patchbay/venv/bin/python Benchmarks/soak.py --duration 60 --concurrency 16 --seed 3

It starts its own server on 127.0.0.1 (a private copy of the binary and plugin from
$PATCHBAY_BUILD_DIR, else .build/<--configuration>, else `swift build --show-bin-path`) with
`--keep-alive-seconds 0.25 --max-generation-seconds 20` (flags below), loads reference models
(a paced one, the same with batching=1, one with a 1.5 s prompt-processing delay, two with no
token delay (thread per run, and batching=1), one that ignores the request's wall-clock limit so that the host's watchdog
must stop it), and runs --concurrency client threads for --duration seconds. Each client
loops over behaviours, mixing /v1/chat/completions, /v1/completions, /v1/messages and
/v1/responses:

  stream        a stream read to its end              plain        a non-streamed request
  cancel-self   a stream cancelled by its cancel_id   session      a stream in a shared session_id
  early-cancel  the cancel arrives before the request plain-cancel a non-streamed request, cancelled
  disc-prefill  closes during prompt processing       disc-decode  closes after a few chunks
  disc-plain    closes a non-streamed request early   stop-reading reads a little, then stops reading
  slow-reader   pauses reading (a quarter of them for longer than the cap, on an engine with no
                token delay), then reads to the end
  cap           no max_tokens, on an engine that ignores its wall-clock limit: the host's
                watchdog must end it at the --max-generation-seconds cap

A storm thread cancels, every --storm-interval, a live client's cancel_id, a session_id,
a completion/message/response id learned from a stream, or an id nobody uses.

A client is hung when, while it reads, nothing arrives for --hang-seconds (default: the
generation cap + 10 s), or its request is not over within that long (plus its deliberate
pauses). At the end it prints requests by outcome per behaviour, hung clients, cancel
latencies, active_generations of /api/inference/status at rest, and the server's RSS
(start after a warm-up, peak, end; sampled every second).

Every client that leaves (disconnects, or stops reading and then closes) has a cancel_id;
--orphan-seconds after it closed, a cancel by that id must find nothing: a run it still finds
is orphaned (the server did not notice its client had gone).

Exit status 1 when: a client hung; the registry is not empty --rest-seconds after the last
client finished; a run was orphaned; a stream ended without its terminal event (broken);
any 5xx; the server died or still holds TCP connections at rest; or a final chat completion
fails.
"""
import argparse
import collections
import itertools
import json
import random
import re
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import LOCALHOST, Connection, NoResponse, Truncated, build_request, read_response  # noqa: E402

DIALECTS = {
    "chat": ("/v1/chat/completions", (b"data: [DONE]",)),
    "completions": ("/v1/completions", (b"data: [DONE]",)),
    "messages": ("/v1/messages", (b"event: message_stop", b"event: error")),
    "responses": ("/v1/responses", (b"event: response.completed", b"event: response.failed", b"event: response.incomplete")),
}
INBAND_ERRORS = (b'data: {"error"', b"event: error", b"event: response.failed")
ID_PATTERN = re.compile(rb'"id":"((?:chatcmpl-|cmpl-|msg_|resp_)[0-9A-Za-z]+)"')

BEHAVIOURS = {  # weight
    "stream": 22, "plain": 8, "cancel-self": 12, "session": 10, "early-cancel": 3, "plain-cancel": 4,
    "disc-prefill": 8, "disc-decode": 8, "disc-plain": 6, "stop-reading": 6, "slow-reader": 4, "cap": 2,
}


def body_for(dialect, model, max_tokens, stream, extra):
    if dialect == "chat":
        body = {"model": model, "messages": [{"role": "user", "content": "go"}], "stream": stream}
        if max_tokens:
            body["max_tokens"] = max_tokens
        if stream:
            body["stream_options"] = {"include_usage": True}
    elif dialect == "completions":
        body = {"model": model, "prompt": "go", "stream": stream}
        if max_tokens:
            body["max_tokens"] = max_tokens
    elif dialect == "messages":
        body = {"model": model, "max_tokens": max_tokens or 100000, "messages": [{"role": "user", "content": "go"}],
                "stream": stream}
    else:
        body = {"model": model, "input": "go", "stream": stream}
        if max_tokens:
            body["max_output_tokens"] = max_tokens
    body.update(extra)
    return body


class Client:
    """One request's life, as the storm and the report see it."""
    __slots__ = ("n", "behaviour", "dialect", "model", "cancel_id", "session_id", "response_id", "started", "cancelled_at",
                 "ended", "outcome", "detail", "stream")

    def __init__(self, n, behaviour, dialect, model, cancel_id=None, session_id=None):
        self.n, self.behaviour, self.dialect, self.model = n, behaviour, dialect, model
        self.cancel_id, self.session_id = cancel_id, session_id
        self.response_id = None
        self.started = time.monotonic()
        self.cancelled_at = None
        self.ended = None
        self.outcome = None
        self.detail = ""
        self.stream = None  # the SSE reader's state


class Soak:
    def __init__(self, args, server):
        self.args = args
        self.server = server
        self.port = server.port
        self.lock = threading.Lock()
        self.live: dict[int, Client] = {}
        self.counter = itertools.count()
        self.outcomes = collections.Counter()          # (behaviour, outcome)
        self.statuses = collections.Counter()
        self.examples = collections.defaultdict(list)
        self.cancel_latencies = []                     # cancel acknowledged -> end of the stream, seconds
        self.storm_counts = collections.Counter()
        self.stop_at = time.monotonic() + args.duration
        self.hang = args.hang_seconds
        self.stream_chunks = 0
        self.orphans = collections.Counter()           # behaviour -> runs still live after their client left
        self.probes = collections.Counter()
        self.probe_threads = []

    # ─── bookkeeping ───

    def note(self, client: Client, outcome: str, detail: str = ""):
        client.outcome, client.detail = outcome, detail
        client.ended = time.monotonic()
        with self.lock:
            self.live.pop(client.n, None)
            self.outcomes[(client.behaviour, outcome)] += 1
            if client.cancelled_at and outcome in ("cancelled", "completed") and client.behaviour != "slow-reader":
                self.cancel_latencies.append(client.ended - client.cancelled_at)
            if outcome in ("hung", "broken", "5xx", "error", "in-band error", "rejected") and len(self.examples[outcome]) < 10:
                self.examples[outcome].append(
                    f"#{client.n} {client.behaviour} {client.dialect} model={client.model} cancel_id={client.cancel_id} "
                    f"session_id={client.session_id} after {client.ended - client.started:.2f} s"
                    f"{f', cancel acknowledged {client.ended - client.cancelled_at:.2f} s before' if client.cancelled_at else ''}: {detail}")

    def register(self, client):
        with self.lock:
            self.live[client.n] = client

    def cancel(self, **target) -> int:
        try:
            status, body = harness.request_json(self.port, "POST", "/api/inference/cancel", target, timeout=10)
        except OSError as err:
            self.storm_counts["cancel request failed"] += 1
            with self.lock:
                if len(self.examples["cancel request failed"]) < 5:
                    self.examples["cancel request failed"].append(f"{target}: {err!r}")
            return 0
        with self.lock:
            self.statuses[status] += 1
        if status != 200:
            self.storm_counts[f"cancel answered {status}"] += 1
            return 0
        return int(body.get("cancelled", 0)) if isinstance(body, dict) else 0

    # ─── one request ───

    def open(self, client: Client, body: dict, rcvbuf=None):
        path = DIALECTS[client.dialect][0]
        conn = Connection(self.port, timeout=self.hang, rcvbuf=rcvbuf)
        conn.send(build_request("POST", path, self.port, json.dumps(body).encode()))
        return conn

    def read_head(self, client, conn):
        """The response head; records a non-200 answer (and its body) as the outcome."""
        status, reason, headers, _ = conn.read_head()
        with self.lock:
            self.statuses[status] += 1
        if status != 200:
            text = b""
            try:
                cl = harness.header(headers, "content-length")
                text = conn.read_exact(int(cl)) if cl else b""
            except (OSError, Truncated):
                pass
            self.note(client, "5xx" if status >= 500 else "rejected", f"{status} {reason} {text[:300]!r}")
            return None
        return headers

    def read_stream(self, client, conn, deadline, limit_chunks=None, on_chunk=None):
        """Reads SSE chunks until the terminal event and the body's end; returns True when it
        noted an outcome. `limit_chunks`: stop (return False) after that many more chunks; a
        later call goes on where this one stopped."""
        terminals = DIALECTS[client.dialect][1]
        st = client.stream
        if st is None:
            st = client.stream = {"tail": b"", "terminal": False, "count": 0, "inband": False, "chunks": conn.chunks()}
        read_now = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.note(client, "hung", f"not over after {self.hang:.0f} s (terminal seen: {st['terminal']})")
                return True
            conn.settimeout(min(self.hang, remaining))
            try:
                data = next(st["chunks"], None)
            except socket.timeout:
                why = (f"nothing for {self.hang:.0f} s while reading" if remaining > self.hang
                       else f"not over within {self.hang:.0f} s")
                self.note(client, "hung", f"{why} (terminal seen: {st['terminal']}, {st['count']} chunks so far)")
                return True
            except (Truncated, ConnectionResetError, OSError) as err:
                self.note(client, "broken", f"connection ended inside the stream after {st['count']} chunks "
                                            f"(terminal seen: {st['terminal']}): {err!r}; last bytes {st['tail'][-200:]!r}")
                return True
            if data is None:
                if st["terminal"]:
                    self.note(client, "in-band error" if st["inband"] else ("cancelled" if client.cancelled_at else "completed"),
                              st["tail"][-300:].decode("utf-8", "replace") if st["inband"] else "")
                else:
                    self.note(client, "broken", f"body ended without the terminal event after {st['count']} chunks; "
                                                f"last bytes {st['tail'][-300:]!r}")
                return True
            st["count"] += 1
            read_now += 1
            self.stream_chunks += 1
            window = st["tail"] + data
            if client.response_id is None:
                m = ID_PATTERN.search(window)
                if m:
                    client.response_id = m.group(1).decode()
            if any(t in window for t in terminals):
                st["terminal"] = True
            if any(e in window for e in INBAND_ERRORS):
                st["inband"] = True
            st["tail"] = window[-400:]
            if on_chunk:
                on_chunk(st["count"])
            if limit_chunks is not None and read_now >= limit_chunks:
                return False

    def read_plain(self, client, conn, deadline):
        conn.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            resp = read_response(conn, body_limit=1 << 26)
        except socket.timeout:
            self.note(client, "hung", f"no answer to a non-streamed request within {self.hang:.0f} s")
            return
        except (NoResponse, Truncated, OSError) as err:
            self.note(client, "broken", f"non-streamed request: {err!r}")
            return
        with self.lock:
            self.statuses[resp.status] += 1
        if resp.status != 200:
            self.note(client, "5xx" if resp.status >= 500 else "rejected", f"{resp.status} {resp.body[:300]!r}")
            return
        try:
            json.loads(resp.body)
        except ValueError:
            self.note(client, "broken", f"200 with a body that is not JSON: {resp.body[:200]!r}")
            return
        self.note(client, "cancelled" if client.cancelled_at else "completed")

    # ─── behaviours ───

    def run_client(self, r: random.Random, behaviour: str):
        n = next(self.counter)
        dialect = r.choice(list(DIALECTS))
        model = r.choice(["paced", "paced", "batched", "prefill"])
        extra, cancel_id, session_id = {}, None, None
        if behaviour in ("cancel-self", "early-cancel", "plain-cancel", "disc-prefill", "disc-decode", "disc-plain",
                         "stop-reading") or r.random() < 0.3:
            cancel_id = f"soak-{self.args.seed}-{n}"
            extra["cancel_id"] = cancel_id
        if behaviour == "session" or r.random() < 0.15:
            session_id = f"sess-{r.randrange(self.args.sessions)}"
            extra["session_id"] = session_id
        stream = behaviour not in ("plain", "disc-plain", "plain-cancel")
        max_tokens = r.randint(5, 300)
        if behaviour == "disc-prefill":
            model = "prefill"
        elif behaviour == "stop-reading":
            model = r.choice(["firehose", "firehose-batched", "paced", "batched"])
            max_tokens = 10_000_000 if model.startswith("firehose") else r.randint(300, 3000)
        elif behaviour == "cap":
            model, max_tokens = "stubborn", None
            dialect = r.choice(["chat", "completions", "responses"])
        elif behaviour == "disc-plain":
            max_tokens = r.randint(200, 1000)
        elif behaviour == "slow-reader" and r.random() < 0.25:
            # Stops reading for longer than the cap, on an engine that fills the socket meanwhile.
            model, max_tokens = r.choice(["firehose", "firehose-batched"]), 10_000_000
        elif behaviour == "session":
            max_tokens = r.randint(100, 600)
        client = Client(n, behaviour, dialect, model, cancel_id, session_id)
        body = body_for(dialect, model, max_tokens, stream, extra)

        if behaviour == "early-cancel":
            self.cancel(cancel_id=cancel_id)
            client.cancelled_at = time.monotonic()
        self.register(client)
        rcvbuf = 4096 if behaviour == "stop-reading" else None
        try:
            conn = self.open(client, body, rcvbuf=rcvbuf)
        except OSError as err:
            self.note(client, "error", f"connect/send: {err!r}")
            return
        try:
            self.behave(r, client, conn, behaviour)
        except (NoResponse, Truncated, OSError) as err:
            if client.outcome is None:
                kind = "hung" if isinstance(err, socket.timeout) else "broken"
                self.note(client, kind, f"{type(err).__name__}: {err}")
        finally:
            conn.close(reset=client.outcome == "disconnected" and r.random() < 0.5)
            if client.outcome is None:
                self.note(client, "error", "no outcome recorded")
            if client.outcome in ("disconnected", "stalled"):
                # The run must stop once its client has gone: a cancel by its id a little later
                # must find nothing left to cancel.
                probe = threading.Timer(self.args.orphan_seconds, self.orphan_probe, args=(client,))
                probe.daemon = True
                probe.start()
                with self.lock:
                    self.probe_threads.append(probe)

    def behave(self, r, client, conn, behaviour):
        started = time.monotonic()
        deadline = started + self.hang
        if behaviour in ("plain", "plain-cancel"):
            if behaviour == "plain-cancel":
                threading.Timer(r.uniform(0.1, 1.0), self.self_cancel, args=(client,)).start()
            self.read_plain(client, conn, deadline)
            return
        if behaviour == "disc-plain":
            time.sleep(r.uniform(0.1, 1.5))
            self.note(client, "disconnected")
            return
        if behaviour == "disc-prefill":
            # The prompt takes 1.5 s; leave before it is over, with or without having seen the head.
            leave_at = started + r.uniform(0.05, 1.4)
            if r.random() < 0.5:
                conn.settimeout(self.hang)
                if self.read_head(client, conn) is None:
                    return
            time.sleep(max(0.0, leave_at - time.monotonic()))
            self.note(client, "disconnected")
            return

        conn.settimeout(self.hang)
        if self.read_head(client, conn) is None:
            return
        if behaviour == "disc-decode":
            if self.read_stream(client, conn, deadline, limit_chunks=r.randint(1, 30)):
                return
            self.note(client, "disconnected")
            return
        if behaviour == "stop-reading":
            if self.read_stream(client, conn, deadline, limit_chunks=r.randint(1, 10)):
                return
            time.sleep(r.uniform(2, self.args.stall_max))
            self.note(client, "stalled")
            return
        if behaviour == "slow-reader":
            if self.read_stream(client, conn, deadline, limit_chunks=r.randint(1, 5)):
                return
            long_pause = client.model.startswith("firehose")
            pause = r.uniform(1, 5) + (self.args.max_generation_seconds if long_pause else 0)
            time.sleep(pause)
            self.read_stream(client, conn, deadline + pause)
            return
        on_chunk = None
        if behaviour == "cancel-self":
            at = r.uniform(0.05, 2.0)
            fired = []

            def on_chunk(count):
                if not fired and time.monotonic() - started >= at:
                    fired.append(1)
                    threading.Thread(target=self.self_cancel, args=(client,), daemon=True).start()
        self.read_stream(client, conn, deadline, on_chunk=on_chunk)

    def orphan_probe(self, client):
        got = self.cancel(cancel_id=client.cancel_id)
        with self.lock:
            self.probes[client.behaviour] += 1
            if got:
                self.orphans[client.behaviour] += 1
                if len(self.examples["orphaned run"]) < 10:
                    self.examples["orphaned run"].append(
                        f"#{client.n} {client.behaviour} {client.dialect} model={client.model} cancel_id={client.cancel_id}: "
                        f"still live {self.args.orphan_seconds:.0f} s after its client closed the connection "
                        f"({client.ended - client.started:.2f} s after the request)")

    def self_cancel(self, client):
        if client.ended:
            return
        if self.cancel(cancel_id=client.cancel_id) and not client.ended:
            client.cancelled_at = client.cancelled_at or time.monotonic()

    # ─── threads ───

    def client_loop(self, index):
        r = random.Random(f"{self.args.seed}:client:{index}")
        names, weights = list(BEHAVIOURS), list(BEHAVIOURS.values())
        while time.monotonic() < self.stop_at:
            self.run_client(r, r.choices(names, weights=weights)[0])

    def storm(self):
        r = random.Random(f"{self.args.seed}:storm")
        while time.monotonic() < self.stop_at:
            time.sleep(r.uniform(0.5, 1.5) * self.args.storm_interval)
            with self.lock:
                live = list(self.live.values())
            pick = r.randrange(10)
            if pick < 4 and live:
                victims = [c for c in live if c.cancel_id]
                if victims:
                    c = r.choice(victims)
                    got = self.cancel(cancel_id=c.cancel_id)
                    self.storm_counts["by cancel_id"] += 1
                    self.storm_counts["by cancel_id: hit"] += got > 0
                    if got and not c.ended:
                        c.cancelled_at = c.cancelled_at or time.monotonic()
            elif pick < 7:
                session = f"sess-{r.randrange(self.args.sessions)}"
                members = [c for c in live if c.session_id == session]
                got = self.cancel(session_id=session)
                self.storm_counts["by session_id"] += 1
                self.storm_counts["by session_id: runs cancelled"] += got
                if got:
                    now = time.monotonic()
                    for c in members:
                        if not c.ended:
                            c.cancelled_at = c.cancelled_at or now
            elif pick < 9 and live:
                known = [c for c in live if c.response_id]
                if known:
                    c = r.choice(known)
                    key = {"chatcmpl-": "completion_id", "cmpl-": "completion_id", "msg_": "message_id",
                           "resp_": "response_id"}[re.match(r"(chatcmpl-|cmpl-|msg_|resp_)", c.response_id).group(1)]
                    got = self.cancel(**{key: c.response_id})
                    self.storm_counts[f"by {key}"] += 1
                    self.storm_counts[f"by {key}: hit"] += got > 0
                    if got and not c.ended:
                        c.cancelled_at = c.cancelled_at or time.monotonic()
            else:
                key = r.choice(["cancel_id", "session_id", "completion_id", "message_id", "response_id"])
                got = self.cancel(**{key: f"nobody-{r.getrandbits(48):x}"})
                self.storm_counts["by unknown ids"] += 1
                if got:
                    self.storm_counts["unknown ids that cancelled something (!)"] += got


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sessions", type=int, default=8, help="session_ids the clients share (default 8)")
    parser.add_argument("--storm-interval", type=float, default=0.05, help="mean seconds between storm cancels (default 0.05)")
    parser.add_argument("--stall-max", type=float, default=30, help="longest a stop-reading client keeps its socket (default 30)")
    parser.add_argument("--max-generation-seconds", type=int, default=20, help="the server's cap (default 20)")
    parser.add_argument("--keep-alive-seconds", type=float, default=0.25, help="the server's keep-alive interval (default 0.25)")
    parser.add_argument("--hang-seconds", type=float, help="a reading client that waits this long is hung "
                        "(default: the generation cap + 10 s)")
    parser.add_argument("--orphan-seconds", type=float, default=2,
                        help="a run still cancellable this long after its client closed is orphaned (default 2)")
    parser.add_argument("--rest-seconds", type=float, default=5, help="active_generations must be 0 this soon after the load")
    parser.add_argument("--settle-seconds", type=float, default=5, help="wait before the final RSS (default 5)")
    parser.add_argument("--configuration", default="debug", choices=["debug", "release"],
                        help="which .build folder, unless PATCHBAY_BUILD_DIR is set (default debug)")
    parser.add_argument("--keep", action="store_true", help="keep the server's work folder (and its log)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment for the server, e.g. MALLOC_ARENA_MAX=2 (repeatable)")
    parser.add_argument("--target", default=LOCALHOST, help="only 127.0.0.1 is accepted")
    args = parser.parse_args()
    harness.check_local(args.target)
    if args.hang_seconds is None:
        args.hang_seconds = args.max_generation_seconds + 10

    env = dict(kv.split("=", 1) for kv in args.server_env)
    server = harness.PatchbayServer(configuration=args.configuration, keep=args.keep, env=env, extra_args=[
        "--keep-alive-seconds", str(args.keep_alive_seconds), "--max-generation-seconds", str(args.max_generation_seconds)])
    print(f"patchbay {server.source} (copied to {server.workdir}), pid {server.pid}, port {server.port}; "
          f"{args.concurrency} clients for {args.duration:.0f} s, seed {args.seed}, keep-alive {args.keep_alive_seconds} s, "
          f"cap {args.max_generation_seconds} s, hung after {args.hang_seconds:.0f} s")
    failures = []
    try:
        common = {"repeat": 1, "slots": 1024, "context_length": 100_000_000}
        server.load("paced", token_delay_ms=10, **common)
        server.load("batched", token_delay_ms=10, batching=1, **common)
        server.load("prefill", token_delay_ms=10, prefill_ms=1500, progress_interval_ms=100, **common)
        server.load("firehose", token_delay_ms=0, **common)
        server.load("firehose-batched", token_delay_ms=0, batching=1, **common)
        server.load("stubborn", token_delay_ms=10, ignore_wall_limit=1, **common)

        # Warm-up: every dialect once, streamed and not, so the start RSS is a running server's.
        for dialect, (path, _) in DIALECTS.items():
            for stream in (False, True):
                conn = Connection(server.port, timeout=30)
                conn.send(build_request("POST", path, server.port, json.dumps(body_for(dialect, "paced", 5, stream, {})).encode()))
                read_response(conn)
                conn.close()
        harness.wait_idle(server.port, 5)
        time.sleep(1)
        start_rss = server.rss()
        start_fds = server.fds()

        soak = Soak(args, server)
        sampler = harness.RssSampler(server.pid, interval=1.0)
        sampler.start()
        active_samples = []
        stop_monitor = threading.Event()

        def monitor():
            t0 = time.monotonic()
            next_print = t0 + 10
            while not stop_monitor.is_set():
                value = harness.active_generations(server.port)
                with soak.lock:
                    live = len(soak.live)
                active_samples.append((time.monotonic() - t0, value, live))
                if time.monotonic() >= next_print:
                    next_print += 10
                    done = sum(soak.outcomes.values())
                    print(f"  {time.monotonic() - t0:5.0f} s: {done:,} requests done, {live} clients live, "
                          f"active_generations {value}, RSS {harness.mib(server.rss())}, "
                          f"hung {sum(v for (b, o), v in soak.outcomes.items() if o == 'hung')}", flush=True)
                stop_monitor.wait(1.0)

        threads = [threading.Thread(target=soak.client_loop, args=(i,), daemon=True) for i in range(args.concurrency)]
        threads.append(threading.Thread(target=soak.storm, daemon=True))
        mon = threading.Thread(target=monitor, daemon=True)
        load_started = time.monotonic()
        mon.start()
        for t in threads:
            t.start()
        join_by = soak.stop_at + args.hang_seconds + args.stall_max + 30
        for t in threads:
            t.join(max(0.1, join_by - time.monotonic()))
        for probe in list(soak.probe_threads):
            probe.join(args.orphan_seconds + 15)
        stuck_threads = sum(t.is_alive() for t in threads)
        load_over = time.monotonic()
        with soak.lock:
            still_live = list(soak.live.values())
        stop_monitor.set()
        mon.join(5)

        # At rest: every client has closed; the registry must drain.
        rest_value, rest_wait = harness.wait_idle(server.port, args.rest_seconds) if server.alive() else (None, 0)
        time.sleep(args.settle_seconds)
        sampler.stop()
        end_rss, end_fds, end_sockets = server.rss(), server.fds(), server.sockets()
        checks = harness.final_checks(server.port, "paced") if server.alive() else []

        total = sum(soak.outcomes.values())
        print()
        print(f"load: {load_over - load_started:.0f} s ({args.duration:.0f} s of new requests, then the last ones ended); "
              f"{total:,} requests, {soak.stream_chunks:,} stream chunks read")
        by_outcome = collections.Counter()
        for (b, o), v in soak.outcomes.items():
            by_outcome[o] += v
        print("requests by outcome: " + ", ".join(f"{o} {v:,}" for o, v in by_outcome.most_common()))
        outcomes = [o for o, _ in by_outcome.most_common()]
        width = max(len(b) for b in BEHAVIOURS) + 2
        print("  " + "behaviour".ljust(width) + "".join(o.rjust(max(len(o), 6) + 2) for o in outcomes))
        for b in BEHAVIOURS:
            print("  " + b.ljust(width) + "".join(f"{soak.outcomes.get((b, o), 0):,}".rjust(max(len(o), 6) + 2) for o in outcomes))
        print("HTTP statuses seen: " + ", ".join(f"{k} {v:,}" for k, v in sorted(soak.statuses.items())))
        print("cancel storm: " + ", ".join(f"{k} {v:,}" for k, v in sorted(soak.storm_counts.items())))
        lat = soak.cancel_latencies
        if lat:
            print(f"cancel acknowledged -> stream/response over at the client (slow readers aside): p50 {harness.percentile(lat, 0.5) * 1000:.1f} ms, "
                  f"p95 {harness.percentile(lat, 0.95) * 1000:.1f} ms, max {max(lat) * 1000:.1f} ms over {len(lat):,}")
        print("runs still live --orphan-seconds after their client left (found by a cancel of their cancel_id): " +
              (", ".join(f"{b} {soak.orphans[b]:,} of {soak.probes[b]:,}" for b in soak.probes) or "no probes"))
        hung = by_outcome.get("hung", 0)
        print(f"hung clients: {hung}" + (f" (+{len(still_live)} still open when the load ended, {stuck_threads} threads stuck)"
                                         if still_live or stuck_threads else ""))
        for kind, texts in soak.examples.items():
            print(f"  examples of {kind}:")
            for text in texts:
                print("    " + text[:700])
        peak_active = max((v for _, v, _ in active_samples if v is not None), default=None)
        excess = max(((v - live), t) for t, v, live in active_samples if v is not None) if active_samples else (None, None)
        print(f"active_generations: peak {peak_active} during the load; most above the clients live: {excess[0]} "
              f"(at {excess[1]:.0f} s)" if excess[0] is not None else "")
        print(f"active_generations at rest: {rest_value} ({rest_wait:.1f} s after the last client closed)")
        print(f"server RSS: start {harness.mib(start_rss)}, peak {harness.mib(sampler.peak)}, "
              f"end {harness.mib(end_rss)} (after {args.settle_seconds:.0f} s at rest)")
        print(f"server file descriptors: {start_fds} at the start, {end_fds} at the end; "
              f"its TCP connections at the end: {end_sockets or 'none'}")
        alive = server.alive()
        print(f"server alive at the end: {alive}")
        for name, ok, detail in checks:
            print(f"  final {name}: {'ok' if ok else 'FAILED'} ({detail})")
            if not ok:
                failures.append(f"final {name} failed")
        if hung or still_live:
            failures.append(f"{hung + len(still_live)} hung clients")
        if alive and end_sockets:
            failures.append(f"the server still holds {sum(end_sockets.values())} TCP connections after every client closed")
        if rest_value != 0:
            failures.append(f"active_generations is {rest_value} at rest, not 0")
        if by_outcome.get("broken"):
            failures.append(f"{by_outcome['broken']} streams or responses broken")
        orphans = sum(soak.orphans.values())
        if orphans:
            failures.append(f"{orphans} runs still live {args.orphan_seconds:.0f} s after their client left")
        if by_outcome.get("5xx"):
            failures.append(f"{by_outcome['5xx']} 5xx answers")
        if not alive:
            failures.append("the server died")
            print(server.log_tail())
    finally:
        harness.stop_and_report(server, failures, keep=args.keep)
    return harness.verdict(failures)


if __name__ == "__main__":
    sys.exit(main())
