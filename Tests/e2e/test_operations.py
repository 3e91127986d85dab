"""Running Patchbay like a service, against the real binary and the reference engine (whose own
counters say what the engine did): the admission queue in front of each model, /metrics,
the access log and x-request-id, models that load on first use from --models-dir and
unload when idle, and /health for load balancers."""
import json
import re
import signal
import socket
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import anthropic
import openai
import pytest

import conftest
from conftest import Server, read_stats, recv_until, start_thread, stop_and_clean_up, wait_for, wait_for_stats
from test_cancel import first_token, stream_in_background

USER = [{"role": "user", "content": "hi"}]


def start_server(*extra_args) -> Server:
    return conftest.start_server((conftest.REFERENCE_PLUGIN,), prefix="patchbay-ops-", extra_args=list(extra_args))


@pytest.fixture
def host():
    server = start_server("--max-queue", "2", "--keep-alive-seconds", "0.2")
    yield server
    stop_and_clean_up(server)


def metrics(server: Server, headers=None) -> dict:
    """GET /metrics as {'name{labels}': value}, histogram buckets left out."""
    request = urllib.request.Request(server.base + "/metrics", headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "_bucket{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def metric(server: Server, name: str, **labels) -> float:
    wanted = {f'{key}="{value}"' for key, value in labels.items()}
    total = 0.0
    for key, value in metrics(server).items():
        base, _, rest = key.partition("{")
        if base == name and wanted <= set(rest.rstrip("}").split(",")) - {""}:
            total += value
    return total


def queue_depth(server: Server, model: str) -> float:
    return metric(server, "patchbay_queue_depth", model=model)


def recv_count(sock: socket.socket, marker: bytes, count: int, timeout: float) -> bytes:
    """Reads until `marker` arrived `count` times (the body is chunked, so each comment is a
    frame of its own: count them, do not look for them back to back)."""
    deadline, received = time.monotonic() + timeout, b""
    while received.count(marker) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"{marker!r} did not arrive {count} times within {timeout} s; got {received[-300:]!r}"
        sock.settimeout(left)
        chunk = sock.recv(1 << 16)
        assert chunk, f"the connection closed; got {received[-300:]!r}"
        received += chunk
    return received


def raw_stream(server: Server, body: dict, headers: str = "") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + headers.encode() + b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return sock


# ─── Admission ──────────────────────────────────────────────────────────────

def test_slots_then_a_first_come_first_served_line_then_429(host, workdir):
    stats = workdir / "q.stats"
    host.load("q", slots=2, reply="one two three four", repeat=1, token_delay_ms=20, stats_file=stats)
    client = host.openai()
    holders = [stream_in_background(client, model="q", messages=USER, max_tokens=100000,
                                    extra_body={"cancel_id": f"holder-{i}"}) for i in range(2)]
    for worker, result in holders:
        first_token(worker, result)
    assert wait_for_stats(stats, active_runs=2)

    # Two more wait in line (the queue holds 2), in the order they came.
    finished = {}

    def queued(name):
        reply = client.chat.completions.create(model="q", messages=USER, max_tokens=20)
        finished[name] = time.monotonic()
        return reply

    first = start_thread(queued, "first")
    wait_for(lambda: queue_depth(host, "q") == 1, 10, "the first queued request")
    second = start_thread(queued, "second")
    wait_for(lambda: queue_depth(host, "q") == 2, 10, "the second queued request")
    assert read_stats(stats)["active_runs"] == 2, "a queued request reached the engine"

    # Past the queue: 429 with Retry-After, in each dialect's envelope.
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="q", messages=USER, max_tokens=5)
    assert caught.value.response.headers["retry-after"]
    assert caught.value.body["code"] == "rate_limit_exceeded", caught.value.body
    with pytest.raises(anthropic.RateLimitError) as refused:
        host.anthropic().messages.create(model="q", max_tokens=5, messages=USER)
    assert refused.value.body["error"]["type"] == "rate_limit_error", refused.value.body
    assert metric(host, "patchbay_http_requests_total", route="/v1/chat/completions", status="429") == 1

    # One slot frees: the first in line runs; the second waits for the next free slot.
    host.post("/api/inference/cancel", {"cancel_id": "holder-0"})
    first.join(30)
    wait_for(lambda: queue_depth(host, "q") == 0, 10, "the second to leave the line")
    second.join(30)
    assert finished["first"] < finished["second"], finished
    host.post("/api/inference/cancel", {"cancel_id": "holder-1"})
    for worker, _ in holders:
        worker.join(10)
    assert host.wait_idle() == 0


def test_a_cancel_or_a_departed_client_takes_a_request_out_of_line_at_once(host, workdir):
    stats = workdir / "one.stats"
    host.load("one", slots=1, reply="tick", repeat=1, token_delay_ms=20, stats_file=stats)
    client = host.openai()
    holder, holding = stream_in_background(client, model="one", messages=USER, max_tokens=100000,
                                           extra_body={"cancel_id": "holder"})
    first_token(holder, holding)

    waiting, result = stream_in_background(client, model="one", messages=USER, max_tokens=50,
                                           extra_body={"cancel_id": "in-line"})
    wait_for(lambda: queue_depth(host, "one") == 1, 10, "the request in line")
    status, body = host.post("/api/inference/cancel", {"cancel_id": "in-line"})
    assert status == 200 and body == {"cancelled": 1}, body
    ended = waiting.join(5)
    assert ended["finish"] == "stop" and ended["text"] == "", ended  # a cancelled run's usual answer
    assert queue_depth(host, "one") == 0

    # A client that leaves while in line: gone from the line within moments.
    sock = raw_stream(host, {"model": "one", "messages": USER, "max_tokens": 50, "stream": True})
    wait_for(lambda: queue_depth(host, "one") == 1, 10, "the raw request in line")
    before = metric(host, "patchbay_cancels_total", source="client_disconnect")
    sock.close()
    wait_for(lambda: queue_depth(host, "one") == 0, 5, "the departed client to leave the line")
    assert metric(host, "patchbay_cancels_total", source="client_disconnect") == before + 1

    # The engine only ever saw the holder.
    assert read_stats(stats)["active_runs"] == 1
    host.post("/api/inference/cancel", {"cancel_id": "holder"})
    holder.join(10)
    assert wait_for_stats(stats, active_runs=0)
    assert host.wait_idle() == 0


def test_a_stream_in_line_hears_keep_alive_comments(host):
    host.load("one", slots=1, reply="tick", repeat=1, token_delay_ms=20)
    client = host.openai()
    holder, holding = stream_in_background(client, model="one", messages=USER, max_tokens=100000,
                                           extra_body={"cancel_id": "holder"})
    first_token(holder, holding)
    sock = raw_stream(host, {"model": "one", "messages": USER, "max_tokens": 3, "stream": True})
    try:
        received = recv_count(sock, b": queued\n\n", 2, 10)
        assert b" 200 OK" in received.split(b"\r\n", 1)[0] and b"data:" not in received, received
        host.post("/api/inference/cancel", {"cancel_id": "holder"})
        received = recv_until(sock, b"data: [DONE]", 10, received)
        assert received.count(b'"content":"tick') == 3, received
    finally:
        sock.close()
        holder.join(10)


def test_a_request_that_waits_past_the_queue_timeout_gets_503(workdir):
    server = start_server("--queue-timeout-seconds", "1")
    try:
        server.load("one", slots=1, reply="tick", repeat=1, token_delay_ms=20)
        client = server.openai()
        holder, holding = stream_in_background(client, model="one", messages=USER, max_tokens=100000,
                                               extra_body={"cancel_id": "holder"})
        first_token(holder, holding)
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="one", messages=USER, max_tokens=3)
        assert caught.value.status_code == 503 and caught.value.body["code"] == "queue_timeout", caught.value.body
        assert 0.9 < time.monotonic() - started < 5
        server.post("/api/inference/cancel", {"cancel_id": "holder"})
        holder.join(10)
    finally:
        stop_and_clean_up(server)


# ─── Metrics ────────────────────────────────────────────────────────────────

def test_metrics_move_as_streams_run(host, workdir):
    stats = workdir / "m.stats"
    host.load("m", slots=4, reply="a b c d", repeat=1, token_delay_ms=10, stats_file=stats)
    client = host.openai()
    assert metric(host, "patchbay_model_loads_total", backend="reference", outcome="loaded") == 1
    before = metrics(host)
    streams = [stream_in_background(client, model="m", messages=USER, max_tokens=100000,
                                    extra_body={"cancel_id": f"s{i}"}) for i in range(3)]
    for worker, result in streams:
        first_token(worker, result)
    assert metric(host, "patchbay_active_runs", model="m") == 3
    status, _ = host.post("/api/inference/cancel", {"cancel_id": "s0"})
    streams[0][0].join(10)
    for i in (1, 2):
        host.post("/api/inference/cancel", {"cancel_id": f"s{i}"})
        streams[i][0].join(10)
    host.wait_idle()
    reply = client.chat.completions.create(model="m", messages=USER, max_tokens=8)
    assert reply.usage.completion_tokens == 8

    after = metrics(host)
    def delta(key):
        return after.get(key, 0) - before.get(key, 0)
    assert delta('patchbay_http_requests_total{route="/v1/chat/completions",dialect="openAI",status="200"}') == 4
    assert delta('patchbay_cancels_total{source="api"}') == 3
    assert delta('patchbay_time_to_first_token_seconds_count{model="m"}') == 4
    assert delta('patchbay_generated_tokens_total{model="m"}') >= 8 + 3
    assert delta('patchbay_prompt_tokens_total{model="m"}') == 4
    assert after['patchbay_active_runs{model="m"}'] == 0
    assert delta('patchbay_http_request_duration_seconds_count{route="/v1/chat/completions"}') == 4
    assert after.get('patchbay_generation_tokens_per_second_count{model="m"}', 0) >= 1


def test_every_route_is_metered_under_the_label_it_declares(host):
    """Each route's metric label comes from its declaration, so a route with a parameter is
    one label, not "unmatched" (as GET /v1/models/{id} once was), and an unknown path is."""
    host.load("org-model", reply="x")
    before = metrics(host)
    for model_id in ("org-model", "not-loaded"):
        request = urllib.request.Request(host.base + f"/v1/models/{model_id}")
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except urllib.error.HTTPError as error:
            assert error.code == 404
    for path in ("/v1/nothing-here", "/api/nothing-here", "/v1/messages/nothing-here"):
        try:
            urllib.request.urlopen(urllib.request.Request(host.base + path), timeout=10).close()
        except urllib.error.HTTPError as error:
            assert error.code == 404
    after = metrics(host)
    def delta(key):
        return after.get(key, 0) - before.get(key, 0)
    assert delta('patchbay_http_requests_total{route="/v1/models/{id}",dialect="openAI",status="200"}') == 1
    assert delta('patchbay_http_requests_total{route="/v1/models/{id}",dialect="openAI",status="404"}') == 1
    # Unknown paths share one label, in the dialect of the part of the API they fall under.
    assert delta('patchbay_http_requests_total{route="unmatched",dialect="openAI",status="404"}') == 1
    assert delta('patchbay_http_requests_total{route="unmatched",dialect="management",status="404"}') == 1
    assert delta('patchbay_http_requests_total{route="unmatched",dialect="anthropic",status="404"}') == 1
    assert not [key for key in after if "studio" in key]


def test_metrics_need_the_admin_key_like_the_management_routes(workdir):
    server = start_server("--api-key", "user-key", "--admin-key", "admin-key")
    try:
        for key, expected in ((None, 401), ("user-key", 401), ("admin-key", 200)):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            try:
                status = urllib.request.urlopen(urllib.request.Request(server.base + "/metrics", headers=headers)).status
            except urllib.error.HTTPError as error:
                status = error.code
            assert status == expected, (key, status)
    finally:
        stop_and_clean_up(server)


# ─── Access log and request ids ─────────────────────────────────────────────

def test_every_request_gets_one_access_log_line_with_its_id_in_json(workdir):
    server = start_server("--log-format", "json")
    try:
        server.load("m", reply="one two three", stats_file=workdir / "m.stats")
        client = server.openai()
        raw = client.chat.completions.with_raw_response.create(model="m", messages=USER, max_tokens=2,
                                                               extra_headers={"x-request-id": "trace-42"})
        assert raw.headers["x-request-id"] == "trace-42"
        streamed = client.chat.completions.with_raw_response.create(model="m", messages=USER, stream=True)
        generated = streamed.headers["x-request-id"]
        assert re.fullmatch(r"req_[0-9a-f]{16}", generated), generated
        list(streamed.parse())
        bad = client.models.with_raw_response.list(extra_headers={"x-request-id": "x" * 500})
        assert bad.headers["x-request-id"].startswith("req_")

        lines = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
        assert lines and all({"ts", "level", "message"} <= set(line) for line in lines), lines[:3]
        access = {line["request_id"]: line for line in lines if line["message"] == "request"}
        first = access["trace-42"]
        assert first["route"] == "POST /v1/chat/completions" and first["status"] == 200 and first["model"] == "m", first
        assert first["prompt_tokens"] == 1 and first["completion_tokens"] == 2 and first["finish"] == "length", first
        assert float(first["ttft_ms"]) >= 0 and float(first["duration_ms"]) >= float(first["ttft_ms"]), first
        second = access[generated]
        assert second["completion_tokens"] == 3 and second["finish"] == "stop", second
        # The plugin names the request in its own log line about the run.
        assert any(line["message"].startswith("request trace-42: run ended") for line in lines), lines
        assert sum(1 for line in lines if line.get("request_id") == "trace-42") == 1
    finally:
        stop_and_clean_up(server)


# ─── Models on demand ───────────────────────────────────────────────────────

def test_a_model_in_models_dir_loads_on_first_use_and_unloads_when_idle(workdir):
    models = Path(tempfile.mkdtemp(prefix="patchbay-models-", dir=workdir))
    (models / "slowpoke.ref").write_text("reply=loaded and answering\nload_ms=1500\n")
    (models / "README.txt").write_text("not a model")
    server = start_server("--models-dir", str(models), "--model-keep-alive", "2s", "--keep-alive-seconds", "0.2")
    try:
        listed = {m["id"]: m for m in server.get("/v1/models")[1]["data"]}
        assert listed == {"slowpoke": listed["slowpoke"]} and listed["slowpoke"]["loaded"] is False, listed

        # A stream naming it waits for the load, hearing keep-alive comments meanwhile.
        sock = raw_stream(server, {"model": "slowpoke", "messages": USER, "stream": True})
        received = recv_count(sock, b": loading model\n\n", 2, 10)
        received = recv_until(sock, b"data: [DONE]", 20, received)
        sock.close()
        assert b'"content":"loaded' in received, received
        listed = {m["id"]: m for m in server.get("/v1/models")[1]["data"]}
        assert listed["slowpoke"]["loaded"] is True and listed["slowpoke"]["keep_alive_seconds"] == 2, listed

        # Idle for its keep-alive: unloaded, and listed as loadable again.
        wait_for(lambda: server.get("/v1/models")[1]["data"][0]["loaded"] is False, 10, "the idle unload")
        assert server.get("/api/inference/status")[1]["loaded"] == []
        # Not a model there: still a 404.
        with pytest.raises(openai.NotFoundError):
            server.openai().chat.completions.create(model="README", messages=USER)
        # A non-streaming request loads it too.
        assert server.openai().chat.completions.create(model="slowpoke", messages=USER).choices[0].message.content
    finally:
        stop_and_clean_up(server)


def test_keep_alive_per_load(host):
    path = host.model_file("brief", reply="hi")
    status, body = host.post("/api/inference/load", {"model_path": path, "keep_alive": "1s"})
    assert status == 200, body
    forever = host.model_file("forever", reply="hi")
    assert host.post("/api/inference/load", {"model_path": forever, "keep_alive": -1})[0] == 200
    assert host.openai().chat.completions.create(model="brief", messages=USER).choices[0].message.content
    wait_for(lambda: "brief" not in host.get("/api/inference/status")[1]["loaded"], 10, "brief's idle unload")
    assert "forever" in host.get("/api/inference/status")[1]["loaded"]
    status, body = host.post("/api/inference/load", {"model_path": forever, "keep_alive": "soon"})
    assert status == 400 and "keep_alive" in json.dumps(body), body


# ─── Health ─────────────────────────────────────────────────────────────────

def test_health_says_ready_then_503_while_shutting_down(workdir):
    server = start_server("--shutdown-grace-seconds", "10")
    try:
        status, body = server.get("/health")
        assert status == 200 and body["status"] == "ok" and body["plugins"] == 1, body
        server.load("slow", reply="tick", repeat=1, token_delay_ms=20)
        worker, result = stream_in_background(server.openai(), model="slow", messages=USER, max_tokens=100000,
                                              extra_body={"cancel_id": "draining"})
        first_token(worker, result)
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: server.get("/health")[0] == 503, 5, "/health to say 503 during the drain")
        assert server.get("/health")[1]["status"] == "shutting_down"
        server.post("/api/inference/cancel", {"cancel_id": "draining"})
        worker.join(10)
    finally:
        stop_and_clean_up(server)
