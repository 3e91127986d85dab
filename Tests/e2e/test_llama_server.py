"""The llama-server backend, end to end: the real llama-server built from PyPI's llama.cpp,
the real SmolLM2-135M-Instruct, the real `patchbay` binary, the official openai SDK.
Cancels are verified at llama-server itself (/slots, /metrics), not through Patchbay."""
import json
import os
import re
import signal
import time
import urllib.error
import uuid
from pathlib import Path

import openai
import pytest

import conftest
from conftest import (LLAMA_PLUGIN, LLAMA_TIMEOUT, REFERENCE_PLUGIN, SMOLLM2, Server, check_load_progress, needs_llama,
                      start_thread, stop_and_clean_up, wait_for, watch_load)
from llama_child import llama_children, wait_gone

TEMPLATES = Path(os.environ.get("PATCHBAY_LLAMA_TEMPLATES", "/nonexistent"))

pytestmark = [needs_llama, LLAMA_TIMEOUT]

GREEDY = {"temperature": 0, "seed": 7}
CAPITAL = [{"role": "system", "content": "You are a helpful assistant."},
           {"role": "user", "content": "What is the capital of France?"}]
# A prompt SmolLM2 answers at length, so that there is decoding to interrupt.
LONG_ANSWER = [{"role": "user", "content": "Write a very long story about a dragon who learns to bake bread."}]


def start_server(**kwargs) -> Server:
    return conftest.start_server((REFERENCE_PLUGIN, LLAMA_PLUGIN), prefix="patchbay-llama-", **kwargs)


def load_smollm2(server: Server, **fields) -> dict:
    status, body = server.post("/api/inference/load", {"model_path": SMOLLM2, **fields})
    assert status == 200, body
    return body


def the_child(server: Server):
    children = llama_children(server.process.pid)
    assert len(children) == 1, children
    return children[0]


@pytest.fixture(scope="module")
def llama():
    """One host with SmolLM2 loaded, shared by the tests that do not disturb it."""
    server = start_server()
    try:
        load_smollm2(server)
        yield server
    finally:
        stop_and_clean_up(server)


@pytest.fixture
def server():
    """A host of the test's own, for tests that kill, stop or reload things."""
    server = start_server()
    try:
        yield server
    finally:
        stop_and_clean_up(server)


@pytest.fixture
def client(llama):
    return llama.openai(timeout=120)


def stream_text(client, **kwargs):
    text, finish, usage = "", None, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish, usage


# ─── Chat ───────────────────────────────────────────────────────────────────

def test_model_is_served_by_llama_server(llama):
    status, models = llama.get("/v1/models")
    assert status == 200
    [model] = models["data"]
    assert model["id"] == "SmolLM2-135M-Instruct.Q4_1"
    assert model["backend"] == "llama-server"
    assert model["context_length"] == 8192
    child = the_child(llama)
    assert child.args[0] == os.environ["PATCHBAY_LLAMA_SERVER"]
    # On a Unix socket in a directory only its owner may enter, and useless without the key
    # only the host knows.
    socket_dir = Path(child.socket_path).parent
    assert child.socket_path.endswith(".sock") and socket_dir.stat().st_mode & 0o777 == 0o700
    with pytest.raises(urllib.error.HTTPError) as refused:
        child.get("/slots", key=False)
    assert refused.value.code == 401


def test_chat_non_streaming_with_usage(client):
    reply = client.chat.completions.create(model="default", messages=CAPITAL, max_tokens=48, **GREEDY)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 5
    assert 0 < reply.usage.completion_tokens <= 48
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_streaming_matches_non_streaming(client):
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = client.chat.completions.create(model="default", messages=messages, max_tokens=40, **GREEDY)
    text, finish, usage = stream_text(client, model="default", messages=messages, max_tokens=40, **GREEDY)
    assert text == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_max_tokens_gives_length(client):
    reply = client.chat.completions.create(model="default", messages=LONG_ANSWER, max_tokens=5, **GREEDY)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5


def test_stop_sequence_cuts_the_answer(client):
    free = client.chat.completions.create(model="default", messages=LONG_ANSWER, max_tokens=60, **GREEDY)
    text = free.choices[0].message.content
    words = text.split()
    stop_word = words[len(words) // 2]
    cut = client.chat.completions.create(model="default", messages=LONG_ANSWER, max_tokens=60, stop=[stop_word],
                                         **GREEDY)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[:text.index(stop_word)]


def test_the_plugins_log_line_for_a_run_carries_the_clients_request_id(llama, client):
    raw = client.chat.completions.with_raw_response.create(model="default", messages=CAPITAL, max_tokens=5, **GREEDY,
                                                           extra_headers={"x-request-id": "trace-llama-7"})
    assert raw.headers["x-request-id"] == "trace-llama-7"
    assert raw.parse().choices[0].finish_reason == "length"
    line = wait_for(lambda: re.search(r"request trace-llama-7: run ended \((\w+)\) after \d+ ms", llama.log_text()), 5,
                    "the plugin's line for request trace-llama-7")
    assert line[1] == "length", line[0]


def test_multi_turn_conversation_reaches_the_model(client):
    one = client.chat.completions.create(model="default", messages=CAPITAL, max_tokens=30, **GREEDY)
    assert "Paris" in one.choices[0].message.content
    follow_up = {"role": "user", "content": "Tell me one famous building there."}
    history = CAPITAL + [{"role": "assistant", "content": one.choices[0].message.content}, follow_up]
    two = client.chat.completions.create(model="default", messages=history, max_tokens=30, **GREEDY)
    alone = client.chat.completions.create(model="default", messages=[CAPITAL[0], follow_up], max_tokens=30,
                                           **GREEDY)
    # The whole history was rendered into the prompt, and it changed the (greedy) answer.
    assert two.usage.prompt_tokens > alone.usage.prompt_tokens + one.usage.completion_tokens
    assert two.choices[0].message.content != alone.choices[0].message.content


def test_prompt_longer_than_the_context_is_a_400(llama):
    status, body = llama.post("/api/inference/load", {"model_path": SMOLLM2, "alias": "smol-512", "max_seq_length": 512})
    assert status == 200, body
    try:
        status, body = llama.post("/v1/chat/completions", {
            "model": "smol-512", "messages": [{"role": "user", "content": "bread " * 1500}]})
        assert status == 400, body
        assert body["error"]["code"] == "context_length_exceeded"
        assert "context" in body["error"]["message"]
        # The same in a stream: the SDK raises, the host stays healthy.
        client = llama.openai()
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="smol-512", stream=True,
                                           messages=[{"role": "user", "content": "bread " * 1500}])
    finally:
        llama.post("/api/inference/unload", {"model_path": "smol-512", "force_cancel_active": True})


def test_tools_on_a_template_without_tools_are_a_clear_400(llama):
    status, body = llama.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]})
    assert status == 400, body
    assert body["error"]["param"] == "tools"
    assert "tools" in body["error"]["message"]


def test_image_on_a_text_only_model_is_a_400(llama):
    status, body = llama.post("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]})
    assert status == 400, body
    assert "vision" in body["error"]["message"]


# ─── Stop: verified at llama-server ──────────────────────────────────────────

def start_stream(client, cancel_id, messages, max_tokens=2000):
    """Streams a chat on a worker thread. Returns (worker, progress): `progress` fills in as
    chunks arrive; `worker.join()` returns it at the end, or raises what the stream raised."""
    progress = {"chunks": 0, "finish": None}

    def consume():
        for chunk in client.chat.completions.create(
                model="default", messages=messages, max_tokens=max_tokens, stream=True,
                extra_body={"cancel_id": cancel_id}, **GREEDY):
            if chunk.choices:
                progress["finish"] = chunk.choices[0].finish_reason or progress["finish"]
                if chunk.choices[0].delta.content:
                    progress["chunks"] += 1
        return progress

    return start_thread(consume), progress


def test_cancel_mid_decode_stops_llama_server(llama, client):
    child = the_child(llama)
    stream, progress = start_stream(client, "decode-stop", LONG_ANSWER)
    wait_for(lambda: progress["chunks"] >= 10, 60, "ten streamed tokens")
    assert child.busy()
    sent = time.perf_counter()
    status, body = llama.post("/api/inference/cancel", {"cancel_id": "decode-stop"})
    assert status == 200 and body["cancelled"] == 1
    child.wait_idle(timeout=2)
    stopped_after = time.perf_counter() - sent
    assert stream.join(10)["finish"] == "stop"
    predicted = child.tokens_predicted_total()
    time.sleep(0.5)
    assert child.tokens_predicted_total() == predicted, "llama-server kept decoding after the cancel"
    assert stopped_after < 1.0
    assert llama.wait_idle() == 0


PARAGRAPH = ("The baker rose before dawn, lit the oven, weighed the flour and the salt, and folded the dough "
             "by hand while the street outside was still dark and quiet. ")


def paragraphs(count: int) -> list:
    """A user turn of `count` paragraphs that starts with words of its own, so that no earlier
    prompt in llama-server's cache shares more than the template's opening with it."""
    return [{"role": "user", "content": f"Request {uuid.uuid4().hex}. Summarise this text: " + PARAGRAPH * count}]


def prompt_speed(child, client) -> tuple[float, float]:
    """(prompt tokens per second, prompt tokens per paragraph) on this machine now, from
    llama-server's own counters over one uncached prompt."""
    tokens, seconds = child.prompt_tokens_total(), child.prompt_seconds_total()
    reply = client.chat.completions.create(model="default", messages=paragraphs(20), max_tokens=1, **GREEDY)
    tokens, seconds = child.prompt_tokens_total() - tokens, child.prompt_seconds_total() - seconds
    assert tokens > 0 and seconds > 0, "llama-server counted no prompt"
    return tokens / seconds, reply.usage.prompt_tokens / 20


def test_cancel_during_prefill_stops_llama_server(llama, client):
    """The prompt is sized to take ten seconds on this machine (within the context); the
    cancel comes once llama-server has processed its first prompt batch. Its prompt-token
    counter then shows the prompt cut short, whatever the machine's speed."""
    child = the_child(llama)
    speed, per_paragraph = prompt_speed(child, client)
    count = max(30, min(int(10 * speed / per_paragraph), int(7000 / per_paragraph)))
    total = int(count * per_paragraph)
    batch_seconds = 128 / speed  # the plugin's default n_batch
    prompt_before, predicted_before = child.prompt_tokens_total(), child.tokens_predicted_total()
    stream, progress = start_stream(client, "prefill-stop", paragraphs(count), max_tokens=50)
    counted_at_cancel = wait_for(child.prompt_processing, 30, "llama-server to process a first prompt batch")
    sent = time.perf_counter()
    status, body = llama.post("/api/inference/cancel", {"cancel_id": "prefill-stop"})
    assert body["cancelled"] == 1
    child.wait_idle(timeout=10)
    stopped_after = time.perf_counter() - sent
    assert stream.join(10)["chunks"] == 0
    assert child.tokens_predicted_total() == predicted_before, "a token was decoded after a cancel during prefill"
    counted = child.prompt_tokens_total() - prompt_before
    print(f"prompt {total} tokens at {speed:.0f} tokens/s; cancelled at {counted_at_cancel}, "
          f"stopped after {counted} tokens and {stopped_after:.2f} s")
    assert counted < total / 2, f"llama-server processed {counted} of {total} prompt tokens after the cancel"
    # The stop lands at the next prompt batch or two (plus the host's and curl's share).
    assert stopped_after < 3 * batch_seconds + 0.5, \
        f"llama-server went on with the prompt for {stopped_after:.2f} s ({batch_seconds:.2f} s a batch)"


def test_client_disconnect_frees_the_slot(llama, client):
    child = the_child(llama)
    stream = client.chat.completions.create(model="default", messages=LONG_ANSWER, max_tokens=2000, stream=True,
                                            **GREEDY)
    for i, _ in enumerate(stream):
        if i == 10:
            break
    stream.close()
    child.wait_idle(timeout=2)
    predicted = child.tokens_predicted_total()
    time.sleep(0.5)
    assert child.tokens_predicted_total() == predicted, "llama-server kept decoding for a client that left"
    assert llama.wait_idle() == 0


# ─── Load, unload, faults, process lifetime ─────────────────────────────────

def test_load_progress_moves_before_ready_and_unload_frees_the_child(server):
    (status, body), samples = watch_load(server, {"model_path": SMOLLM2})
    assert status == 200 and body["status"] == "loaded", body
    # The child's resident memory against the file's size, sampled by the plugin every 50 ms:
    # SmolLM2 (100 MB) loads in well under a second, so a few steps (four on two cores).
    check_load_progress(server, samples, distinct=2)

    child = the_child(server)
    status, _ = server.post("/api/inference/unload", {"model_path": SMOLLM2})
    assert status == 200
    assert wait_gone(child.pid, timeout=10)
    assert llama_children(server.process.pid) == []


def test_killed_child_gives_a_clean_error_and_the_next_request_respawns_it(server):
    load_smollm2(server)
    child = the_child(server)
    client = server.openai()
    stream = client.chat.completions.create(model="default", messages=LONG_ANSWER, max_tokens=2000, stream=True,
                                            **GREEDY)
    with pytest.raises(openai.APIError) as caught:
        for i, _ in enumerate(stream):
            if i == 5:
                os.kill(child.pid, signal.SIGKILL)
    assert "Lost connection to the model server" in str(caught.value)
    assert server.wait_idle() == 0

    reply = client.chat.completions.create(model="default", max_tokens=8,
                                           messages=[{"role": "user", "content": "Hello!"}], **GREEDY)
    assert reply.choices[0].message.content
    respawned = the_child(server)
    assert respawned.pid != child.pid


def test_non_streaming_request_to_a_dead_child_is_a_502_then_recovers(server):
    load_smollm2(server)
    child = the_child(server)
    asker = start_thread(server.post, "/v1/chat/completions", {"messages": LONG_ANSWER, "max_tokens": 2000})
    wait_for(child.busy, 10, "llama-server to start the request")
    os.kill(child.pid, signal.SIGKILL)
    status, body = asker.join(30)
    assert status == 502, body
    assert "Lost connection to the model server" in body["error"]["message"]
    status, body = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                        "max_tokens": 4})
    assert status == 200, body


def test_no_child_outlives_the_host_killed_with_sigkill(server):
    load_smollm2(server)
    child = the_child(server)
    server.kill()
    assert wait_gone(child.pid, timeout=10), "llama-server outlived a SIGKILLed host"


def test_no_child_outlives_sigterm(server):
    load_smollm2(server)
    child = the_child(server)
    server.stop()
    assert server.process.returncode == 0
    assert wait_gone(child.pid, timeout=10)


def test_load_errors_are_clear(server):
    status, body = server.post("/api/inference/load", {"model_path": SMOLLM2, "llama_extra_args": ["--port", "1"]})
    assert status == 400, body
    assert "--port" in body["error"]["message"]

    status, body = server.post("/api/inference/load", {"model_path": SMOLLM2,
                                                       "llama_extra_args": ["--no-such-flag"]})
    assert status == 400, body
    assert "--no-such-flag" in body["error"]["message"]

    # A value llama-server rejects: the client hears that the child exited, the log says why.
    status, body = server.post("/api/inference/load", {"model_path": SMOLLM2,
                                                       "llama_extra_args": ["--flash-attn", "sideways"]})
    assert status == 500, body
    assert "exited during load" in body["error"]["message"]
    assert "sideways" in server.log_path.read_text()  # the tail of llama-server's own log

    status, body = server.post("/api/inference/load", {"model_path": SMOLLM2,
                                                       "llama_server_path": "/nonexistent/llama-server"})
    assert status == 400, body
    assert "llama_server_path" in body["error"]["message"]
    assert llama_children(server.process.pid) == []


# ─── Tool calling with a tool-aware chat template ───────────────────────────

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def load_with_template(llama, alias, template):
    status, body = llama.post("/api/inference/load", {
        "model_path": SMOLLM2, "alias": alias, "chat_template_override": (TEMPLATES / template).read_text()})
    assert status == 200, body
    return body


@pytest.fixture(scope="module")
def tool_model(llama):
    """SmolLM2 with functionary v3.2's template: of the tool-aware templates in llama.cpp's tree,
    the one under which this llama.cpp build constrains output to a call for tool_choice
    "required" (with the others, SmolLM2 answers in prose)."""
    assert load_with_template(llama, "smol-tools", "meetkai-functionary-medium-v3.2.jinja")["supports_tools"]
    yield "smol-tools"
    llama.post("/api/inference/unload", {"model_path": "smol-tools", "force_cancel_active": True})


@pytest.fixture(scope="module")
def answer_model(llama):
    """SmolLM2 with SmolLM3's template, which renders tool calls and results and lets the model
    answer in text. (Under functionary's template the model must open its answer with `>>>all`,
    which SmolLM2 never does, and llama-server fails the request.)"""
    load_with_template(llama, "smol-answers", "HuggingFaceTB-SmolLM3-3B.jinja")
    yield "smol-answers"
    llama.post("/api/inference/unload", {"model_path": "smol-answers", "force_cancel_active": True})


def test_tools_reach_the_engine_and_a_call_comes_back(llama, client, tool_model):
    reply = client.chat.completions.create(model=tool_model, messages=ASK_WEATHER, tools=[WEATHER_TOOL],
                                           tool_choice="required", max_tokens=200, **GREEDY)
    # The template renders the tools' schemas into the prompt: a longer description, a longer prompt.
    verbose_tool = json.loads(json.dumps(WEATHER_TOOL))
    verbose_tool["function"]["description"] += " It reports temperature, wind, humidity and the sky." * 4
    verbose = client.chat.completions.create(model=tool_model, messages=ASK_WEATHER, tools=[verbose_tool],
                                             tool_choice="required", max_tokens=200, **GREEDY)
    assert verbose.usage.prompt_tokens > reply.usage.prompt_tokens + 30
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert call.id
    assert "Paris" in json.loads(call.function.arguments)["city"]


def test_streamed_tool_call_deltas_and_the_follow_up_turn(client, tool_model, answer_model):
    name, arguments, call_id, finish, deltas = "", "", None, None, 0
    for chunk in client.chat.completions.create(model=tool_model, messages=ASK_WEATHER, tools=[WEATHER_TOOL],
                                                tool_choice="required", max_tokens=200, stream=True, **GREEDY):
        if not chunk.choices:
            continue
        for call in chunk.choices[0].delta.tool_calls or []:
            assert call.index == 0
            deltas += 1
            call_id = call.id or call_id
            if call.function:
                name += call.function.name or ""
                arguments += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert deltas > 1, "the arguments should stream in pieces"
    assert name == "get_weather" and call_id
    assert "Paris" in json.loads(arguments)["city"]

    follow_up = ASK_WEATHER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": '{"temperature_c": 18, "sky": "sunny"}'},
    ]
    reply = client.chat.completions.create(model=answer_model, messages=follow_up, max_tokens=60, **GREEDY)
    assert reply.choices[0].finish_reason == "stop"
    assert not reply.choices[0].message.tool_calls
    # The answer uses the tool's result, so the result reached the model.
    assert "sunny" in reply.choices[0].message.content
