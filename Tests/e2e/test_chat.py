"""Chat completions through the official openai SDK against the real binary."""
import json
import socket

import openai
import pytest

from conftest import Server, recv_until


def test_non_streaming_chat(server, openai_client):
    server.load("hello", reply="Hello from the reference engine.")
    reply = openai_client.chat.completions.create(
        model="hello", messages=[{"role": "user", "content": "Say hello"}])
    assert reply.choices[0].message.content == "Hello from the reference engine."
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == 2
    assert reply.usage.completion_tokens == 5
    assert reply.id.startswith("chatcmpl-")


def test_streaming_chat_with_usage(server, openai_client):
    server.load("hello", reply="one two three")
    stream = openai_client.chat.completions.create(
        model="hello", messages=[{"role": "user", "content": "count"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


def test_max_tokens_gives_length(server, openai_client):
    server.load("long", repeat=1)
    reply = openai_client.chat.completions.create(
        model="long", messages=[{"role": "user", "content": "go"}], max_tokens=7)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 7


def test_unset_max_tokens_defaults_to_context_length(server, openai_client):
    server.load("ctx", repeat=1, context_length=300)
    reply = openai_client.chat.completions.create(model="ctx", messages=[{"role": "user", "content": "go"}])
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 300


def test_stop_sequence(server, openai_client):
    server.load("hello", reply="alpha beta gamma delta")
    reply = openai_client.chat.completions.create(
        model="hello", messages=[{"role": "user", "content": "x"}], stop=["gamma"])
    assert reply.choices[0].message.content == "alpha beta "


def test_reasoning_and_tool_call_deltas(server, openai_client):
    server.load("agent")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    stream = openai_client.chat.completions.create(
        model="agent", messages=[{"role": "user", "content": "weather in Paris?"}], tools=tools,
        stream=True, extra_body={"enable_thinking": True})
    reasoning, calls, finish = "", {}, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
            entry["id"] = entry["id"] or call.id
            if call.function.name:
                entry["name"] = call.function.name
            entry["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert reasoning.startswith("Let me think")
    assert calls[0]["name"] == "get_weather" and calls[0]["id"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert finish == "tool_calls"

    # The follow-up turn with the tool result gets a text answer.
    reply = openai_client.chat.completions.create(model="agent", tools=tools, messages=[
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": calls[0]["id"], "type": "function",
                                              "function": {"name": "get_weather", "arguments": calls[0]["arguments"]}}]},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "18C and sunny"},
    ])
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.content


def test_non_streaming_tool_call(server, openai_client):
    server.load("agent")
    reply = openai_client.chat.completions.create(
        model="agent", messages=[{"role": "user", "content": "hi"}],
        tools=[{"type": "function", "function": {"name": "lookup"}}])
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "lookup" and json.loads(call.function.arguments)["city"] == "Paris"


def test_several_models_and_model_list(server, openai_client):
    server.load("first", reply="from first")
    server.load("second", reply="from second")
    assert [m.id for m in openai_client.models.list().data] == ["first", "second"]
    reply = openai_client.chat.completions.create(model="second", messages=[{"role": "user", "content": "x"}])
    assert reply.choices[0].message.content == "from second"


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, "max_tokens"),
])
def test_bad_input_is_a_400_with_param(server, body, param):
    server.load("hello")
    status, error = server.post("/v1/chat/completions", body)
    assert status == 400
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["param"] == param


def test_malformed_json_and_unknown_model(server, openai_client):
    server.load("hello")
    status, error = server.post("/v1/chat/completions", raw=b"{not json")
    assert status == 400 and error["error"]["code"] == "invalid_json"
    with pytest.raises(openai.NotFoundError) as info:
        openai_client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_not_found"


def test_oversized_body_is_413(workdir):
    server = Server(workdir, extra_args=["--max-body-mb", "1"])
    try:
        status, error = server.post("/v1/chat/completions", raw=b"x" * (2 * 1024 * 1024))
        assert status == 413 and error["error"]["code"] == "request_too_large"
    finally:
        server.stop()


def test_anthropic_path_errors_use_anthropic_envelope(server):
    status, error = server.post("/v1/messages/nothing-here", {})
    assert status == 404
    assert error["type"] == "error" and error["error"]["type"] == "not_found_error"


def test_api_key(workdir):
    server = Server(workdir, extra_args=["--api-key", "sekret"])
    try:
        assert server.get("/v1/models")[0] == 401
        assert server.get("/v1/models", headers={"Authorization": "Bearer sekret"})[0] == 200
        assert server.get("/v1/models", headers={"x-api-key": "sekret"})[0] == 200
    finally:
        server.stop()


def test_registry_is_empty_after_normal_error_and_disconnected_runs(server, openai_client):
    server.load("hello", reply="short answer")
    server.load("slow", repeat=1, token_delay_ms=5)
    server.load("tiny", context_length=3)
    openai_client.chat.completions.create(model="hello", messages=[{"role": "user", "content": "x"}])
    list(openai_client.chat.completions.create(model="hello", messages=[{"role": "user", "content": "x"}], stream=True))
    # An error the engine reports: prompt over the context window.
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a b c d e f"}])
    assert info.value.body["code"] == "context_length_exceeded"
    # A client that goes away mid-stream.
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    body = json.dumps({"model": "slow", "stream": True, "messages": [{"role": "user", "content": "go"}]}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    recv_until(sock, b"data:", 10)
    assert server.active_generations() == 1
    sock.close()
    assert server.wait_idle() == 0
