"""/v1/responses with the official openai SDK: event shapes and a function-call round trip
against the reference plugin, and the real SmolLM2 through llama-server."""
import json
import threading

import pytest

from conftest import (LLAMA_TIMEOUT, engine_stays_stopped, needs_llama, read_stats, start_thread, wait_for,
                      wait_for_stats)
from test_llama_server import llama  # noqa: F401 - the shared SmolLM2 host fixture

WEATHER = {"type": "function", "name": "get_weather", "description": "Get the weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def test_non_streaming_response(server, openai_client):
    server.load("ref", reply="Hello from the reference engine.")
    response = openai_client.responses.create(model="ref", instructions="Be brief.", input="Hi")
    assert response.id.startswith("resp_") and response.status == "completed"
    assert response.output_text == "Hello from the reference engine."
    assert response.output[0].type == "message" and response.output[0].content[0].type == "output_text"
    assert response.usage.output_tokens == 5 and response.usage.input_tokens > 0


def test_streaming_events_the_sdk_parses(server, openai_client):
    server.load("ref", reply="one two three")
    events = list(openai_client.responses.create(model="ref", input=[
        {"role": "developer", "content": "Count."},
        {"role": "user", "content": [{"type": "input_text", "text": "Go"}]},
        {"type": "some_future_item", "payload": 1},
    ], stream=True))
    types = [event.type for event in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas.split() == ["one", "two", "three"]
    assert events[-1].response.output_text.split() == ["one", "two", "three"]
    assert events[-1].response.usage.output_tokens == 3


def test_max_output_tokens_is_incomplete(server, openai_client):
    server.load("ref", reply="a b c d e f", repeat=1)
    response = openai_client.responses.create(model="ref", input="Go", max_output_tokens=2)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"


def test_function_call_round_trip(server, openai_client):
    server.load("ref", reply="It is sunny.", tool_arguments='{"city": "Paris"}')
    first = openai_client.responses.create(model="ref", input="Weather in Paris?", tools=[WEATHER])
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"} and call.call_id

    streamed = list(openai_client.responses.create(model="ref", input="Weather in Paris?", tools=[WEATHER], stream=True))
    types = [event.type for event in streamed]
    assert "response.function_call_arguments.delta" in types and "response.function_call_arguments.done" in types
    done = next(event for event in streamed if event.type == "response.function_call_arguments.done")
    assert json.loads(done.arguments) == {"city": "Paris"}

    second = openai_client.responses.create(model="ref", tools=[WEATHER], input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 18 C"},
    ])
    assert second.output_text == "It is sunny."


def test_bad_input_gets_openai_errors(server):
    server.load("ref")
    for body, param in [({"model": "ref"}, "input"), ({"model": "ref", "input": 5}, "input"),
                        ({"model": "ref", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
                        ({"model": "ref", "input": []}, "input"),
                        ({"model": "ref", "input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
                        ({"model": "ref", "input": "x", "max_output_tokens": 0}, "max_output_tokens")]:
        status, answer = server.post("/v1/responses", body)
        assert status == 400, (body, answer)
        assert answer["error"]["param"] == param, (body, answer)
    status, answer = server.post("/v1/responses", raw=b"[1,")
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("key", ["cancel_id", "response_id"])
def test_cancel_a_responses_stream(server, openai_client, workdir, key):
    stats = str(workdir / "slow.stats")
    server.load("slow", reply="tick", repeat=1, token_delay_ms=10, stats_file=stats)
    got = {"id": None, "status": None}
    started = threading.Event()

    def consume():
        for event in openai_client.responses.create(model="slow", input="Go", stream=True,
                                                    extra_body={"cancel_id": "resp-run"}):
            if event.type == "response.created":
                got["id"] = event.response.id
            if event.type == "response.output_text.delta":
                started.set()
            if event.type == "response.completed":
                got["status"] = event.response.status

    thread = start_thread(consume)
    wait_for(lambda: started.is_set() or not thread.is_alive(), 10, "the first token")
    assert read_stats(stats)["active_runs"] == 1
    body = {"cancel_id": "resp-run"} if key == "cancel_id" else {"response_id": got["id"]}
    assert server.post("/api/inference/cancel", body)[1]["cancelled"] == 1
    thread.join(10)
    assert got["status"] == "completed"
    # The engine's own word: the run left its slot and nothing is produced any more.
    wait_for_stats(stats, active_runs=0)
    engine_stays_stopped(stats)
    assert server.wait_idle() == 0


@needs_llama
@LLAMA_TIMEOUT
def test_smollm2_through_responses(llama):
    client = llama.openai(timeout=120)
    response = client.responses.create(model="default", instructions="You are a helpful assistant.",
                                       input="What is the capital of France?", max_output_tokens=40, temperature=0)
    assert "Paris" in response.output_text
    text = "".join(event.delta for event in client.responses.create(
        model="default", instructions="You are a helpful assistant.", input="What is the capital of France?",
        max_output_tokens=40, temperature=0, stream=True) if event.type == "response.output_text.delta")
    assert text == response.output_text
