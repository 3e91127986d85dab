"""The stop button: POST /api/inference/cancel, verified from the engine's own token count."""
import threading
import time

from conftest import read_stats


def stream_in_background(client, **kwargs):
    """Starts a streaming chat on a thread; returns (thread, result) where result fills in as it goes."""
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

    thread = threading.Thread(target=consume)
    thread.start()
    return thread, result


def test_cancel_mid_stream_stops_the_engine(server, openai_client, workdir):
    stats = str(workdir / "slow.stats")
    server.load("slow", repeat=1, token_delay_ms=10, stats_file=stats)
    thread, result = stream_in_background(
        openai_client, model="slow", messages=[{"role": "user", "content": "go"}], max_tokens=5000,
        extra_body={"cancel_id": "run-1", "session_id": "thread-1"})
    assert result["first"].wait(10)
    time.sleep(0.2)
    status, body = server.post("/api/inference/cancel", {"cancel_id": "run-1"})
    assert status == 200 and body == {"cancelled": 1}
    thread.join(10)
    assert not thread.is_alive()
    assert result["finish"] == "stop"  # a cancelled stream ends cleanly, then [DONE]
    produced = read_stats(stats)["produced_tokens"]
    assert 0 < produced < 100
    time.sleep(0.5)
    after = read_stats(stats)
    assert after["produced_tokens"] == produced, "the engine kept decoding after cancel"
    assert after["active_runs"] == 0
    assert server.active_generations() == 0


def test_cancel_by_session_fans_out_and_counts_runs(server, openai_client):
    server.load("slow", repeat=1, token_delay_ms=10)
    runs = [stream_in_background(openai_client, model="slow", messages=[{"role": "user", "content": "go"}],
                                 extra_body={"session_id": "thread-9", "cancel_id": f"r{i}"}) for i in range(3)]
    for _, result in runs:
        assert result["first"].wait(10)
    assert server.post("/api/inference/cancel", {"session_id": "thread-9"})[1] == {"cancelled": 3}
    for thread, result in runs:
        thread.join(10)
        assert result["finish"] == "stop"
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
    assert read_stats(stats)["produced_tokens"] == 0


def test_stale_cancel_id_does_not_touch_a_newer_run(server, openai_client):
    server.load("slow", repeat=1, token_delay_ms=5)
    openai_client.chat.completions.create(
        model="slow", messages=[{"role": "user", "content": "go"}], max_tokens=3,
        extra_body={"cancel_id": "old-run", "session_id": "thread-2"})
    thread, result = stream_in_background(
        openai_client, model="slow", messages=[{"role": "user", "content": "again"}], max_tokens=60,
        extra_body={"cancel_id": "new-run", "session_id": "thread-2"})
    assert result["first"].wait(10)
    # The stale stop carries the old run's id and the live session: it must cancel nothing.
    assert server.post("/api/inference/cancel", {"cancel_id": "old-run", "session_id": "thread-2"})[1] == {"cancelled": 0}
    thread.join(20)
    assert result["finish"] == "length" and result["chunks"] == 60


def test_cancel_without_a_usable_key_cancels_nothing(server, openai_client):
    server.load("slow", repeat=1, token_delay_ms=5)
    thread, result = stream_in_background(openai_client, model="slow", max_tokens=40,
                                          messages=[{"role": "user", "content": "go"}], extra_body={"session_id": "s"})
    assert result["first"].wait(10)
    for body in [{}, {"session_id": ""}, {"unrelated": "x"}]:
        assert server.post("/api/inference/cancel", body)[1] == {"cancelled": 0}
    assert server.post("/api/inference/cancel", raw=b"not json")[1] == {"cancelled": 0}
    thread.join(20)
    assert result["finish"] == "length"


def test_cancel_during_prefill(server, openai_client):
    server.load("prefill", prefill_ms=5000, reply="never")
    thread, result = stream_in_background(openai_client, model="prefill", messages=[{"role": "user", "content": "go"}],
                                          extra_body={"cancel_id": "prefill-1"})
    time.sleep(0.3)
    started = time.time()
    assert server.post("/api/inference/cancel", {"cancel_id": "prefill-1"})[1] == {"cancelled": 1}
    thread.join(10)
    assert time.time() - started < 1
    assert result["text"] == ""


def test_non_streaming_runs_are_cancellable(server, openai_client):
    server.load("slow", repeat=1, token_delay_ms=10)
    reply = {}
    thread = threading.Thread(target=lambda: reply.update(r=openai_client.chat.completions.create(
        model="slow", messages=[{"role": "user", "content": "go"}], extra_body={"cancel_id": "ns-1"})))
    thread.start()
    time.sleep(0.4)
    assert server.post("/api/inference/cancel", {"cancel_id": "ns-1"})[1] == {"cancelled": 1}
    thread.join(10)
    assert 0 < reply["r"].usage.completion_tokens < 100


def test_wall_clock_cap(workdir):
    from conftest import Server
    import openai
    server = Server(workdir, extra_args=["--max-generation-seconds", "1"])
    try:
        server.load("slow", repeat=1, token_delay_ms=10)
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="x", max_retries=0)
        started = time.time()
        reply = client.chat.completions.create(model="slow", messages=[{"role": "user", "content": "go"}])
        assert time.time() - started < 3
        assert reply.choices[0].finish_reason == "length"
    finally:
        server.stop()
