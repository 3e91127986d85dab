"""/v1/messages and /v1/messages/count_tokens with the official anthropic SDK: exact event
shapes against the reference plugin (a deterministic stream), and the real SmolLM2 through
the llama-server backend."""
import json
import threading

import anthropic
import pytest

from conftest import (LLAMA_TIMEOUT, Server, engine_stays_stopped, needs_llama, read_stats, start_thread, wait_for,
                      wait_for_stats)
from test_llama_server import llama  # noqa: F401 - the shared SmolLM2 host fixture

WEATHER = {"name": "get_weather", "description": "Get the weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture
def claude(server):
    return server.anthropic()


def test_non_streaming_message(server, claude):
    server.load("ref", reply="Hello from the reference engine.")
    message = claude.messages.create(model="ref", max_tokens=100, system="Be brief.",
                                     messages=[{"role": "user", "content": "Hi"}])
    assert message.id.startswith("msg_")
    assert message.role == "assistant" and message.type == "message"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "Hello from the reference engine."
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 5 and message.usage.input_tokens > 0


def test_streaming_events_in_anthropic_order(server, claude):
    server.load("ref", reply="one two three", reasoning="Let me think.")
    with claude.messages.stream(model="ref", max_tokens=50, messages=[{"role": "user", "content": "Count"}],
                                extra_body={"enable_thinking": True}) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    assert events[0] == "message_start"
    assert events[-1] == "message_stop"
    assert events[-2] == "message_delta"
    assert events.count("content_block_start") == 2 and events.count("content_block_stop") == 2
    assert [block.type for block in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "Let me think."
    assert final.content[1].text == "one two three"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 6  # thinking counts as output


def test_max_tokens_stop_reason(server, claude):
    server.load("ref", reply="a b c d e f g h", repeat=1)
    message = claude.messages.create(model="ref", max_tokens=3, messages=[{"role": "user", "content": "Go"}])
    assert message.stop_reason == "max_tokens"
    assert message.content[0].text.split() == ["a", "b", "c"]


def test_tool_use_round_trip(server, claude):
    server.load("ref", reply="It is sunny.", tool_arguments='{"city": "Paris"}')
    first = claude.messages.create(model="ref", max_tokens=100, tools=[WEATHER],
                                   messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert first.stop_reason == "tool_use"
    [tool_use] = [block for block in first.content if block.type == "tool_use"]
    assert tool_use.id.startswith("toolu_") and tool_use.name == "get_weather"
    assert tool_use.input == {"city": "Paris"}

    with claude.messages.stream(model="ref", max_tokens=100, tools=[WEATHER],
                                messages=[{"role": "user", "content": "Weather in Paris?"}]) as stream:
        streamed = stream.get_final_message()
    [streamed_use] = [block for block in streamed.content if block.type == "tool_use"]
    assert streamed_use.input == {"city": "Paris"} and streamed.stop_reason == "tool_use"

    second = claude.messages.create(model="ref", max_tokens=100, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "sunny, 18 C"}]},
    ])
    assert second.stop_reason == "end_turn"
    assert second.content[0].text == "It is sunny."


def test_errors_use_the_anthropic_envelope(server, claude):
    server.load("ref")
    with pytest.raises(anthropic.BadRequestError) as missing:
        # The SDK itself insists on max_tokens, so the request goes through its raw POST.
        claude.post("/v1/messages", body={"model": "ref", "messages": [{"role": "user", "content": "Hi"}]},
                    cast_to=object)
    body = missing.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]

    cases = [
        (b"{not json", "invalid_request_error"),
        (json.dumps({"model": "ref", "max_tokens": "ten", "messages": []}).encode(), "invalid_request_error"),
        (json.dumps({"model": "ref", "max_tokens": 10, "messages": []}).encode(), "invalid_request_error"),
        (json.dumps({"model": "ref", "max_tokens": 10,
                     "messages": [{"role": "system", "content": "x"}]}).encode(), "invalid_request_error"),
        (json.dumps({"model": "ref", "max_tokens": 10,
                     "messages": [{"role": "user", "content": [{"type": "video"}]}]}).encode(), "invalid_request_error"),
        (json.dumps({"model": "nope", "max_tokens": 10,
                     "messages": [{"role": "user", "content": "x"}]}).encode(), "not_found_error"),
    ]
    for raw, kind in cases:
        status, body = server.post("/v1/messages", raw=raw)
        assert 400 <= status < 500, (raw, status, body)
        assert body["type"] == "error" and body["error"]["type"] == kind, (raw, body)


def test_huge_body_is_a_413_in_the_anthropic_envelope(workdir):
    server = Server(workdir, extra_args=["--max-body-mb", "1"])
    try:
        status, body = server.post("/v1/messages", raw=b'{"x":"' + b"a" * (2 * 1024 * 1024) + b'"}')
        assert status == 413 and body["type"] == "error"
    finally:
        server.stop()


def test_x_api_key_and_bearer_both_work(workdir):
    server = Server(workdir, extra_args=["--api-key", "sekrit"])
    try:
        status, _ = server.post("/api/inference/load", {"model_path": server.model_file("ref")},
                                headers={"x-api-key": "sekrit"})
        assert status == 200
        client = server.anthropic(api_key="sekrit")
        assert client.messages.create(model="ref", max_tokens=5, messages=[{"role": "user", "content": "Hi"}]).content
        bearer = server.anthropic(api_key=None, auth_token="sekrit")
        assert bearer.messages.create(model="ref", max_tokens=5, messages=[{"role": "user", "content": "Hi"}]).content
        with pytest.raises(anthropic.AuthenticationError):
            server.anthropic(api_key="wrong").messages.create(
                model="ref", max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    finally:
        server.stop()


def test_count_tokens_needs_the_tokenize_capability(server, claude):
    server.load("ref")
    count = claude.messages.count_tokens(model="ref", messages=[{"role": "user", "content": "one two three"}])
    assert count.input_tokens == 3


@pytest.mark.parametrize("key", ["cancel_id", "message_id"])
def test_cancel_a_messages_stream(server, claude, workdir, key):
    stats = str(workdir / "slow.stats")
    server.load("slow", reply="tick", repeat=1, token_delay_ms=10, stats_file=stats)
    got = {"message_id": None, "text": "", "stop": None}
    started = threading.Event()

    def consume():
        with claude.messages.stream(model="slow", max_tokens=100000, messages=[{"role": "user", "content": "Go"}],
                                    extra_body={"cancel_id": "anthropic-run"}) as stream:
            for event in stream:
                if event.type == "message_start":
                    got["message_id"] = event.message.id
                if event.type == "content_block_delta":
                    got["text"] += event.delta.text
                    started.set()
            got["stop"] = stream.get_final_message().stop_reason

    thread = start_thread(consume)
    wait_for(lambda: started.is_set() or not thread.is_alive(), 10, "the first token")
    assert read_stats(stats)["active_runs"] == 1
    body = {"cancel_id": "anthropic-run"} if key == "cancel_id" else {"message_id": got["message_id"]}
    status, answer = server.post("/api/inference/cancel", body)
    assert answer["cancelled"] == 1, (body, answer)
    thread.join(10)
    assert got["stop"] == "end_turn"
    # The engine's own word: the run left its slot and nothing is produced any more.
    wait_for_stats(stats, active_runs=0)
    engine_stays_stopped(stats)
    assert server.wait_idle() == 0


def test_non_streaming_messages_are_cancellable(server, claude, workdir):
    stats = str(workdir / "slow.stats")
    server.load("slow", reply="tick", repeat=1, token_delay_ms=10, stats_file=stats)
    thread = start_thread(claude.messages.create, model="slow", max_tokens=1000,
                          messages=[{"role": "user", "content": "Go"}], extra_body={"session_id": "thread-7"})
    wait_for(lambda: read_stats(stats)["produced_tokens"] >= 5, 10, "the engine to produce five tokens")
    assert server.post("/api/inference/cancel", {"session_id": "thread-7"})[1]["cancelled"] == 1
    message = thread.join(10)
    assert message.stop_reason == "end_turn" and message.content[0].text.startswith("tick")
    produced = wait_for_stats(stats, active_runs=0)["produced_tokens"]
    assert engine_stays_stopped(stats)["produced_tokens"] == produced < 1000


# ─── The real model ─────────────────────────────────────────────────────────

@needs_llama
@LLAMA_TIMEOUT
def test_smollm2_through_the_anthropic_sdk(llama):
    claude = llama.anthropic(timeout=120)
    greedy = {"temperature": 0}  # (this SDK version no longer takes `temperature` as an argument)
    message = claude.messages.create(model="default", max_tokens=40, system="You are a helpful assistant.",
                                     messages=[{"role": "user", "content": "What is the capital of France?"}],
                                     extra_body=greedy)
    assert "Paris" in message.content[0].text
    assert message.usage.input_tokens > 5 and message.usage.output_tokens > 0
    with claude.messages.stream(model="default", max_tokens=5, extra_body=greedy,
                                messages=[{"role": "user", "content": "Tell me a long story."}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.stop_reason == "max_tokens" and final.usage.output_tokens == 5
    count = claude.messages.count_tokens(model="default", system="You are a helpful assistant.",
                                         messages=[{"role": "user", "content": "What is the capital of France?"}])
    # The same prompt the engine saw: the rendered template, counted by the model's tokenizer.
    assert count.input_tokens == message.usage.input_tokens
