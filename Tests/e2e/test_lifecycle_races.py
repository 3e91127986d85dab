"""Lifecycle races and clients that vanish, on the real binary with the reference engine.

The engine's own counters (`stats_file`) say whether a generation really stopped; the
host's `active_generations` says whether it let go of the run."""
import json
import re
import signal
import socket
import time

from conftest import (Server, engine_stays_stopped, read_stats, read_until_closed, recv_until, start_thread, wait_for,
                      wait_for_stats)


def chat_body(model, max_tokens=100000, stream=False, **extra):
    return {"model": model, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": "hi"}], **extra}


def open_request(server, path, body):
    """Sends a request on a raw socket and returns the socket, unread."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    data = json.dumps(body).encode()
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                 % (path.encode(), len(data)) + data)
    return sock


def test_non_streaming_client_that_disconnects_stops_the_engine(server, workdir):
    stats = workdir / "slow.stats"
    server.load("slow", reply="a b c d", repeat=1, token_delay_ms=20, stats_file=stats)
    for path, body in [("/v1/chat/completions", chat_body("slow")),
                       ("/v1/messages", {"model": "slow", "max_tokens": 100000, "messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/responses", {"model": "slow", "max_output_tokens": 100000, "input": "hi"})]:
        sock = open_request(server, path, body)
        wait_for(lambda: read_stats(stats)["active_runs"] == 1, 5, f"{path}: the engine to start the run")
        time.sleep(0.3)
        sock.close()
        wait_for_stats(stats, timeout=2, active_runs=0)  # the engine's own word that the run ended
        engine_stays_stopped(stats)
        wait_for(lambda: server.active_generations() == 0, 2, f"{path}: the host to let go of the run")


def test_streaming_client_that_leaves_during_prefill_stops_the_run(workdir):
    # Keep-alives are rare here, so noticing must come from the closed connection itself.
    server = Server(workdir, extra_args=["--keep-alive-seconds", "30"])
    try:
        stats = workdir / "prefill.stats"
        server.load("prefill", prefill_ms=20000, stats_file=stats)
        sock = open_request(server, "/v1/chat/completions", chat_body("prefill", stream=True))
        wait_for_stats(stats, active_runs=1)
        sock.close()
        assert wait_for_stats(stats, timeout=2, active_runs=0)["produced_tokens"] == 0
        wait_for(lambda: server.active_generations() == 0, 2, "the host to let go of the run")
    finally:
        server.stop()


def stalled_stream(server, model):
    """A stream whose client reads the first bytes and then never again, socket open."""
    sock = open_request(server, "/v1/chat/completions", chat_body(model, max_tokens=10_000_000, stream=True))
    recv_until(sock, b"data:", 10)
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
    assert read_stats(stats)["active_runs"] == 0
    sock.close()


def test_stalled_write_is_cut_after_the_write_timeout(workdir):
    server = Server(workdir, extra_args=["--write-timeout-seconds", "2"])
    try:
        stats = workdir / "fast.stats"
        server.load("fast", reply="word " * 50, repeat=1, stats_file=stats)
        sock = stalled_stream(server, "fast")
        wait_for(lambda: server.active_generations() == 0, 15, "the host to cut off a client that stopped reading")
        wait_for_stats(stats, active_runs=0)
        engine_stays_stopped(stats)
        # The server closed the connection: after what the kernel buffered, the stream ends.
        read_until_closed(sock, 10)
        sock.close()
        assert server.get("/health")[0] == 200
    finally:
        server.stop()


def test_unload_while_streaming_ends_the_stream_stops_the_engine_and_frees_the_model(server, workdir):
    stats = workdir / "m.stats"
    path = server.model_file("m", reply="a b", repeat=1, token_delay_ms=10, stats_file=stats)
    assert server.post("/api/inference/load", {"model_path": path})[0] == 200
    client = server.openai()

    def consume():
        chunks, finish = 0, None
        for chunk in client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=100000, stream=True):
            if chunk.choices:
                chunks += 1
                finish = chunk.choices[0].finish_reason or finish
        return chunks, finish

    stream = start_thread(consume)
    wait_for(lambda: read_stats(stats)["produced_tokens"] >= 10, 10, "the engine to produce ten tokens")
    status, body = server.post("/api/inference/unload", {"model_path": "m", "force_cancel_active": True})
    assert status == 200, body
    # The stream ends cleanly (a finish, then [DONE]; the SDK raises on a cut connection) ...
    chunks, finish = stream.join(10)
    assert finish == "stop" and 10 <= chunks < 100000
    # ... the engine stopped and released the model, in its own words ...
    assert read_stats(stats)["active_runs"] == 0
    engine_stays_stopped(stats)
    assert server.log_text().count(f"unloaded {path}") == 1
    # ... and the model is gone.
    assert server.get("/api/inference/status")[1]["loaded"] == []
    assert server.get("/v1/models")[1]["data"] == []
    status, body = server.post("/v1/chat/completions", chat_body("m", max_tokens=2))
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert server.active_generations() == 0


def test_concurrent_unloads_release_the_model_once(server):
    server.load("m", reply="a b", repeat=1, token_delay_ms=50)
    socks = [open_request(server, "/v1/chat/completions", chat_body("m", stream=True)) for _ in range(3)]
    wait_for(lambda: server.active_generations() == 3, 5, "three runs")
    threads = [start_thread(server.post, "/api/inference/unload", {"model_path": "m", "force_cancel_active": True})
               for _ in range(6)]
    results = [thread.join(30) for thread in threads]
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
    chat = start_thread(server.post, "/v1/chat/completions", chat_body("m", max_tokens=1000))
    time.sleep(0.3)  # the plugin is inside run_create now
    status, body = server.post("/api/inference/unload", {"model_path": "m", "force_cancel_active": True})
    chat_status, _ = chat.join(10)
    assert status == 200, body
    assert server.process.poll() is None
    assert chat_status in (200, 404, 499)
    log = server.log_path.read_text()
    created, unloaded = log.find("run created on"), log.find("unloaded " + str(server.workdir / "m.ref"))
    assert 0 <= created < unloaded, log


def test_unload_right_after_an_answer_is_not_refused_but_one_during_a_generation_is(server):
    # The engine still tidies up for half a second after its answer is out.
    server.load("m", reply="one two three", finish_delay_ms=500)
    status, answer = server.post("/v1/chat/completions", chat_body("m", max_tokens=50))
    assert status == 200 and answer["choices"][0]["message"]["content"] == "one two three"
    assert server.active_generations() == 1  # the run the engine has not returned yet
    started = time.monotonic()
    status, body = server.post("/api/inference/unload", {"model_path": "m"})
    assert status == 200, body
    assert time.monotonic() - started >= 0.2, "the unload did not wait for the engine to return"
    assert server.active_generations() == 0 and server.get("/api/inference/status")[1]["loaded"] == []

    # A generation still under way is another matter: without force_cancel_active it is refused.
    server.load("busy", reply="a b", repeat=1, token_delay_ms=20)
    sock = open_request(server, "/v1/chat/completions", chat_body("busy", stream=True))
    try:
        recv_until(sock, b"data:", 10)
        status, body = server.post("/api/inference/unload", {"model_path": "busy"})
        assert status == 409 and body["error"]["code"] == "active_generations", body
        assert "1 active generation" in body["error"]["message"], body
    finally:
        sock.close()
    assert server.post("/api/inference/unload", {"model_path": "busy", "force_cancel_active": True})[0] == 200


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
    try:
        stats = workdir / "m.stats"
        server.load("m", reply="a b", repeat=1, token_delay_ms=20, stats_file=stats)
        sock = open_request(server, "/v1/chat/completions", chat_body("m", stream=True))
        wait_for(lambda: server.active_generations() == 1, 5, "the run to start")
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
        # The stream ended cleanly rather than being cut, and the engine stopped.
        assert b"data: [DONE]" in read_until_closed(sock, 10)
        sock.close()
        assert read_stats(stats)["active_runs"] == 0
    finally:
        server.stop()  # it exited already: this checks that it exited 0 and logged no crash


def test_a_stream_whose_whole_answer_is_ready_at_once_ends_after_its_last_event(server):
    """A zero-delay engine may have sent everything, the terminal event too, before the host
    first reads: the stream must still end right after it, in every dialect, not go on with
    keep-alive comments. Many tiny runs, because which read sees the end is a race."""
    server.load("instant", reply="hi")
    requests = [("/v1/chat/completions", chat_body("instant", max_tokens=1, stream=True), b"data: [DONE]"),
                ("/v1/completions", {"model": "instant", "prompt": "x", "max_tokens": 1, "stream": True}, b"data: [DONE]"),
                ("/v1/messages", {"model": "instant", "max_tokens": 1, "stream": True,
                                  "messages": [{"role": "user", "content": "hi"}]}, b"event: message_stop"),
                ("/v1/responses", {"model": "instant", "input": "hi", "max_output_tokens": 1, "stream": True},
                 b"event: response.completed")]
    for round_index in range(100):
        for path, body, last in requests:
            data = json.dumps(body).encode()
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             b"Connection: close\r\nContent-Length: %d\r\n\r\n" % (path.encode(), len(data)) + data)
                received = read_until_closed(sock, timeout=10)
            assert last in received, (path, round_index, received[-300:])
