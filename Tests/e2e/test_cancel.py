"""The stop button: POST /api/inference/cancel, verified from the engine's own counters
(the reference plugin's stats file), not from the host's answer."""
import threading
import time

from conftest import Server, engine_stays_stopped, read_stats, start_thread, wait_for, wait_for_stats


def stream_in_background(client, **kwargs):
    """Starts a streaming chat on a worker thread. Returns (worker, result): `result` fills in
    as chunks arrive; `worker.join()` returns it at the end, or raises what the stream raised."""
    result = {"text": "", "finish": None, "chunks": 0, "first": threading.Event()}

    def consume():
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            if chunk.choices:
                content = chunk.choices[0].delta.content
                result["finish"] = chunk.choices[0].finish_reason or result["finish"]
                if content:
                    result["text"] += content
                    result["chunks"] += 1
                    result["first"].set()
        return result

    return start_thread(consume), result


def first_token(worker, result, timeout=10):
    """Waits for the stream's first token; a stream that failed before it fails the test."""
    wait_for(lambda: result["first"].is_set() or not worker.is_alive(), timeout, "the first token")
    if not result["first"].is_set():
        worker.join()  # raises what the stream raised
        raise AssertionError(f"the stream ended without a token: {result}")


def test_cancel_mid_stream_stops_the_engine(server, openai_client, workdir):
    stats = str(workdir / "slow.stats")
    server.load("slow", repeat=1, token_delay_ms=10, stats_file=stats)
    thread, result = stream_in_background(
        openai_client, model="slow", messages=[{"role": "user", "content": "go"}], max_tokens=5000,
        extra_body={"cancel_id": "run-1", "session_id": "thread-1"})
    first_token(thread, result)
    time.sleep(0.2)
    status, body = server.post("/api/inference/cancel", {"cancel_id": "run-1"})
    assert status == 200 and body == {"cancelled": 1}
    assert thread.join(10)["finish"] == "stop"  # a cancelled stream ends cleanly, then [DONE]
    produced = wait_for_stats(stats, active_runs=0)["produced_tokens"]
    assert 0 < produced < 100
    assert engine_stays_stopped(stats)["produced_tokens"] == produced, "the engine kept decoding after cancel"
    assert server.active_generations() == 0


def test_cancel_by_session_fans_out_to_every_run_in_the_engine(server, openai_client, workdir):
    stats = str(workdir / "slow.stats")
    server.load("slow", repeat=1, token_delay_ms=10, stats_file=stats)
    runs = [stream_in_background(openai_client, model="slow", messages=[{"role": "user", "content": "go"}],
                                 max_tokens=100000, extra_body={"session_id": "thread-9", "cancel_id": f"r{i}"})
            for i in range(3)]
    for thread, result in runs:
        first_token(thread, result)
    assert read_stats(stats)["active_runs"] == 3  # the engine is decoding all three
    assert server.post("/api/inference/cancel", {"session_id": "thread-9"})[1] == {"cancelled": 3}
    for thread, _ in runs:
        assert thread.join(10)["finish"] == "stop"
    # Every run stopped in the engine: no run holds a slot, and no token is produced any more.
    wait_for_stats(stats, active_runs=0)
    engine_stays_stopped(stats)
    assert server.wait_idle() == 0


def test_cancel_before_the_run_starts_stops_it_at_once(server, openai_client, workdir):
    stats = str(workdir / "slow.stats")
    server.load("slow", repeat=1, token_delay_ms=10, stats_file=stats)
    # Stop pressed during warm-up: the cancel arrives before the request.
    assert server.post("/api/inference/cancel", {"cancel_id": "early-1"})[1] == {"cancelled": 0}
    started = time.time()
    reply = openai_client.chat.completions.create(
        model="slow", messages=[{"role": "user", "content": "go"}], extra_body={"cancel_id": "early-1"})
    assert time.time() - started < 2
    assert reply.usage.completion_tokens == 0 and reply.choices[0].message.content == ""
    assert read_stats(stats) == {"produced_tokens": 0, "active_runs": 0}


def test_stale_cancel_id_does_not_touch_a_newer_run(server, openai_client):
    server.load("slow", repeat=1, token_delay_ms=5)
    openai_client.chat.completions.create(
        model="slow", messages=[{"role": "user", "content": "go"}], max_tokens=3,
        extra_body={"cancel_id": "old-run", "session_id": "thread-2"})
    thread, result = stream_in_background(
        openai_client, model="slow", messages=[{"role": "user", "content": "again"}], max_tokens=60,
        extra_body={"cancel_id": "new-run", "session_id": "thread-2"})
    first_token(thread, result)
    # The stale stop carries the old run's id and the live session: it must cancel nothing.
    assert server.post("/api/inference/cancel", {"cancel_id": "old-run", "session_id": "thread-2"})[1] == {"cancelled": 0}
    result = thread.join(20)
    assert result["finish"] == "length" and result["chunks"] == 60


def test_cancel_without_a_usable_key_cancels_nothing(server, openai_client):
    server.load("slow", repeat=1, token_delay_ms=5)
    thread, result = stream_in_background(openai_client, model="slow", max_tokens=40,
                                          messages=[{"role": "user", "content": "go"}], extra_body={"session_id": "s"})
    first_token(thread, result)
    for body in [{}, {"session_id": ""}, {"unrelated": "x"}]:
        assert server.post("/api/inference/cancel", body)[1] == {"cancelled": 0}
    assert server.post("/api/inference/cancel", raw=b"not json")[1] == {"cancelled": 0}
    result = thread.join(20)
    assert result["finish"] == "length" and result["chunks"] == 40


def test_cancel_during_prefill(server, openai_client, workdir):
    stats = str(workdir / "prefill.stats")
    server.load("prefill", prefill_ms=5000, reply="never", stats_file=stats)
    thread, result = stream_in_background(openai_client, model="prefill", messages=[{"role": "user", "content": "go"}],
                                          extra_body={"cancel_id": "prefill-1"})
    wait_for_stats(stats, active_runs=1)  # the engine is processing the prompt
    started = time.time()
    assert server.post("/api/inference/cancel", {"cancel_id": "prefill-1"})[1] == {"cancelled": 1}
    result = thread.join(10)
    assert time.time() - started < 1
    assert result["text"] == "" and result["finish"] == "stop"
    assert wait_for_stats(stats, timeout=1, active_runs=0)["produced_tokens"] == 0


def test_non_streaming_runs_are_cancellable(server, openai_client, workdir):
    stats = str(workdir / "slow.stats")
    server.load("slow", repeat=1, token_delay_ms=10, stats_file=stats)
    thread = start_thread(openai_client.chat.completions.create, model="slow",
                          messages=[{"role": "user", "content": "go"}], extra_body={"cancel_id": "ns-1"})
    wait_for(lambda: read_stats(stats)["produced_tokens"] >= 10, 10, "the engine to produce ten tokens")
    assert server.post("/api/inference/cancel", {"cancel_id": "ns-1"})[1] == {"cancelled": 1}
    reply = thread.join(10)
    produced = wait_for_stats(stats, active_runs=0)["produced_tokens"]
    assert engine_stays_stopped(stats)["produced_tokens"] == produced
    assert 0 < reply.usage.completion_tokens <= produced < 200


def test_the_engines_own_wall_clock_budget_ends_a_run_as_a_time_limit(workdir):
    """The engine honours max_wall_ms (--max-generation-seconds): it ends the run itself, before
    the host's backstop a second later. (The backstop alone: test_abi11.py, ignore_wall_limit.)"""
    server = Server(workdir, extra_args=["--max-generation-seconds", "1"])
    try:
        server.load("slow", repeat=1, token_delay_ms=10)
        started = time.time()
        reply = server.openai().chat.completions.create(model="slow", messages=[{"role": "user", "content": "go"}])
        assert time.time() - started < 3
        assert reply.choices[0].finish_reason == "length"
    finally:
        server.stop()
