"""What the client sends is what the plugin gets: JSON key order, message names, a max_tokens a
C int holds, through the official SDKs against the real binary.

The reference plugin has no setting that shows the request it received, so this file compiles
a "recorder": the reference plugin, renamed, with run_create wrapped to append every normalized
request (the exact JSON text the host hands the plugin) to $PATCHBAY_RECORD_REQUESTS, one per line.
"""
import json
import subprocess
from pathlib import Path

import anthropic
import openai
import pytest

from conftest import BUILD_DIR, ROOT, Server

SUPPORT = ROOT / "Plugins" / "PluginSupport"
RECORDER_SOURCE = r"""
#include "patchbay.h"
#undef PB_EXPORT
#define PB_EXPORT static
#define pb_plugin_entry reference_entry
#define REFERENCE_PLUGIN_NAME "recorder"
#include "reference_plugin.c"
#undef pb_plugin_entry
#undef PB_EXPORT
#define PB_EXPORT __attribute__((visibility("default")))

static void record(const char *request_json) {
    const char *path = getenv("PATCHBAY_RECORD_REQUESTS");
    FILE *f = path ? fopen(path, "a") : NULL;
    if (!f) return;
    fprintf(f, "%s\n", request_json);
    fclose(f);
}

static pb_status recording_run_create(pb_model *model, const char *request_json, pb_run **out_run,
                                      char *error, size_t error_size) {
    record(request_json);
    return ref_run_create(model, request_json, out_run, error, error_size);
}

static pb_status recording_run_create_with_inputs(pb_model *model, const char *request_json,
                                                  const pb_byte_input *const *inputs, size_t input_count,
                                                  pb_run **out_run, char *error, size_t error_size) {
    record(request_json);
    return ref_run_create_with_inputs(model, request_json, inputs, input_count, out_run, error, error_size);
}

static pb_plugin_api recorder_api;

PB_EXPORT const pb_plugin_api *pb_plugin_entry(const pb_host_api *host) {
    const pb_plugin_api *inner = reference_entry(host);
    if (!inner) return NULL;
    recorder_api = *inner;
    recorder_api.run_create = recording_run_create;
    recorder_api.run_create_with_inputs = recording_run_create_with_inputs;
    return &recorder_api;
}
"""

# Keys in no sorted order, nested: a host that reorders them (as a dictionary does) is caught.
SCHEMA = {
    "type": "object",
    "properties": {
        "zeta": {"type": "string", "description": "listed first"},
        "alpha": {"type": "integer", "minimum": 1, "maximum": 9},
        "mid": {"type": "array", "items": {"type": "number", "multipleOf": 0.5}},
        "beta": {"enum": ["b", "a"], "default": "b"},
    },
    "required": ["zeta", "alpha"],
    "additionalProperties": False,
    "$defs": {"y": {}, "x": {}},
}
ARGUMENTS = {"zulu": 1, "alpha": {"yankee": 2, "bravo": [{"quebec": True, "charlie": None}]}, "mike": "m"}


def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))


@pytest.fixture(scope="module")
def recorder_library(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("recorder")
    source = workdir / "recorder.c"
    source.write_text(RECORDER_SOURCE)
    library = workdir / "libPatchbayRecorderPlugin.so"
    result = subprocess.run(
        ["cc", "-std=gnu11", "-shared", "-fPIC", "-fvisibility=hidden",
         f"-I{ROOT / 'Sources' / 'CPatchbayABI' / 'include'}", f"-I{SUPPORT / 'include'}",
         f"-I{ROOT / 'Tests' / 'ScriptedPlugin'}", "-o", str(library), str(source),
         *sorted(str(p) for p in SUPPORT.glob("*.c")), "-lpthread", "-lm"],
        capture_output=True, text=True)
    assert result.returncode == 0, f"cannot build the recorder plugin:\n{result.stderr}"
    return library


@pytest.fixture
def recorded(workdir, monkeypatch):
    """The file the recorder appends to, and a reader of the requests in it."""
    path = workdir / "requests.jsonl"
    monkeypatch.setenv("PATCHBAY_RECORD_REQUESTS", str(path))

    def requests() -> list[str]:
        return path.read_text().splitlines() if path.exists() else []
    return requests


@pytest.fixture
def server(workdir, recorder_library, recorded):
    assert (BUILD_DIR / "patchbay").exists(), f"build the server first ({BUILD_DIR / 'patchbay'})"
    s = Server(workdir, plugins=(recorder_library,))
    yield s
    s.stop()


@pytest.fixture
def claude(server):
    return anthropic.Anthropic(base_url=server.base, api_key="unused", max_retries=0)


def last_request(recorded) -> tuple[str, dict]:
    """The last request the plugin received: its exact text, and parsed (dicts keep key order)."""
    lines = recorded()
    assert lines, "the plugin received no request"
    return lines[-1], json.loads(lines[-1])


def test_the_recorder_sees_what_the_host_sends(server, openai_client, recorded):
    assert server.load("echo", reply="ok")["backend"] == "recorder"
    openai_client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])
    _, request = last_request(recorded)
    assert request["kind"] == "chat" and request["messages"] == [{"role": "user", "content": "hi"}]


def test_openai_tool_schema_and_response_format_reach_the_plugin_in_the_clients_order(server, openai_client, recorded):
    server.load("agent", reply="ok")
    tools = [{"type": "function", "function": {"name": "lookup", "description": "d", "parameters": SCHEMA}}]
    response_format = {"type": "json_schema", "json_schema": {"name": "out", "strict": True, "schema": SCHEMA}}
    sent = []
    # Two turns with the same tools: the plugin (and its prompt cache) sees the same bytes both times.
    for turn in range(2):
        reply = openai_client.chat.completions.create(
            model="agent", messages=[{"role": "user", "content": f"turn {turn}"}], tools=tools, tool_choice="none",
            response_format=response_format)
        assert reply.choices[0].message.content == "ok"
        text, request = last_request(recorded)
        assert f'"tools":{compact(tools)}' in text
        assert f'"response_format":{compact(response_format)}' in text
        assert compact(request["tools"][0]["function"]["parameters"]) == compact(SCHEMA)
        sent.append(text[text.index('"tools":'):])
    assert sent[0] == sent[1]


def test_openai_tool_call_arguments_reach_the_plugin_as_sent(server, openai_client, recorded):
    server.load("agent", reply="ok")
    arguments = compact(ARGUMENTS)
    openai_client.chat.completions.create(model="agent", messages=[
        {"role": "user", "content": "look it up"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}],
        tools=[{"type": "function", "function": {"name": "lookup", "parameters": SCHEMA}}])
    _, request = last_request(recorded)
    assert request["messages"][1]["tool_calls"][0]["function"]["arguments"] == arguments


def test_anthropic_input_schema_and_tool_use_input_keep_their_order(server, claude, recorded):
    server.load("agent", reply="ok")
    claude.messages.create(
        model="agent", max_tokens=20, tools=[{"name": "lookup", "description": "d", "input_schema": SCHEMA}],
        messages=[{"role": "user", "content": "look it up"},
                  {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "lookup", "input": ARGUMENTS}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "42"}]}])
    text, request = last_request(recorded)
    assert f'"parameters":{compact(SCHEMA)}' in text
    assert request["messages"][1]["tool_calls"][0]["function"]["arguments"] == compact(ARGUMENTS)


def test_anthropic_tool_use_input_keeps_the_models_order(server, claude):
    server.load("agent", tool_arguments=compact(ARGUMENTS))
    message = claude.messages.create(
        model="agent", max_tokens=20, tools=[{"name": "lookup", "input_schema": SCHEMA}],
        messages=[{"role": "user", "content": "look it up"}])
    [block] = [b for b in message.content if b.type == "tool_use"]
    assert compact(block.input) == compact(ARGUMENTS)


def test_responses_tools_and_text_format_keep_their_order(server, openai_client, recorded):
    server.load("agent", reply="ok")
    openai_client.responses.create(
        model="agent", input="hi", tool_choice="none",
        tools=[{"type": "function", "name": "lookup", "parameters": SCHEMA, "strict": False}],
        text={"format": {"type": "json_schema", "name": "out", "schema": SCHEMA}})
    text, request = last_request(recorded)
    assert f'"parameters":{compact(SCHEMA)}' in text
    assert compact(request["response_format"]["json_schema"]["schema"]) == compact(SCHEMA)


def test_a_name_on_user_system_and_assistant_messages_reaches_the_plugin(server, openai_client, recorded):
    server.load("hello", reply="Hello there.")
    reply = openai_client.chat.completions.create(model="hello", messages=[
        {"role": "system", "content": "Be brief.", "name": "rules"},
        {"role": "user", "content": "Hi", "name": "Ada"},
        {"role": "assistant", "content": "Hello Ada.", "name": "bot"},
        {"role": "user", "content": "Again", "name": "Ada"}])
    assert reply.choices[0].message.content == "Hello there."
    _, request = last_request(recorded)
    assert [m.get("name") for m in request["messages"]] == ["rules", "Ada", "bot", "Ada"]


def test_a_name_that_is_not_a_string_is_a_400(server, recorded):
    server.load("hello", reply="x")
    status, body = server.post("/v1/chat/completions", {
        "model": "hello", "messages": [{"role": "user", "content": "Hi", "name": 7}]})
    assert status == 400, body
    assert body["error"]["param"] == "messages[0].name" and body["error"]["code"] == "invalid_type"
    assert recorded() == []


def test_max_tokens_near_int64_max_reaches_the_plugin_as_a_c_int(server, openai_client, claude, recorded):
    server.load("hello", reply="one two three")
    huge = 9223372036854775807
    reply = openai_client.chat.completions.create(
        model="hello", messages=[{"role": "user", "content": "hi"}], max_tokens=huge)
    assert reply.choices[0].message.content == "one two three" and reply.choices[0].finish_reason == "stop"
    assert last_request(recorded)[1]["max_tokens"] == 2147483647
    openai_client.chat.completions.create(
        model="hello", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=huge)
    assert last_request(recorded)[1]["max_tokens"] == 2147483647
    # An explicit timeout: without one, this SDK refuses a non-streaming call with so large a max_tokens.
    claude.messages.create(model="hello", max_tokens=huge, messages=[{"role": "user", "content": "hi"}], timeout=30)
    assert last_request(recorded)[1]["max_tokens"] == 2147483647
    openai_client.responses.create(model="hello", input="hi", max_output_tokens=huge)
    assert last_request(recorded)[1]["max_tokens"] == 2147483647
    with pytest.raises(openai.BadRequestError) as error:
        openai_client.chat.completions.create(model="hello", messages=[{"role": "user", "content": "hi"}], max_tokens=0)
    assert error.value.param == "max_tokens"


@pytest.mark.parametrize("body, reason", [
    (b'{"model":"hello","messages":' + b"[" * 100_000, b"nesting deeper than 512 levels"),
    (b'{"model":"hello","model":"hello","messages":[{"role":"user","content":"hi"}]}', b"appears twice"),
    (b'{"model":"hello","messages":[{"role":"user","content":"\\ud800"}]}', b"surrogate"),
])
def test_bodies_the_strict_parser_refuses_are_400s(server, recorded, body, reason):
    server.load("hello", reply="x")
    status, error = server.request("POST", "/v1/chat/completions", raw=body)
    assert status == 400, error
    assert error["error"]["code"] == "invalid_json"
    assert reason.decode() in error["error"]["message"]
    assert recorded() == []
