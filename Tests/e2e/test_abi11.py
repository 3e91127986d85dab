"""What plugin ABI 1.1 adds, end to end through the real binary and the reference plugin:
a sink that never stalls a batching engine, busy errors with Retry-After, stop-sequence and
time-limit finishes, keep-alives and progress during prompt processing, probe-based backend
choice, model details, byte inputs and plugin shutdown. Engine-side facts come from the
reference engine's own stats file, not from the host."""
import base64
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import anthropic
import openai
import pytest

from conftest import REFERENCE_PLUGIN, ROOT, Server, engine_stays_stopped, read_stats, start_thread, wait_for_stats

USER = [{"role": "user", "content": "hello"}]


class RawStream:
    """One streaming request on a plain socket, so a test controls exactly when (and
    whether) the client reads, and sees SSE comments that SDKs hide."""

    def __init__(self, server: Server, path: str, body: dict, receive_buffer: int | None = None):
        self.sock = socket.socket()
        if receive_buffer:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", server.port))
        payload = json.dumps(body).encode()
        self.sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Content-Type: application/json\r\nContent-Length: " + str(len(payload)).encode()
                          + b"\r\n\r\n" + payload)
        self.received = b""

    def read_until(self, marker: bytes, timeout: float) -> bytes:
        """Reads until `marker` has arrived; returns everything received so far."""
        deadline = time.monotonic() + timeout
        while marker not in self.received:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.received += chunk
        assert marker in self.received, f"{marker!r} never arrived; got {self.received[-500:]!r}"
        return self.received

    def count_chunks_for(self, seconds: float) -> int:
        """Reads as fast as possible for `seconds`; returns how many SSE data frames arrived."""
        deadline = time.monotonic() + seconds
        count, tail = 0, b""
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                break
            if not chunk:
                break
            window = tail + chunk
            count += window.count(b"data: {")
            tail = window[-6:]
        return count

    def close(self):
        self.sock.close()


@pytest.fixture
def anthropic_client(server):
    return server.anthropic()


# ─── A batching engine is never stalled by a slow client ──────────────────────────────

def test_a_slow_reader_does_not_slow_the_other_streams_of_a_batching_engine(server):
    """Four streams decoded by one engine thread; one client stops reading. Its run pauses
    (the engine sees the backlog through the sink) while the other three keep their speed."""
    # Big tokens fill the slow client's socket buffers within a second, so the test then
    # measures the engine with one run's client truly stuck.
    server.load("batch", batching=1, repeat=1, token_delay_ms=2, reply="x" * 8000 + " ")
    body = {"model": "batch", "messages": USER, "stream": True, "max_tokens": 100000, "session_id": "slow-reader"}

    def fast_rate(streams) -> float:
        """Chunks per second of the slowest of `streams`, all read at full speed at once."""
        for stream in streams:
            stream.read_until(b"data: {", 10)
        threads = [start_thread(stream.count_chunks_for, 3) for stream in streams]
        return min(thread.join(10) for thread in threads) / 3

    # Baseline: four fast readers.
    streams = [RawStream(server, "/v1/chat/completions", body) for _ in range(4)]
    baseline = fast_rate(streams)
    server.post("/api/inference/cancel", {"session_id": "slow-reader"})
    for stream in streams:
        stream.close()
    assert server.wait_idle(10) == 0

    # Three fast readers and one that reads nothing, with a tiny receive buffer.
    slow = RawStream(server, "/v1/chat/completions", body, receive_buffer=4096)
    fast = [RawStream(server, "/v1/chat/completions", body) for _ in range(3)]
    slow.read_until(b"data: {", 10)
    time.sleep(1.5)  # the slow client's socket and the host's buffer for it are full by now
    with_slow_reader = fast_rate(fast)
    print(f"fast streams: {baseline:.0f} chunks/s each with four readers, {with_slow_reader:.0f} with one stuck reader")
    assert baseline > 20, "the baseline is too slow to compare"
    assert with_slow_reader >= 0.8 * baseline, "one slow client slowed the others down"

    # The slow run is paused, not dropped: reading again resumes it.
    assert slow.count_chunks_for(1.0) > 0
    assert server.post("/api/inference/cancel", {"session_id": "slow-reader"})[1] == {"cancelled": 4}
    for stream in [slow, *fast]:
        stream.close()
    assert server.wait_idle(10) == 0


# ─── Busy engines ─────────────────────────────────────────────────────────────────────

def test_a_busy_engine_answers_429_with_retry_after_in_each_dialect(server, openai_client, anthropic_client):
    # The engine does not tell the host its slots, so the host queues nothing and the engine refuses.
    server.load("one-slot", slots=1, busy_when_full=1, advertised_slots=0, retry_after_ms=1500, repeat=1, token_delay_ms=20)
    first = RawStream(server, "/v1/chat/completions",
                      {"model": "one-slot", "messages": USER, "stream": True, "max_tokens": 100000, "cancel_id": "holder"})
    first.read_until(b"data: {", 10)
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            openai_client.chat.completions.create(model="one-slot", messages=USER)
        assert caught.value.status_code == 429
        assert caught.value.response.headers["retry-after"] == "2"
        error = caught.value.body
        assert error["code"] == "rate_limit_exceeded" and "busy" in error["message"]

        # A stream that is refused before its first token gets the status too, not an in-band error.
        with pytest.raises(openai.RateLimitError):
            list(openai_client.chat.completions.create(model="one-slot", messages=USER, stream=True))

        with pytest.raises(anthropic.RateLimitError) as caught:
            anthropic_client.messages.create(model="one-slot", max_tokens=10, messages=USER)
        assert caught.value.response.headers["retry-after"] == "2"
        assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "rate_limit_error"
    finally:
        server.post("/api/inference/cancel", {"cancel_id": "holder"})
        first.close()
    assert server.wait_idle(10) == 0
    # The slot is free again.
    assert openai_client.chat.completions.create(model="one-slot", messages=USER, max_tokens=3).choices[0].message.content


# ─── Finish detail ────────────────────────────────────────────────────────────────────

def test_a_stop_sequence_is_reported_as_such_in_anthropic_and_as_stop_in_openai(server, openai_client, anthropic_client):
    server.load("script")  # replies "Hello from the Patchbay reference engine."
    message = anthropic_client.messages.create(model="script", max_tokens=50, messages=USER,
                                               stop_sequences=["never", "reference"])
    assert message.stop_reason == "stop_sequence"
    assert message.stop_sequence == "reference"
    assert message.content[0].text == "Hello from the Patchbay "

    with anthropic_client.messages.stream(model="script", max_tokens=50, messages=USER, stop_sequences=["Patchbay"]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello from the "
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "Patchbay"

    # Without a match the turn simply ends.
    plain = anthropic_client.messages.create(model="script", max_tokens=50, messages=USER, stop_sequences=["never"])
    assert plain.stop_reason == "end_turn" and plain.stop_sequence is None

    chat = openai_client.chat.completions.create(model="script", messages=USER, stop=["reference"])
    assert chat.choices[0].finish_reason == "stop"
    assert chat.choices[0].message.content == "Hello from the Patchbay "


def test_the_hosts_wall_clock_cap_stops_an_engine_that_ignores_its_budget(workdir):
    """The engine ignores max_wall_ms; the host's own watchdog stops it and reports a time limit."""
    server = Server(workdir, extra_args=["--max-generation-seconds", "2"])
    try:
        stats = str(workdir / "deaf.stats")
        server.load("deaf", ignore_wall_limit=1, repeat=1, token_delay_ms=20, stats_file=stats)
        started = time.monotonic()
        finish = None
        for chunk in server.openai().chat.completions.create(model="deaf", messages=USER, stream=True,
                                                             max_tokens=100000):
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        elapsed = time.monotonic() - started
        assert finish == "length"
        # The engine would go on for over half an hour; the host's backstop (the cap plus a
        # second) stopped it, and the engine's own counters say it stopped.
        assert 2 <= elapsed < 6, elapsed
        wait_for_stats(stats, active_runs=0)
        engine_stays_stopped(stats, settle=0.3)

        message = server.anthropic().messages.create(model="deaf", max_tokens=10000, messages=USER)
        assert message.stop_reason == "max_tokens"
        wait_for_stats(stats, active_runs=0)
    finally:
        server.stop()


# ─── Prompt processing: keep-alives, progress, a client that leaves ───────────────────

def test_a_long_prefill_sends_keep_alives_and_progress(server, workdir):
    server.load("prefill", prefill_ms=2500, progress_interval_ms=100)
    stream = RawStream(server, "/v1/chat/completions",
                       {"model": "prefill", "messages": [{"role": "user", "content": "one two three four five"}],
                        "stream": True, "return_progress": True})
    received = stream.read_until(b"[DONE]", 15)
    stream.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0]
    before_answer = body[:body.index(b'"content"')]
    assert before_answer.count(b": keep-alive") >= 1
    progress = [json.loads(line[6:])["prompt_progress"] for line in before_answer.split(b"\n")
                if line.startswith(b"data: ") and b"prompt_progress" in line]
    assert len(progress) >= 5
    assert all(p["total"] == progress[-1]["total"] and p["total"] > 0 for p in progress)
    assert [p["processed"] for p in progress] == sorted(p["processed"] for p in progress)
    assert progress[-1]["processed"] == progress[-1]["total"]
    assert progress[-1]["time_ms"] >= 2000


def test_without_return_progress_the_client_sees_only_keep_alives(server):
    server.load("prefill", prefill_ms=1500)
    stream = RawStream(server, "/v1/chat/completions", {"model": "prefill", "messages": USER, "stream": True})
    body = stream.read_until(b"[DONE]", 15)
    stream.close()
    assert b": keep-alive" in body and b"prompt_progress" not in body


def test_a_client_that_leaves_during_prefill_stops_the_engine(server, workdir):
    stats = str(workdir / "prefill.stats")
    server.load("prefill", prefill_ms=8000, repeat=1, stats_file=stats)
    stream = RawStream(server, "/v1/messages",
                       {"model": "prefill", "max_tokens": 1000, "messages": USER, "stream": True})
    stream.read_until(b": keep-alive", 5)
    assert read_stats(stats)["active_runs"] == 1
    stream.close()
    after = wait_for_stats(stats, timeout=4, active_runs=0)  # else the engine went on for a client that left
    assert after["produced_tokens"] == 0
    assert server.wait_idle() == 0


# ─── Two plugins for one file ─────────────────────────────────────────────────────────

def build_alternative_reference(workdir: Path, name: str, score: int) -> Path:
    """A second copy of the reference plugin under another name, that claims the same files."""
    out = workdir / f"lib{name}.so"
    sources = [ROOT / "Tests/ScriptedPlugin/reference_plugin.c", *(ROOT / "Plugins/PluginSupport").glob("*.c")]
    subprocess.run(["cc", "-shared", "-fPIC", "-fvisibility=hidden", f"-DREFERENCE_PLUGIN_NAME=\"{name}\"",
                    f"-DREFERENCE_PROBE_SCORE={score}", "-I", str(ROOT / "Sources/CPatchbayABI/include"),
                    "-I", str(ROOT / "Plugins/PluginSupport/include"), "-o", str(out), *map(str, sources), "-lpthread"],
                   check=True)
    return out


def backend_of(server: Server, model: str) -> str:
    [entry] = [m for m in server.get("/api/inference/status")[1]["models"] if m["model"] == model]
    return entry["backend"]


def test_two_plugins_for_one_file_the_default_the_preference_and_backend(workdir):
    alternative = build_alternative_reference(workdir, "reference-alt", 80)
    path = str(workdir / "either.ref")
    Path(path).write_text("reply=either\n")

    server = Server(workdir / "a", plugins=(REFERENCE_PLUGIN, alternative))
    try:
        # The documented default: the most confident probe (reference says 100, the copy 80).
        assert server.post("/api/inference/validate", {"model_path": path})[1]["backend"] == "reference"
        assert server.post("/api/inference/load", {"model_path": path})[0] == 200
        assert backend_of(server, "either") == "reference"
        # `backend` in the load body wins.
        status, body = server.post("/api/inference/load", {"model_path": path, "alias": "forced", "backend": "reference-alt"})
        assert status == 200, body
        assert backend_of(server, "forced") == "reference-alt"
        models = {m["id"]: m["backend"] for m in server.get("/v1/models")[1]["data"]}
        assert models == {"either": "reference", "forced": "reference-alt"}
    finally:
        server.stop()

    # The operator's preference beats the probe score.
    preferred = Server(workdir / "b", plugins=(REFERENCE_PLUGIN, alternative), extra_args=["--prefer-backend", "reference-alt"])
    try:
        assert preferred.post("/api/inference/load", {"model_path": path})[0] == 200
        assert backend_of(preferred, "either") == "reference-alt"
    finally:
        preferred.stop()


def test_a_file_no_plugin_can_load_is_refused_with_every_plugins_answer(server, workdir):
    path = workdir / "notes.txt"
    path.write_text("not a model")
    status, body = server.post("/api/inference/load", {"model_path": str(path)})
    assert status == 400
    assert body["error"]["code"] == "no_backend_for_format"
    assert "reference" in body["error"]["message"]


# ─── Model details, byte inputs, shutdown ─────────────────────────────────────────────

def test_model_details_are_on_v1_models_and_status(server):
    server.load("detailed", slots=3, context_length=2048, load_bytes=123456)
    [model] = server.get("/v1/models")[1]["data"]
    assert model["parallel_slots"] == 3
    assert model["training_context_length"] == 2048
    assert model["embedding_dimensions"] == 8
    assert model["size_bytes"] == 123456
    assert model["architecture"] == "reference"
    assert model["supports_tools"] is True
    [status] = server.get("/api/inference/status")[1]["models"]
    assert status["parallel_slots"] == 3 and status["architecture"] == "reference"


def test_images_reach_the_plugin_as_bytes_not_base64(server, openai_client):
    server.load("eyes", vision=1)
    image = b"\x89PNG\r\n\x1a\n" + os.urandom(1000)
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    reply = openai_client.chat.completions.create(model="eyes", messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": url}}]}])
    assert reply.choices[0].message.content.startswith(f"[image image-0: image/png, {len(image)} bytes]")

    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(model="eyes", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64"}}]}])
    assert caught.value.body["param"] == "messages[0].content[0].image_url.url"


def test_plugins_are_shut_down_after_their_models_at_exit(workdir):
    server = Server(workdir)
    server.load("bye")
    server.stop()
    assert server.process.returncode == 0
    log = server.log_path.read_text()
    assert "reference plugin shut down" in log
    assert log.index("model unloaded") < log.index("reference plugin shut down")
