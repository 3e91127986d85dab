"""Lifecycle races and clients that vanish, on the real binary with the reference engine.

The engine's own counters (`stats_file`) say whether a generation really stopped; the
host's `active_generations` says whether it let go of the run."""
import json
import re
import signal
import socket
import threading
import time

from conftest import Server, read_stats


def chat_body(model, max_tokens=100000, stream=False, **extra):
    return {"model": model, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": "hi"}], **extra}


def open_request(server, path, body):
    """Sends a request on a raw socket and returns the socket, unread."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    data = json.dumps(body).encode()
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                 % (path.encode(), len(data)) + data)
    return sock


def produced(stats_path):
    return read_stats(stats_path)["produced_tokens"]


def wait_until(predicate, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_non_streaming_client_that_disconnects_stops_the_engine(server, workdir):
    stats = workdir / "slow.stats"
    server.load("slow", reply="a b c d", repeat=1, token_delay_ms=20, stats_file=stats)
    for path, body in [("/v1/chat/completions", chat_body("slow")),
                       ("/v1/messages", {"model": "slow", "max_tokens": 100000, "messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/responses", {"model": "slow", "max_output_tokens": 100000, "input": "hi"})]:
        sock = open_request(server, path, body)
        assert wait_until(lambda: server.active_generations() == 1, 5)
        time.sleep(0.3)
        sock.close()
        assert wait_until(lambda: server.active_generations() == 0, 2), path
        stopped_at = produced(stats)
        time.sleep(0.5)
        assert produced(stats) == stopped_at, f"{path}: the engine kept generating for nobody"


def test_streaming_client_that_leaves_during_prefill_stops_the_run(workdir):
    # Keep-alives are rare here, so noticing must come from the closed connection itself.
    server = Server(workdir, extra_args=["--keep-alive-seconds", "30"])
    try:
        stats = workdir / "prefill.stats"
        server.load("prefill", prefill_ms=20000, stats_file=stats)
        sock = open_request(server, "/v1/chat/completions", chat_body("prefill", stream=True))
        assert wait_until(lambda: server.active_generations() == 1, 5)
        started = time.time()
        sock.close()
        assert wait_until(lambda: server.active_generations() == 0, 2)
        assert time.time() - started < 2
        assert produced(stats) == 0
    finally:
        server.stop()


def stalled_stream(server, model):
    """A stream whose client reads the first bytes and then never again, socket open."""
    sock = open_request(server, "/v1/chat/completions", chat_body(model, max_tokens=10_000_000, stream=True))
    sock.recv(1000)
    return sock


def test_client_that_stops_reading_does_not_hold_unload(server, workdir):
    stats = workdir / "fast.stats"
    server.load("fast", reply="word " * 50, repeat=1, stats_file=stats)
    sock = stalled_stream(server, "fast")
    time.sleep(2)  # long enough for every buffer between engine and client to fill
    assert server.active_generations() == 1
    started = time.time()
    status, body = server.post("/api/inference/unload", {"model_path": "fast", "force_cancel_active": True})
    assert status == 200, body
    assert time.time() - started < 3
    assert server.active_generations() == 0
    sock.close()


def test_stalled_write_is_cut_after_the_write_timeout(workdir):
    server = Server(workdir, extra_args=["--write-timeout-seconds", "2"])
    try:
        stats = workdir / "fast.stats"
        server.load("fast", reply="word " * 50, repeat=1, stats_file=stats)
        sock = stalled_stream(server, "fast")
        assert wait_until(lambda: server.active_generations() == 0, 15), "a client that stopped reading held its run"
        stopped_at = produced(stats)
        time.sleep(0.5)
        assert produced(stats) == stopped_at
        # The server closed the connection: after what the kernel buffered, the stream ends.
        sock.settimeout(10)
        while sock.recv(1 << 20):
            pass
        sock.close()
        assert server.get("/health")[0] == 200
    finally:
        server.stop()


def test_concurrent_unloads_release_the_model_once(server):
    server.load("m", reply="a b", repeat=1, token_delay_ms=50)
    socks = [open_request(server, "/v1/chat/completions", chat_body("m", stream=True)) for _ in range(3)]
    assert wait_until(lambda: server.active_generations() == 3, 5)
    results = []

    def unload():
        results.append(server.post("/api/inference/unload", {"model_path": "m", "force_cancel_active": True}))

    threads = [threading.Thread(target=unload) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    # Those that overlapped the first one waited for it; those that came after it found nothing.
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 404} and 200 in statuses, results
    assert server.process.poll() is None
    log = server.log_path.read_text()
    assert len(re.findall(r"unloaded .*m\.ref", log)) == 1, log  # the engine's own word
    assert server.get("/api/inference/status")[1]["loaded"] == []
    for sock in socks:
        sock.close()


def test_unload_during_run_create_waits_for_it(server):
    server.load("m", reply="a b", repeat=1, token_delay_ms=20, create_delay_ms=1000)
    replies = []
    chat = threading.Thread(target=lambda: replies.append(server.post("/v1/chat/completions", chat_body("m", max_tokens=1000))))
    chat.start()
    time.sleep(0.3)  # the plugin is inside run_create now
    status, body = server.post("/api/inference/unload", {"model_path": "m", "force_cancel_active": True})
    chat.join(10)
    assert status == 200, body
    assert server.process.poll() is None
    [(chat_status, _)] = replies
    assert chat_status in (200, 404, 499)
    log = server.log_path.read_text()
    created, unloaded = log.find("run created on"), log.find("unloaded " + str(server.workdir / "m.ref"))
    assert 0 <= created < unloaded, log


def test_cancel_that_races_a_natural_finish_does_not_cancel_the_next_run(server):
    server.load("m", reply="one two three")
    status, first = server.post("/v1/chat/completions", chat_body("m", max_tokens=50, cancel_id="stop-me"))
    assert status == 200 and first["choices"][0]["finish_reason"] == "stop"
    # The user's Stop arrives just after the answer finished: a no-op, not a stashed cancel.
    assert server.post("/api/inference/cancel", {"cancel_id": "stop-me"}) == (200, {"cancelled": 0})
    status, second = server.post("/v1/chat/completions", chat_body("m", max_tokens=50, cancel_id="stop-me"))
    assert status == 200
    assert second["choices"][0]["finish_reason"] == "stop"
    assert second["choices"][0]["message"]["content"] == "one two three"


def test_cancel_before_its_request_still_wins(server):
    server.load("m", reply="a b", repeat=1, token_delay_ms=20)
    assert server.post("/api/inference/cancel", {"cancel_id": "early"}) == (200, {"cancelled": 0})
    status, body = server.post("/v1/chat/completions", chat_body("m", max_tokens=1000, cancel_id="early"))
    assert status == 200
    assert body["choices"][0]["finish_reason"] in ("stop", "cancelled")
    assert body["usage"]["completion_tokens"] < 5


def test_shutdown_refuses_new_generations_and_a_second_signal_ends_the_grace(workdir):
    server = Server(workdir, extra_args=["--shutdown-grace-seconds", "60"])
    server.load("m", reply="a b", repeat=1, token_delay_ms=20)
    sock = open_request(server, "/v1/chat/completions", chat_body("m", stream=True))
    assert wait_until(lambda: server.active_generations() == 1, 5)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert server.process.poll() is None, "the grace period let the stream go on"
    status, error = server.post("/v1/chat/completions", chat_body("m", max_tokens=2))
    assert status == 503 and error["error"]["code"] == "server_shutting_down"
    status, error = server.post("/v1/messages", {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 503 and error["type"] == "error"
    assert server.post("/api/inference/load", {"model_path": server.model_file("other")})[0] == 503
    started = time.time()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=15)
    assert time.time() - started < 10
    assert server.process.returncode == 0
    # The stream ended cleanly rather than being cut.
    sock.settimeout(5)
    data = b""
    while chunk := sock.recv(1 << 16):
        data += chunk
    assert b"data: [DONE]" in data
    sock.close()
