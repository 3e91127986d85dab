"""/v1/completions with the official openai SDK: the reference plugin for exact shapes,
the real SmolLM2 through llama-server for a real raw completion."""
from conftest import (LLAMA_TIMEOUT, engine_stays_stopped, needs_llama, read_stats, start_thread, wait_for,
                      wait_for_stats)
from test_llama_server import llama  # noqa: F401 - the shared SmolLM2 host fixture


def test_completion_non_streaming(server, openai_client):
    server.load("ref", reply="alpha beta gamma")
    reply = openai_client.completions.create(model="ref", prompt="Say three words:", max_tokens=10)
    assert reply.id.startswith("cmpl-") and reply.object == "text_completion"
    assert reply.choices[0].text.split() == ["alpha", "beta", "gamma"]
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 3 and reply.usage.prompt_tokens == 3


def test_completion_streaming_with_usage_and_echo(server, openai_client):
    server.load("ref", reply="alpha beta gamma")
    chunks = list(openai_client.completions.create(model="ref", prompt=["Say three words:"], stream=True, echo=True,
                                                   stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.startswith("Say three words:")
    assert text[len("Say three words:"):].split() == ["alpha", "beta", "gamma"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 3


def test_completion_length_and_bad_input(server, openai_client):
    server.load("ref", reply="a b c d e f", repeat=1)
    reply = openai_client.completions.create(model="ref", prompt="Go", max_tokens=2)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 2
    for body, param in [({"model": "ref"}, "prompt"), ({"model": "ref", "prompt": ""}, "prompt"),
                        ({"model": "ref", "prompt": ["a", "b"]}, "prompt"), ({"model": "ref", "prompt": 5}, "prompt"),
                        ({"model": "ref", "prompt": "x", "n": 2}, "n"), ({"model": "ref", "prompt": "x", "max_tokens": 0}, "max_tokens")]:
        status, answer = server.post("/v1/completions", body)
        assert status == 400, (body, answer)
        assert answer["error"]["param"] == param, (body, answer)
    status, answer = server.post("/v1/completions", raw=b"{nope")
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"


def test_completion_is_cancellable(server, openai_client, workdir):
    stats = str(workdir / "slow.stats")
    server.load("slow", reply="tick", repeat=1, token_delay_ms=10, stats_file=stats)
    thread = start_thread(openai_client.completions.create, model="slow", prompt="Go", max_tokens=5000,
                          extra_body={"cancel_id": "cmpl-run"})
    wait_for(lambda: read_stats(stats)["active_runs"] == 1, 5, "the engine to start the run")
    assert server.post("/api/inference/cancel", {"cancel_id": "cmpl-run"})[1]["cancelled"] == 1
    reply = thread.join(10)
    assert reply.choices[0].finish_reason == "stop"
    produced = wait_for_stats(stats, active_runs=0)["produced_tokens"]
    assert engine_stays_stopped(stats)["produced_tokens"] == produced < 5000


@needs_llama
@LLAMA_TIMEOUT
def test_smollm2_raw_completion(llama):
    client = llama.openai(timeout=120)
    reply = client.completions.create(model="default", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in reply.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="default", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == reply.choices[0].text
    short = client.completions.create(model="default", prompt="Once upon a time", max_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
