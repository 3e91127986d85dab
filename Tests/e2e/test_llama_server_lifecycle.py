"""A llama-server child through the host's lifecycle while it streams: an unload, and a
SIGTERM whose grace period either runs out (the run is cancelled) or outlasts the run (it
finishes whole). Each time the stream must end cleanly, the child must be gone, and the host
must exit 0 (Server.stop checks its log for crashes too)."""
import signal
import time

import test_llama_server
from conftest import start_thread, wait_for
from llama_child import llama_children, wait_gone
from test_llama_server import (GREEDY, LONG_ANSWER, SMOLLM2, load_smollm2, start_server, start_stream,
                               stop_and_clean_up, the_child)
from test_llama_server import server  # noqa: F401 - a host of the test's own

pytestmark = test_llama_server.pytestmark


def test_unload_while_streaming_ends_the_stream_stops_llama_server_and_frees_the_model(server):  # noqa: F811
    load_smollm2(server)
    child = the_child(server)
    stream, progress = start_stream(server.openai(timeout=120), "unload-me", LONG_ANSWER, max_tokens=4000)
    wait_for(lambda: progress["chunks"] >= 5, 60, "five streamed tokens")
    assert child.busy()
    status, body = server.post("/api/inference/unload", {"model_path": SMOLLM2, "force_cancel_active": True})
    assert status == 200, body
    # The stream ends cleanly (the SDK raises on a connection cut without [DONE]) ...
    result = stream.join(10)
    assert result["finish"] == "stop" and result["chunks"] < 4000
    # ... the engine is gone with its process ...
    assert wait_gone(child.pid, timeout=10), "llama-server outlived the unload"
    assert llama_children(server.process.pid) == []
    # ... and so is the model.
    assert server.get("/api/inference/status")[1]["loaded"] == []
    assert server.get("/v1/models")[1]["data"] == []
    status, body = server.post("/v1/chat/completions", {"model": "SmolLM2-135M-Instruct.Q4_1",
                                                        "messages": LONG_ANSWER, "max_tokens": 4})
    assert status == 404 and body["error"]["code"] == "model_not_found", body
    assert server.active_generations() == 0


def test_sigterm_mid_stream_lets_the_grace_run_then_cancels_and_takes_the_child_along():
    server = start_server(extra_args=["--shutdown-grace-seconds", "2"])
    try:
        load_smollm2(server)
        child = the_child(server)
        stream, progress = start_stream(server.openai(timeout=120), "sigterm-me", LONG_ANSWER, max_tokens=4000)
        wait_for(lambda: progress["chunks"] >= 5, 60, "five streamed tokens")
        server.process.send_signal(signal.SIGTERM)
        signalled, at_signal = time.monotonic(), progress["chunks"]
        # During the grace the run goes on, and a new one is refused.
        wait_for(lambda: progress["chunks"] > at_signal + 3, 30, "tokens after the signal, within the grace")
        status, body = server.post("/v1/chat/completions", {"messages": LONG_ANSWER, "max_tokens": 4})
        assert status == 503 and body["error"]["code"] == "server_shutting_down", body
        # Then the run is cancelled, its stream ends cleanly, and the host exits with its child.
        assert server.process.wait(timeout=30) == 0
        assert time.monotonic() - signalled >= 1.5, "the host did not wait for the grace period"
        result = stream.join(10)
        assert result["finish"] == "stop" and result["chunks"] < 4000
        assert wait_gone(child.pid, timeout=10), "llama-server outlived the host"
        assert "cancelled generations" in server.log_text()
    finally:
        stop_and_clean_up(server)  # exited already: checks exit 0 and a log without a crash


def test_a_run_that_finishes_within_the_grace_period_is_not_cut():
    server = start_server(extra_args=["--shutdown-grace-seconds", "120"])
    try:
        load_smollm2(server)
        child = the_child(server)
        client = server.openai(timeout=120)
        whole = client.chat.completions.create(model="default", messages=LONG_ANSWER, max_tokens=40, **GREEDY)
        assert whole.choices[0].finish_reason == "length"
        text = {"streamed": ""}

        def consume():
            finish = None
            for chunk in client.chat.completions.create(model="default", messages=LONG_ANSWER, max_tokens=40,
                                                        stream=True, **GREEDY):
                if chunk.choices:
                    text["streamed"] += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
            return finish

        stream = start_thread(consume)
        wait_for(lambda: text["streamed"], 60, "the first token")
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # The whole answer, as without the signal: the drain let it finish.
        assert stream.join(120) == "length"
        assert text["streamed"] == whole.choices[0].message.content
        # The host exits once the run is done, long before the end of its grace period.
        assert server.process.wait(timeout=30) == 0
        assert time.monotonic() - signalled < 60
        assert "cancelled generations" not in server.log_text()
        assert wait_gone(child.pid, timeout=10)
    finally:
        stop_and_clean_up(server)
