"""ABI compatibility: plugins built for ABI 1.0 on the 1.1 host, through every dialect.

Two 1.0 plugins are compiled here and loaded at runtime (the plugin dir is empty):
  - "reference": the frozen 1.0 reference plugin (Tests/compat/abi-1.0), compiled against the
    frozen 1.0 header, as a plugin built before 1.1 existed is;
  - "reference-cut": today's reference plugin cut to 1.0 by Tests/compat/reference_cut_to_1_0.c.
    Its function table and every event it hands the host end exactly at a PROT_NONE guard page,
    so a host that reads one byte past a 1.0 size dies on the spot.
Each is driven through every dialect with the official SDKs. The last test checks that the
server is still alive and exits 0 on SIGTERM: it would not be, had it read past a 1.0 struct.

The tests share one server and run in file order; the survival test must stay last.
"""
import json
import math
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import openai
import pytest

from conftest import (BUILD_DIR, ROOT, Server, engine_stays_stopped, start_thread, wait_for,
                      wait_for_stats)

HEADER_1_1 = ROOT / "Sources" / "CPatchbayABI" / "include"
FROZEN_1_0 = ROOT / "Tests" / "compat" / "abi-1.0"
SUPPORT = ROOT / "Plugins" / "PluginSupport"
CUT_WRAPPER = ROOT / "Tests" / "compat" / "reference_cut_to_1_0.c"

PLUGINS = ["reference", "reference-cut"]
REPLY = "alpha beta gamma delta"
WEATHER_OPENAI = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
WEATHER_ANTHROPIC = {"name": "get_weather", "description": "Get the weather in a city.",
                     "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def include_flags(include_dirs):
    return [f"-I{d}" for d in include_dirs]


def header_minor(include_dirs) -> int:
    """PB_ABI_VERSION_MINOR of the patchbay.h that these -I paths resolve (as PluginSupport sees it)."""
    with tempfile.TemporaryDirectory() as empty:  # so no stray patchbay.h next to the source is found
        result = subprocess.run(["cc", "-E", "-dM", *include_flags(include_dirs), "-x", "c", "-"],
                                input='#include "patchbay.h"\n', capture_output=True, text=True, cwd=empty)
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("#define PB_ABI_VERSION_MINOR ")]
    return int(line.split()[-1])


def compile_plugin(source: Path, out: Path, include_dirs) -> Path:
    """Builds a plugin the way a third party would: one shared library, only pb_plugin_entry exported."""
    support = sorted(str(p) for p in SUPPORT.glob("*.c"))
    result = subprocess.run(
        ["cc", "-std=gnu11", "-shared", "-fPIC", "-fvisibility=hidden", *include_flags(include_dirs),
         "-o", str(out), str(source), *support, "-lpthread", "-lm"],
        capture_output=True, text=True)
    assert result.returncode == 0, f"cannot build {source}:\n{result.stderr}"
    return out


@pytest.fixture(scope="module")
def compat(tmp_path_factory):
    """One server with both 1.0 plugins loaded through POST /api/plugins/load."""
    assert (BUILD_DIR / "patchbay").exists(), f"build the server first ({BUILD_DIR / 'patchbay'})"
    workdir = tmp_path_factory.mktemp("abi-compat")
    # The frozen header must be the one the 1.0 build sees, also from PluginSupport's sources.
    frozen_includes = [FROZEN_1_0, SUPPORT / "include"]
    assert header_minor(frozen_includes) == 0
    current_includes = [HEADER_1_1, SUPPORT / "include"]
    assert header_minor(current_includes) == 1
    libraries = {
        "reference": compile_plugin(FROZEN_1_0 / "reference_plugin_1_0.c", workdir / "libreference_1_0.so",
                                    frozen_includes),
        "reference-cut": compile_plugin(CUT_WRAPPER, workdir / "libreference_cut.so", current_includes),
    }
    server = Server(workdir, plugins=())
    try:
        assert server.get("/api/plugins")[1]["plugins"] == []
        for name, library in libraries.items():
            # Into the plugin folder after start: plugins load only from there.
            library = library.rename(server.plugin_dir / library.name)
            status, plugin = server.post("/api/plugins/load", {"path": str(library)})
            assert status == 200, plugin
            assert plugin["name"] == name and plugin["abi_version"] == "1.0", plugin
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def oai(compat):
    return compat.openai()


@pytest.fixture(scope="module")
def claude(compat):
    return compat.anthropic()


def load(server, plugin, name, **settings) -> str:
    """Loads a .ref model on `plugin` (chosen by `backend`, as both claim .ref); returns its id."""
    model = f"{plugin}-{name}"
    path = server.model_file(model, **settings)
    status, body = server.post("/api/inference/load", {"model_path": path, "backend": plugin})
    assert status == 200, body
    assert body["model"] == model and body["backend"] == plugin, body
    return model


def unload(server, model):
    assert server.post("/api/inference/unload", {"model_path": model}) == (200, {"status": "unloaded", "model": model})


def test_both_plugins_are_listed_as_abi_1_0(compat):
    plugins = {p["name"]: p for p in compat.get("/api/plugins")[1]["plugins"]}
    assert set(plugins) == set(PLUGINS)
    for name in PLUGINS:
        assert plugins[name]["abi_version"] == "1.0", plugins[name]
        assert plugins[name]["model_formats"] == ["ref"]
        assert {"chat", "completion", "tools", "reasoning", "tokenize", "embeddings"} <= set(plugins[name]["capabilities"])
        assert "transcription" not in plugins[name]["capabilities"]  # a 1.1 capability
    assert plugins["reference"]["version"] == "1.0.0"
    assert plugins["reference-cut"]["version"] == "1.1.0"


@pytest.mark.parametrize("plugin", PLUGINS)
def test_load_validate_and_model_info(compat, plugin):
    path = compat.model_file(f"{plugin}-info", context_length=2048)
    status, body = compat.post("/api/inference/validate", {"model_path": path, "backend": plugin})
    assert status == 200 and body["backend"] == plugin, body
    model = load(compat, plugin, "info", context_length=2048)
    [info] = [m for m in compat.get("/api/inference/status")[1]["models"] if m["model"] == model]
    # model_info from a 1.0 plugin: only context_length and capabilities, written into a 1.0-sized struct.
    assert info["context_length"] == 2048 and info["backend"] == plugin
    assert info["supports_tools"] and info["supports_reasoning"] and not info["is_vision"]
    unload(compat, model)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_chat_completions(compat, oai, plugin):
    model = load(compat, plugin, "chat", reply=REPLY)
    reply = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello"}])
    assert reply.choices[0].message.content == REPLY
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == 2 and reply.usage.completion_tokens == 4

    chunks = list(oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello"}],
                                              stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4

    capped = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert capped.choices[0].finish_reason == "length" and capped.usage.completion_tokens == 2
    unload(compat, model)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_completions(compat, oai, plugin):
    model = load(compat, plugin, "completion", reply=REPLY)
    reply = oai.completions.create(model=model, prompt="Say four words:", max_tokens=10)
    assert reply.choices[0].text == REPLY and reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == 3 and reply.usage.completion_tokens == 4
    chunks = list(oai.completions.create(model=model, prompt="Say four words:", max_tokens=10, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 4
    unload(compat, model)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_responses(compat, oai, plugin):
    model = load(compat, plugin, "responses", reply=REPLY)
    response = oai.responses.create(model=model, instructions="Be brief.", input="Hi")
    assert response.status == "completed" and response.output_text == REPLY
    assert response.usage.output_tokens == 4
    events = list(oai.responses.create(model=model, input="Hi", stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == REPLY
    assert events[-1].response.output_text == REPLY
    unload(compat, model)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_anthropic_messages(compat, claude, plugin):
    model = load(compat, plugin, "messages", reply=REPLY, reasoning="Let me think.")
    message = claude.messages.create(model=model, max_tokens=100, system="Be brief.",
                                     messages=[{"role": "user", "content": "Hi"}])
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == REPLY and message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 4

    with claude.messages.stream(model=model, max_tokens=100, messages=[{"role": "user", "content": "Count"}],
                                extra_body={"enable_thinking": True}) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert [block.type for block in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "Let me think." and final.content[1].text == REPLY
    assert final.stop_reason == "end_turn"

    capped = claude.messages.create(model=model, max_tokens=2, messages=[{"role": "user", "content": "Go"}])
    assert capped.stop_reason == "max_tokens" and capped.content[0].text.split() == ["alpha", "beta"]
    unload(compat, model)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_count_tokens_and_embeddings(compat, oai, claude, plugin):
    model = load(compat, plugin, "tokens")
    count = claude.messages.count_tokens(model=model, messages=[{"role": "user", "content": "one two three"}])
    assert count.input_tokens == 3

    default = oai.embeddings.create(model=model, input=["hello world", "goodbye"])
    assert [d.index for d in default.data] == [0, 1]
    assert len(default.data[0].embedding) == 8
    assert math.isclose(sum(x * x for x in default.data[0].embedding), 1, abs_tol=1e-5)
    floats = oai.embeddings.create(model=model, input="hello world", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(default.data[0].embedding, abs=1e-6)
    unload(compat, model)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_tool_call_round_trips(compat, oai, claude, plugin):
    model = load(compat, plugin, "tools", reply="It is sunny.", tool_arguments='{"city": "Paris"}')
    question = [{"role": "user", "content": "Weather in Paris?"}]

    first = oai.chat.completions.create(model=model, messages=question, tools=[WEATHER_OPENAI])
    assert first.choices[0].finish_reason == "tool_calls"
    [call] = first.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    arguments, finish = "", None
    for chunk in oai.chat.completions.create(model=model, messages=question, tools=[WEATHER_OPENAI], stream=True):
        for delta in chunk.choices[0].delta.tool_calls or []:
            arguments += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert json.loads(arguments) == {"city": "Paris"} and finish == "tool_calls"

    second = oai.chat.completions.create(model=model, tools=[WEATHER_OPENAI], messages=question + [
        {"role": "assistant", "tool_calls": [{"id": call.id, "type": "function",
                                              "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 18 C"},
    ])
    assert second.choices[0].finish_reason == "stop" and second.choices[0].message.content == "It is sunny."

    use_first = claude.messages.create(model=model, max_tokens=100, tools=[WEATHER_ANTHROPIC], messages=question)
    assert use_first.stop_reason == "tool_use"
    [tool_use] = [block for block in use_first.content if block.type == "tool_use"]
    assert tool_use.name == "get_weather" and tool_use.input == {"city": "Paris"}
    use_second = claude.messages.create(model=model, max_tokens=100, tools=[WEATHER_ANTHROPIC], messages=question + [
        {"role": "assistant", "content": use_first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "sunny, 18 C"}]},
    ])
    assert use_second.stop_reason == "end_turn" and use_second.content[0].text == "It is sunny."
    unload(compat, model)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_a_stop_sequence_ends_as_a_plain_stop(compat, oai, claude, plugin):
    """A 1.0 plugin cannot say that a stop sequence matched (PB_FINISH_STOP_SEQUENCE is 1.1)."""
    model = load(compat, plugin, "stop", reply=REPLY)
    reply = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], stop=["gamma"])
    assert reply.choices[0].message.content == "alpha beta " and reply.choices[0].finish_reason == "stop"

    chunks = list(oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                              stop=["gamma"], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "alpha beta "
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]

    completion = oai.completions.create(model=model, prompt="Go", max_tokens=10, stop=["gamma"])
    assert completion.choices[0].text == "alpha beta " and completion.choices[0].finish_reason == "stop"

    message = claude.messages.create(model=model, max_tokens=100, stop_sequences=["gamma"],
                                     messages=[{"role": "user", "content": "x"}])
    assert message.content[0].text == "alpha beta "
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    unload(compat, model)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_cancel_by_cancel_id_stops_the_engine(compat, oai, plugin):
    stats = str(compat.workdir / f"{plugin}-slow.stats")
    model = load(compat, plugin, "slow", reply="tick", repeat=1, token_delay_ms=50, stats_file=stats)
    cancel_id = f"compat-{plugin}"
    result = {"text": "", "finish": None, "first": threading.Event()}

    def consume():
        for chunk in oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "go"}],
                                                 max_tokens=5000, stream=True, extra_body={"cancel_id": cancel_id}):
            if chunk.choices:
                result["finish"] = chunk.choices[0].finish_reason or result["finish"]
                if chunk.choices[0].delta.content:
                    result["text"] += chunk.choices[0].delta.content
                    result["first"].set()
        return result

    started = time.time()
    thread = start_thread(consume)
    wait_for(lambda: result["first"].is_set() or not thread.is_alive(), 10, "the first token")
    time.sleep(0.3)
    assert compat.post("/api/inference/cancel", {"cancel_id": cancel_id}) == (200, {"cancelled": 1})
    thread.join(10)
    assert time.time() - started < 5  # 5000 tokens at 50 ms would take minutes
    assert result["finish"] == "stop"  # a cancelled stream ends cleanly
    produced = wait_for_stats(stats, active_runs=0)["produced_tokens"]
    assert 0 < produced < 100 and len(result["text"].split()) <= produced
    assert engine_stays_stopped(stats)["produced_tokens"] == produced, "the engine kept decoding after the cancel"
    assert compat.wait_idle() == 0
    unload(compat, model)


def test_an_error_event_crosses_as_a_1_0_event(compat, oai):
    """The cut plugin's busy error: a 1.0 host hears PB_ERR_ENGINE_UNAVAILABLE, never the 1.1 PB_ERR_BUSY."""
    model = load(compat, "reference-cut", "busy", reply="tick", repeat=1, token_delay_ms=50, slots=1,
                 busy_when_full=1)
    holder = start_thread(oai.chat.completions.create, model=model, messages=[{"role": "user", "content": "go"}],
                          max_tokens=5000, extra_body={"cancel_id": "compat-busy-holder"})
    wait_for(lambda: compat.active_generations() == 1, 5, "the first run to start")
    time.sleep(0.2)
    try:
        with pytest.raises(openai.APIStatusError) as refused:
            oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "me too"}])
        assert refused.value.status_code == 502, refused.value
        assert "slots of the reference engine are busy" in str(refused.value)
    finally:
        compat.post("/api/inference/cancel", {"cancel_id": "compat-busy-holder"})
        holder.join(10)
    assert compat.wait_idle() == 0
    unload(compat, model)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_unload_releases_the_model(compat, oai, plugin):
    model = load(compat, plugin, "gone", reply=REPLY)
    assert oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}]).choices[0].message.content
    unload(compat, model)
    assert model not in compat.get("/api/inference/status")[1]["loaded"]
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])


# Keep this test last: it ends the shared server.
def test_the_server_survived_and_exits_cleanly(compat):
    assert compat.get("/health")[0] == 200
    assert {p["name"] for p in compat.get("/api/plugins")[1]["plugins"]} == set(PLUGINS)
    compat.stop()  # SIGTERM: exit 0, no crash report in the log
    assert "reference-cut: the plugin sent" not in compat.log_text()
