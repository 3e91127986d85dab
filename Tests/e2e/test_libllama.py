"""The in-process libllama backend, end to end: llama.cpp inside the host's own process
(Plugins/LibLlama), the real SmolLM2-135M-Instruct, the real `patchbay` binary, the official
openai and anthropic SDKs.

Every dialect against it; parity with the llama-server backend on the same model (greedy):
the same prompt tokens, the same text, the same tool call; cancels measured by the engine
itself (its `run cancelled: engine stopped X ms after the cancel call` log line); streams
running beside a cancel, and eight streams at once, each equal to its answer alone; a
client that stops reading; memory and threads given back on unload; one exported symbol."""
import fcntl
import json
import math
import os
import re
import socket
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

import conftest
from conftest import (LIBLLAMA_PLUGIN, LLAMA_PLUGIN, LLAMA_TIMEOUT, REFERENCE_PLUGIN, SMOLLM2, Server,
                      needs_libllama, needs_llama, recv_until, start_thread, stop_and_clean_up, wait_for,
                      watch_load)
from llama_child import llama_children
from test_llama_server import (ASK_WEATHER, CAPITAL, GREEDY, LONG_ANSWER, TEMPLATES, WEATHER_TOOL, paragraphs,
                               stream_text)

pytestmark = [needs_libllama, LLAMA_TIMEOUT]

ALL_PLUGINS = (REFERENCE_PLUGIN, LLAMA_PLUGIN, LIBLLAMA_PLUGIN)
LIB = "via-lib"        # SmolLM2 in process
SERVER = "via-server"  # the same file through llama-server, for parity
# The same engine settings on both sides (they are also both backends' defaults).
ENGINE_FIELDS = {"n_parallel": 4, "n_batch": 128, "n_ubatch": 128}
# Greedy sampling for the anthropic SDK, which (in this version) takes no `temperature` argument.
GREEDY_BODY = {"temperature": 0}
# SmolLM2 answers CAPITAL greedily with "The capital of France is Paris." (checked below), so
# "Paris" is a stop string it surely produces.
STOP = "Paris"
# A raw completion SmolLM2 continues for as long as it may: a stream that does not end by itself.
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
# A chat that runs beside a cancel: long enough to be still decoding when the cancel lands.
NEIGHBOUR = [{"role": "user", "content": "Write a long story about a lighthouse keeper who befriends a whale."}]


def start_server(plugins=ALL_PLUGINS, extra_args=()) -> Server:
    return conftest.start_server(plugins, prefix="patchbay-libllama-", extra_args=extra_args)


def load(server: Server, alias: str, backend: str = "libllama", **fields) -> dict:
    status, body = server.post("/api/inference/load", {"model_path": SMOLLM2, "backend": backend, "alias": alias,
                                                       **ENGINE_FIELDS, **fields}, timeout=300)
    assert status == 200, body
    assert body["backend"] == backend, body
    return body


def unload(server: Server, alias: str):
    status, body = server.post("/api/inference/unload", {"model_path": alias, "force_cancel_active": True})
    assert status == 200, body


def load_with_template(server: Server, alias: str, backend: str, template: str) -> dict:
    return load(server, alias, backend, chat_template_override=(TEMPLATES / template).read_text())


@pytest.fixture(scope="module")
def host():
    """One host with every plugin and SmolLM2 loaded in process as `via-lib` (the first model,
    so also "default"), shared by the tests that leave it as they found it. A client that
    stops reading is cut off only after two minutes here (the slow-reader test holds one)."""
    server = start_server(extra_args=["--write-timeout-seconds", "120"])
    try:
        load(server, LIB)
        yield server
    finally:
        stop_and_clean_up(server)


@pytest.fixture(scope="module")
def via_server(host):
    """The same file through the llama-server backend, in the same host, for parity."""
    load(host, SERVER, "llama-server")
    yield SERVER
    unload(host, SERVER)


@pytest.fixture
def client(host):
    return host.openai(timeout=120)


@pytest.fixture
def claude(host):
    return host.anthropic(timeout=120)


def chat(client, model, messages, max_tokens=48, **kwargs):
    return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, **GREEDY, **kwargs)


def first_difference(a, b) -> int:
    """The first index at which two sequences differ (the shorter one's length if one is a prefix)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def describe_difference(a: str, b: str) -> str:
    at = first_difference(a, b)
    return f"first differs at character {at}: {a[max(0, at - 20):at + 30]!r} vs {b[max(0, at - 20):at + 30]!r}"


# ─── The engine's own word on a cancel ──────────────────────────────────────

CANCEL_LINE = re.compile(
    r"run cancelled: engine stopped (?P<ms>\d+(?:\.\d+)?) ms after the cancel call "
    r"\((?P<phase>during prompt processing|before its next prompt chunk|during decoding|while waiting for a slot), "
    r"(?:(?P<done>\d+)/(?P<total>\d+) prompt tokens|(?P<generated>\d+) tokens generated)\)")


def cancel_lines(server: Server) -> list:
    return list(CANCEL_LINE.finditer(server.log_text()))


def cancel_and_read_the_engine(server: Server, cancel_id: str):
    """Cancels one run by its cancel_id and returns the engine's log line about it."""
    before = len(cancel_lines(server))
    status, body = server.post("/api/inference/cancel", {"cancel_id": cancel_id})
    assert status == 200 and body == {"cancelled": 1}, body
    new = wait_for(lambda: cancel_lines(server)[before:], 10, f"the engine's log line for the cancel of {cancel_id}")
    assert len(new) == 1, [line.group(0) for line in new]
    return new[0]


def start_stream(client, model, cancel_id, messages, max_tokens=2000):
    """Streams a chat on a worker thread, with prompt progress. Returns (worker, progress):
    `progress` fills in as chunks arrive; `worker.join()` returns it at the end, or raises
    what the stream raised."""
    progress = {"chunks": 0, "text": "", "finish": None, "processed": 0, "total": 0, "first_token_at": None,
                "finished_at": None}

    def consume():
        for chunk in client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, stream=True,
                extra_body={"cancel_id": cancel_id, "return_progress": True}, **GREEDY):
            prompt_progress = (chunk.model_extra or {}).get("prompt_progress")
            if prompt_progress:
                progress["processed"], progress["total"] = prompt_progress["processed"], prompt_progress["total"]
            if chunk.choices:
                progress["finish"] = chunk.choices[0].finish_reason or progress["finish"]
                if chunk.choices[0].delta.content:
                    progress["chunks"] += 1
                    progress["text"] += chunk.choices[0].delta.content
                    progress["first_token_at"] = progress["first_token_at"] or time.monotonic()
        progress["finished_at"] = time.monotonic()
        return progress

    return start_thread(consume), progress


# ─── The plugin and the model ───────────────────────────────────────────────

def test_the_plugin_exports_only_its_entry_point():
    """llama.cpp and ggml are linked in statically and stay inside (exports.map): nothing
    they define can clash with another plugin's copy, or with the host's."""
    listing = subprocess.run(["nm", "-D", "--defined-only", str(LIBLLAMA_PLUGIN)], capture_output=True, text=True,
                             check=True).stdout
    symbols = [line.split()[-1] for line in listing.splitlines() if line.strip()]
    assert symbols == ["pb_plugin_entry"], listing


def test_model_is_served_in_process(host):
    status, models = host.get("/v1/models")
    assert status == 200
    model = next(m for m in models["data"] if m["id"] == LIB)
    assert model["backend"] == "libllama"
    assert model["context_length"] == 8192
    assert model["training_context_length"] == 8192
    assert model["parallel_slots"] == 4
    assert model["embedding_dimensions"] == 576  # SmolLM2-135M's hidden size
    assert model["architecture"] == "llama"
    assert {"chat", "completion", "embeddings", "tokenize"} <= set(model["capabilities"]), model
    # In process: only llama-server-backed models have a child.
    servers = [m for m in models["data"] if m["backend"] == "llama-server"]
    assert len(llama_children(host.process.pid)) == len(servers)
    plugins = {p["name"]: p for p in host.get("/api/plugins")[1]["plugins"]}
    assert "libllama" in plugins and "gguf" in json.dumps(plugins["libllama"]), plugins


# ─── Every dialect ──────────────────────────────────────────────────────────

def test_chat_non_streaming_with_usage(client):
    reply = chat(client, LIB, CAPITAL)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    assert reply.usage.prompt_tokens > 5
    assert 0 < reply.usage.completion_tokens < 48
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_streaming_matches_non_streaming(client):
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = chat(client, LIB, messages, max_tokens=40)
    text, finish, usage = stream_text(client, model=LIB, messages=messages, max_tokens=40, **GREEDY)
    assert text == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_max_tokens_gives_length(client):
    reply = chat(client, LIB, LONG_ANSWER, max_tokens=5)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5
    text, finish, usage = stream_text(client, model=LIB, messages=LONG_ANSWER, max_tokens=5, **GREEDY)
    assert (text, finish, usage.completion_tokens) == (reply.choices[0].message.content, "length", 5)


def test_stop_string_cuts_the_answer(client):
    free = chat(client, LIB, LONG_ANSWER, max_tokens=60).choices[0].message.content
    words = free.split()
    stop_word = words[len(words) // 2]
    expected = free[:free.index(stop_word)]
    cut = chat(client, LIB, LONG_ANSWER, max_tokens=60, stop=[stop_word])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == expected
    assert stop_word not in cut.choices[0].message.content
    text, finish, _ = stream_text(client, model=LIB, messages=LONG_ANSWER, max_tokens=60, stop=[stop_word], **GREEDY)
    assert (text, finish) == (expected, "stop")


def test_multi_turn_conversation_reaches_the_model(client):
    one = chat(client, LIB, CAPITAL, max_tokens=30)
    assert "Paris" in one.choices[0].message.content
    follow_up = {"role": "user", "content": "Tell me one famous building there."}
    history = CAPITAL + [{"role": "assistant", "content": one.choices[0].message.content}, follow_up]
    two = chat(client, LIB, history, max_tokens=30)
    alone = chat(client, LIB, [CAPITAL[0], follow_up], max_tokens=30)
    # The whole history was rendered into the prompt, and it changed the (greedy) answer.
    assert two.usage.prompt_tokens > alone.usage.prompt_tokens + one.usage.completion_tokens
    assert two.choices[0].message.content != alone.choices[0].message.content
    # The first turn was still in a slot's cache: reused, not processed again.
    assert two.usage.prompt_tokens_details.cached_tokens >= one.usage.prompt_tokens


def test_raw_completion(client):
    reply = client.completions.create(model=LIB, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in reply.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=LIB, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == reply.choices[0].text
    short = client.completions.create(model=LIB, prompt="Once upon a time", max_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    free = client.completions.create(model=LIB, prompt=COUNTING, max_tokens=20, temperature=0).choices[0].text
    assert "15" in free, free  # the premise: SmolLM2 counts on
    counted = client.completions.create(model=LIB, prompt=COUNTING, max_tokens=20, temperature=0,
                                        stop=["15"]).choices[0]
    assert counted.finish_reason == "stop"
    assert counted.text == free[:free.index("15")]


def test_responses(client):
    response = client.responses.create(model=LIB, instructions="You are a helpful assistant.",
                                       input="What is the capital of France?", max_output_tokens=40, temperature=0)
    assert "Paris" in response.output_text
    assert response.status == "completed"
    assert response.usage.input_tokens > 5 and response.usage.output_tokens > 0
    text = "".join(event.delta for event in client.responses.create(
        model=LIB, instructions="You are a helpful assistant.", input="What is the capital of France?",
        max_output_tokens=40, temperature=0, stream=True) if event.type == "response.output_text.delta")
    assert text == response.output_text
    short = client.responses.create(model=LIB, input=LONG_ANSWER[0]["content"], max_output_tokens=5, temperature=0)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"
    assert short.usage.output_tokens == 5


def test_anthropic_messages(claude):
    message = claude.messages.create(model=LIB, max_tokens=40, system=CAPITAL[0]["content"],
                                     messages=[CAPITAL[1]], extra_body=GREEDY_BODY)
    assert "Paris" in message.content[0].text
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 5 and message.usage.output_tokens > 0
    with claude.messages.stream(model=LIB, max_tokens=40, system=CAPITAL[0]["content"], messages=[CAPITAL[1]],
                                extra_body=GREEDY_BODY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == message.content[0].text
    assert final.usage.output_tokens == message.usage.output_tokens

    with claude.messages.stream(model=LIB, max_tokens=5, extra_body=GREEDY_BODY, messages=LONG_ANSWER) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.stop_reason == "max_tokens" and final.usage.output_tokens == 5

    cut = claude.messages.create(model=LIB, max_tokens=40, system=CAPITAL[0]["content"], messages=[CAPITAL[1]],
                                 stop_sequences=[STOP], extra_body=GREEDY_BODY)
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == STOP
    assert cut.content[0].text == message.content[0].text[:message.content[0].text.index(STOP)]

    # The same prompt the engine saw: the rendered template, counted by the model's tokenizer.
    count = claude.messages.count_tokens(model=LIB, system=CAPITAL[0]["content"], messages=[CAPITAL[1]])
    assert count.input_tokens == message.usage.input_tokens


def test_count_tokens_grows_with_the_conversation(claude):
    short = claude.messages.count_tokens(model=LIB, messages=[{"role": "user", "content": "one two three"}])
    longer = claude.messages.count_tokens(model=LIB, messages=[{"role": "user", "content": "one two three " * 50}])
    assert 0 < short.input_tokens < longer.input_tokens
    assert longer.input_tokens - short.input_tokens >= 49 * 3


def cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


SENTENCES = ["The cat sat on the mat.", "A cat was sitting on the mat.", "Quarterly revenue grew by four percent."]


def test_embeddings(client):
    result = client.embeddings.create(model=LIB, input=SENTENCES)
    vectors = [d.embedding for d in result.data]
    assert [len(v) for v in vectors] == [576] * 3
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3 for v in vectors), "not unit length"
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    assert result.usage.prompt_tokens > 15
    # The model chats on between embeddings (a context of its own for them).
    assert "Paris" in chat(client, LIB, CAPITAL).choices[0].message.content
    again = client.embeddings.create(model=LIB, input=SENTENCES[0]).data[0].embedding
    assert cosine(again, vectors[0]) > 0.9999


# ─── Parity with the llama-server backend ───────────────────────────────────

PARITY_CHATS = [
    CAPITAL,
    [{"role": "user", "content": "Name three colours."}],
    LONG_ANSWER,
    [{"role": "user", "content": "Translate 'good morning' into French and into Spanish."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "What is 12 times 12? Answer with a number."}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    CAPITAL + [{"role": "assistant", "content": "The capital of France is Paris."},
               {"role": "user", "content": "And the capital of Italy?"}],
    [{"role": "user", "content": "Écris une phrase sur le café, avec un emoji. ☕"}],
    [{"role": "user", "content": "Give me a JSON object with the keys name and age for a cat called Tom."}],
    [{"role": "user", "content": "Summarise this text: " + "The baker rose before dawn and lit the oven. " * 12}],
    [{"role": "user", "content": "List the days of the week, one per line."}],
]
PARITY_COMPLETIONS = ["The capital of France is", "def fibonacci(n):\n", COUNTING]


def parity_difference(prompt_index, label, server, lib) -> list:
    """What differs between the two backends' answers to one prompt (empty: nothing)."""
    problems = []
    if server["prompt_tokens"] != lib["prompt_tokens"]:
        problems.append(f"prompt_tokens {server['prompt_tokens']} (llama-server) vs {lib['prompt_tokens']} (libllama)")
    if server["text"] != lib["text"]:
        problems.append(describe_difference(server["text"], lib["text"]) +
                        f" (llama-server {server['text']!r}, libllama {lib['text']!r})")
    if server["finish"] != lib["finish"]:
        problems.append(f"finish {server['finish']} vs {lib['finish']}")
    if server["completion_tokens"] != lib["completion_tokens"]:
        problems.append(f"completion_tokens {server['completion_tokens']} vs {lib['completion_tokens']}")
    return [f"{label} {prompt_index}: {problem}" for problem in problems]


@needs_llama
def test_parity_with_llama_server_on_greedy_answers(host, client, via_server):
    """The same prompt through both backends, one at a time: the same template rendering and
    tokens (prompt_tokens), the same sampler, so the same text, token for token."""
    problems, compared = [], 0
    for i, messages in enumerate(PARITY_CHATS):
        answers = {}
        for model in (via_server, LIB):
            reply = chat(client, model, messages, max_tokens=64)
            answers[model] = {"prompt_tokens": reply.usage.prompt_tokens, "text": reply.choices[0].message.content,
                              "finish": reply.choices[0].finish_reason,
                              "completion_tokens": reply.usage.completion_tokens}
        assert answers[LIB]["text"], f"chat {i}: libllama said nothing"
        problems += parity_difference(i, "chat", answers[via_server], answers[LIB])
        compared += 1
    for i, prompt in enumerate(PARITY_COMPLETIONS):
        answers = {}
        for model in (via_server, LIB):
            reply = client.completions.create(model=model, prompt=prompt, max_tokens=48, **GREEDY)
            answers[model] = {"prompt_tokens": reply.usage.prompt_tokens, "text": reply.choices[0].text,
                              "finish": reply.choices[0].finish_reason,
                              "completion_tokens": reply.usage.completion_tokens}
        problems += parity_difference(i, "completion", answers[via_server], answers[LIB])
        compared += 1
    # A stop string: cut at the same place, reported the same way.
    answers = {}
    for model in (via_server, LIB):
        reply = chat(client, model, CAPITAL, stop=[STOP])
        answers[model] = {"prompt_tokens": reply.usage.prompt_tokens, "text": reply.choices[0].message.content,
                          "finish": reply.choices[0].finish_reason, "completion_tokens": reply.usage.completion_tokens}
    problems += parity_difference(0, "stop", answers[via_server], answers[LIB])
    assert compared >= 10
    assert not problems, f"{len(problems)} difference(s) between the backends:\n" + "\n".join(problems)


# (Not embedding_dimensions: llama-server reports it only for a model loaded with "embedding": true,
# libllama for every model, since every model it loads embeds.)
DETAILS = ("context_length", "training_context_length", "parameter_count", "size_bytes", "architecture",
           "parallel_slots", "supports_tools", "supports_reasoning")


@needs_llama
def test_parity_of_model_details(host, via_server):
    models = {m["id"]: m for m in host.get("/v1/models")[1]["data"]}
    assert {key: models[LIB][key] for key in DETAILS} == {key: models[via_server][key] for key in DETAILS}


@needs_llama
def test_parity_of_token_counts(claude, via_server):
    for messages in ([{"role": "user", "content": "one two three"}], PARITY_CHATS[7], PARITY_CHATS[10]):
        system = [m["content"] for m in messages if m["role"] == "system"]
        rest = [m for m in messages if m["role"] != "system"]
        counts = [claude.messages.count_tokens(model=model, messages=rest, **({"system": system[0]} if system else {}))
                  .input_tokens for model in (via_server, LIB)]
        assert counts[0] == counts[1], f"{messages}: llama-server counts {counts[0]}, libllama {counts[1]}"


@needs_llama
def test_parity_of_embeddings(host, client):
    """llama-server in embedding mode (mean pooling, unit length) and libllama's embeddings
    from the chat model point the same way."""
    load(host, "embed-server", "llama-server", embedding=True)
    try:
        theirs = [d.embedding for d in client.embeddings.create(model="embed-server", input=SENTENCES).data]
    finally:
        unload(host, "embed-server")
    ours = [d.embedding for d in client.embeddings.create(model=LIB, input=SENTENCES).data]
    similarities = [cosine(a, b) for a, b in zip(theirs, ours)]
    assert all(s > 0.99 for s in similarities), similarities


@pytest.fixture(scope="module")
def tool_models(host):
    """SmolLM2 with functionary v3.2's tool-aware template on both backends (the template
    under which llama.cpp constrains the output to a call for tool_choice "required")."""
    for alias, backend in (("tools-server", "llama-server"), ("tools-lib", "libllama")):
        assert load_with_template(host, alias, backend, "meetkai-functionary-medium-v3.2.jinja")["supports_tools"]
    yield "tools-server", "tools-lib"
    for alias in ("tools-server", "tools-lib"):
        unload(host, alias)


def tool_call_of(reply):
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls
    return call.function.name, json.loads(call.function.arguments)


@needs_llama
def test_parity_of_a_tool_call(client, tool_models):
    tools_server, tools_lib = tool_models
    replies = {model: client.chat.completions.create(model=model, messages=ASK_WEATHER, tools=[WEATHER_TOOL],
                                                     tool_choice="required", max_tokens=200, **GREEDY)
               for model in tool_models}
    assert replies[tools_lib].usage.prompt_tokens == replies[tools_server].usage.prompt_tokens
    name, arguments = tool_call_of(replies[tools_lib])
    assert name == "get_weather" and "Paris" in arguments["city"]
    assert (name, arguments) == tool_call_of(replies[tools_server])
    assert replies[tools_lib].choices[0].message.tool_calls[0].id

    # Streamed: the call arrives in pieces and adds up to the same call.
    streamed_name, streamed_arguments, finish, deltas = "", "", None, 0
    for chunk in client.chat.completions.create(model=tools_lib, messages=ASK_WEATHER, tools=[WEATHER_TOOL],
                                                tool_choice="required", max_tokens=200, stream=True, **GREEDY):
        if not chunk.choices:
            continue
        for call in chunk.choices[0].delta.tool_calls or []:
            assert call.index == 0
            deltas += 1
            if call.function:
                streamed_name += call.function.name or ""
                streamed_arguments += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and deltas > 1
    assert (streamed_name, json.loads(streamed_arguments)) == (name, arguments)


@needs_llama
def test_parity_of_the_turn_after_a_tool_result(host, client):
    """SmolLM3's template renders the call and its result; both backends answer alike, with the result."""
    follow_up = ASK_WEATHER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 18, "sky": "sunny"}'},
    ]
    aliases = (("answers-server", "llama-server"), ("answers-lib", "libllama"))
    for alias, backend in aliases:
        load_with_template(host, alias, backend, "HuggingFaceTB-SmolLM3-3B.jinja")
    try:
        replies = {alias: chat(client, alias, follow_up, max_tokens=60) for alias, _ in aliases}
    finally:
        for alias, _ in aliases:
            unload(host, alias)
    server, lib = replies["answers-server"], replies["answers-lib"]
    assert lib.usage.prompt_tokens == server.usage.prompt_tokens
    assert lib.choices[0].message.content == server.choices[0].message.content, \
        describe_difference(server.choices[0].message.content, lib.choices[0].message.content)
    assert "sunny" in lib.choices[0].message.content


@pytest.mark.parametrize("backend", [pytest.param("llama-server", marks=needs_llama), "libllama"])
def test_cached_idle_conversations_do_not_crowd_out_a_prompt_that_fits(host, client, backend):
    """Three conversations run at once and end, each leaving its tokens in a slot's cache
    (about 1,500 of a 2,048-token context). Then one prompt of about 1,500 tokens, alone: it
    fits the context, so it must be served, the idle slots' cached tokens giving way
    (llama-server purges idle slots when the KV cache is full)."""
    alias = f"small-{backend}"
    load(host, alias, backend, max_seq_length=2048)
    try:
        small = [start_thread(chat, client, alias, paragraphs(14), max_tokens=1) for _ in range(3)]
        for worker in small:
            assert worker.join(120).usage.prompt_tokens > 450
        reply = chat(client, alias, paragraphs(44), max_tokens=4)
        assert 1400 < reply.usage.prompt_tokens < 2048 - 4
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        unload(host, alias)


# ─── Cancels, measured by the engine ────────────────────────────────────────

# A slot has a KV cache of its own (kv_unified defaults to false), so what a neighbour holds or
# computes cannot change a greedy answer's rounding: it is exact, token for token.


def test_cancel_mid_decode_leaves_the_neighbour_untouched(host, client):
    """Two streams decoding together; one is cancelled. The engine stops it within the decode
    step then computing, and the other finishes with its greedy answer alone, token for token."""
    alone, _, _ = stream_text(client, model=LIB, messages=NEIGHBOUR, max_tokens=150, **GREEDY)
    neighbour, beside = start_stream(client, LIB, "decode-neighbour", NEIGHBOUR, max_tokens=150)
    wait_for(lambda: beside["chunks"] >= 3, 60, "the neighbour's first tokens")
    stream, progress = start_stream(client, LIB, "decode-stop", LONG_ANSWER)
    wait_for(lambda: progress["chunks"] >= 10, 60, "ten streamed tokens")
    assert beside["finish"] is None, "the neighbour finished before the cancel; give it a longer answer"

    line = cancel_and_read_the_engine(host, "decode-stop")
    result = stream.join(10)
    assert result["finish"] == "stop"
    assert line["phase"] == "during decoding", line.group(0)
    assert int(line["generated"]) >= result["chunks"] >= 10
    stopped_ms = float(line["ms"])
    print(f"decode cancel: the engine stopped {stopped_ms:.2f} ms after the cancel call "
          f"({line['generated']} tokens generated)")
    # At most the decode step that was computing when the cancel came (a few ms for SmolLM2).
    assert stopped_ms <= 250, line.group(0)

    assert neighbour.join(120)["finish"] in ("stop", "length")
    assert beside["text"] == alone, "a cancel beside it changed a greedy answer: " + describe_difference(alone, beside["text"])
    assert host.wait_idle() == 0


PREFILL_CANCELS = 5


def cancel_a_long_prompt(host, client, cancel_id: str, chunks: int):
    """Streams a ~3,000-token prompt and cancels it once `chunks` prompt chunks (128 tokens
    each) are processed, while the next one computes. Returns the engine's log line."""
    stream, progress = start_stream(client, LIB, cancel_id, paragraphs(90), max_tokens=50)
    wait_for(lambda: progress["total"] > 0 and progress["processed"] >= 128 * chunks, 60,
             lambda: f"{chunks} prompt chunk(s) to be processed (progress {progress})")
    line = cancel_and_read_the_engine(host, cancel_id)
    result = stream.join(30)
    assert result["chunks"] == 0 and result["finish"] == "stop", result
    assert line["phase"] in ("during prompt processing", "before its next prompt chunk"), line.group(0)
    done, total = int(line["done"]), int(line["total"])
    assert total == progress["total"] > 2500 and done < total, (line.group(0), progress)
    return line


def test_cancel_during_prefill_stops_the_engine_within_50_ms(host, client):
    """A ~3,000-token prompt, cancelled after its first, second, ... prompt chunk. The engine
    aborts the chunk computing at that moment (llama.cpp's abort callback, asked between graph
    nodes), so it stops within milliseconds, not at the end of the chunk."""
    lines = [cancel_a_long_prompt(host, client, f"prefill-{attempt}", attempt + 1) for attempt in range(PREFILL_CANCELS)]
    latencies = [float(line["ms"]) for line in lines]
    print("prefill cancels:\n" + "\n".join(line.group(0) for line in lines))
    # p95 of five samples (nearest rank) is the largest.
    assert max(latencies) <= 50, f"the engine went on after a prefill cancel: {latencies} ms\n" + \
        "\n".join(line.group(0) for line in lines)
    assert host.wait_idle() == 0


def test_a_prefill_cancel_beside_a_stream_leaves_its_answer_as_it_was_alone(host, client):
    """A stream decodes while a ~3,000-token prompt starts beside it and is cancelled within its
    first chunks: the stream finishes with its greedy answer alone, token for token."""
    alone, _, _ = stream_text(client, model=LIB, messages=NEIGHBOUR, max_tokens=60, **GREEDY)
    neighbour, beside = start_stream(client, LIB, "prefill-neighbour", NEIGHBOUR, max_tokens=60)
    wait_for(lambda: beside["chunks"] >= 3, 60, "the neighbour's first tokens")
    line = cancel_a_long_prompt(host, client, "prefill-beside", 1)
    assert beside["finish"] is None, "the neighbour finished before the cancel; give it a longer answer"
    print(f"prefill cancel beside a stream: {line.group(0)}")
    assert float(line["ms"]) <= 50, line.group(0)
    assert neighbour.join(120)["finish"] in ("stop", "length")
    assert beside["text"] == alone, \
        "a prompt and its cancel beside it changed a greedy answer: " + describe_difference(alone, beside["text"])
    assert host.wait_idle() == 0


def test_cancel_while_waiting_for_a_slot(host, client):
    """A model with one slot: the second request waits in the host's line, and its cancel takes it
    out of line at once without touching the run in the slot. (Its run is then created already
    cancelled, so the client gets a cancelled run's usual answer; the engine does no work for it.)"""
    load(host, "one-slot", n_parallel=1, max_seq_length=2048)
    try:
        holder, holding = start_stream(client, "one-slot", "slot-holder", LONG_ANSWER, max_tokens=1500)
        wait_for(lambda: holding["chunks"] >= 3, 60, "the slot holder's first tokens")
        engine_lines = len(cancel_lines(host))
        queued, waiting = start_stream(client, "one-slot", "slot-queued", CAPITAL, max_tokens=20)
        # In line, the stream hears keep-alive comments; no engine work, so no progress.
        wait_for(lambda: host.active_generations() == 2, 10, "the second request to be registered")
        status, body = host.post("/api/inference/cancel", {"cancel_id": "slot-queued"})
        assert status == 200 and body == {"cancelled": 1}, body
        queued.join(10)
        assert waiting["chunks"] == 0 and waiting["finish"] == "stop", waiting
        new = cancel_lines(host)[engine_lines:]
        assert len(new) == 1 and new[0]["generated"] == "0" and new[0]["done"] is None, [m.group(0) for m in new]
        assert holding["finish"] is None, "the cancel of the queued run ended the one in the slot"

        line = cancel_and_read_the_engine(host, "slot-holder")
        assert line["phase"] == "during decoding", line.group(0)
        assert holder.join(10)["finish"] == "stop"
    finally:
        unload(host, "one-slot")
    assert host.wait_idle() == 0


# ─── Concurrency ────────────────────────────────────────────────────────────

# Eight prompts SmolLM2 answers at length, so that all eight decode together for a while.
EIGHT = [[{"role": "user", "content": prompt}] for prompt in (
    "Write a story about a dragon who learns to bake bread.",
    "Describe a busy market in a small town in detail.",
    "Explain how a bicycle works.",
    "Write a poem about autumn leaves.",
    "Give me ten tips for sleeping well.",
    "Describe the water cycle.",
    "Write a letter to a friend about a trip to the mountains.",
    "Explain why exercise is good for health.",
)]


def most_at_once(results) -> int:
    """The most streams that were generating at the same moment."""
    events = sorted([(r["first_token_at"], 1) for r in results] + [(r["finished_at"], -1) for r in results])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def test_eight_concurrent_streams_each_equal_their_answer_alone(host, client):
    load(host, "eight", n_parallel=8, max_seq_length=4096)
    try:
        alone = [stream_text(client, model="eight", messages=m, max_tokens=40, **GREEDY) for m in EIGHT]
        streams = [start_stream(client, "eight", f"eight-{i}", m, max_tokens=40) for i, m in enumerate(EIGHT)]
        results = [worker.join(180) for worker, _ in streams]
        # They really ran together, more of them than the default four slots would take.
        assert most_at_once(results) >= 6, [(r["first_token_at"], r["finished_at"]) for r in results]
        problems = []
        for i, ((text, finish, _), result) in enumerate(zip(alone, results)):
            if result["text"] != text or result["finish"] != finish:
                again = stream_text(client, model="eight", messages=EIGHT[i], max_tokens=40, **GREEDY)[0]
                problems.append(f"stream {i}: {describe_difference(text, result['text'])} "
                                f"(alone {text!r}, concurrent {result['text']!r}, finish {finish} vs "
                                f"{result['finish']}; alone again: {'same' if again == text else repr(again)})")
        assert not problems, "\n".join(problems)
    finally:
        unload(host, "eight")


def open_stream(server: Server, path: str, body: dict, receive_buffer: int | None = None) -> socket.socket:
    """Sends a streaming request on a raw socket and returns it, unread."""
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", server.port))
    data = json.dumps(body).encode()
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                 % (path.encode(), len(data)) + data)
    return sock


FAST = [[{"role": "user", "content": "Name three colours."}],
        [{"role": "user", "content": "Write a haiku about the sea."}],
        [{"role": "user", "content": "List the days of the week."}]]


def unread_bytes(sock: socket.socket) -> int:
    """What the kernel holds for this socket that the client has not read (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def sse_frames(response: bytes) -> list:
    """The JSON data frames of a raw HTTP/1.1 chunked SSE response."""
    head, _, rest = response.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0], head
    body = b""
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        body, rest = body + rest[:size], rest[size + 2:]
    return [json.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: {")]


def recv_frames(sock: socket.socket, count: int, timeout: float, received: bytes) -> bytes:
    """Reads on until `count` SSE data frames have arrived in all; returns everything read."""
    deadline = time.monotonic() + timeout
    while received.count(b"data: {") < count:
        left = deadline - time.monotonic()
        assert left > 0, f"{count} frames did not arrive within {timeout} s; got {received.count(b'data: {')}"
        sock.settimeout(left)
        chunk = sock.recv(1 << 16)
        assert chunk, f"the stream closed after {received.count(b'data: {')} frames"
        received += chunk
    return received


def settled_unread_bytes(sock: socket.socket) -> int:
    """The unread bytes once they stop growing over a 0.2 s window (the receive buffer is full); 0 until then."""
    first = unread_bytes(sock)
    time.sleep(0.2)
    return first if first and unread_bytes(sock) == first else 0


def test_a_client_that_stops_reading_does_not_slow_the_others(host, client):
    """Four streams on one engine; one client reads its first bytes and then nothing. The
    other three finish in about the time they take alone: the engine thread never waits
    for a client (the sink never blocks; a run whose client is far behind sits out).

    (Whether the stuck run pauses depends on the kernel: where the loopback send buffer grows
    to tcp_wmem's 4 MiB it takes in the whole 3,000-token answer of ~190-byte SSE frames and
    the run decodes on; where it stays small the run sits out after a hundred tokens or so.
    Either way the others are not slowed and the stuck client, reading again, gets the rest.
    test_abi11 drives the pause itself with the reference engine's 8 kB tokens.)"""
    def three_fast() -> float:
        started = time.monotonic()
        workers = [start_thread(stream_text, client, model=LIB, messages=m, max_tokens=48, **GREEDY) for m in FAST]
        for worker in workers:
            text, finish, _ = worker.join(120)
            assert text and finish in ("stop", "length")
        return time.monotonic() - started

    alone = three_fast()
    slow = open_stream(host, "/v1/completions", {"model": LIB, "prompt": COUNTING, "max_tokens": 3000, "stream": True,
                                                 "temperature": 0, "cancel_id": "slow-reader"}, receive_buffer=4096)
    try:
        first = recv_until(slow, b"data: {", 30)
        # The client's receive buffer is full: from here on the server's writes to it wait.
        wait_for(lambda: settled_unread_bytes(slow), 30,
                 lambda: f"the slow client's receive buffer to fill ({unread_bytes(slow)} bytes)")
        beside = three_fast()
        print(f"three streams: {alone:.2f} s alone, {beside:.2f} s beside a client that stopped reading")
        assert beside < 3 * alone, f"one slow client slowed the others: {alone:.2f} s alone, {beside:.2f} s beside it"
        assert host.active_generations() == 1, "the run of the client that stopped reading ended meanwhile"

        # Still served: once it reads again, the stream goes on (past what the buffers held
        # while it was stuck), in order, and on a cancel it gets its end.
        resumed = recv_frames(slow, 200, 60, first)
        reader = start_thread(recv_until, slow, b"data: [DONE]", 60, resumed)
        line = cancel_and_read_the_engine(host, "slow-reader")
        assert line["phase"] == "during decoding", line.group(0)
        frames = sse_frames(reader.join(60))
        text = "".join(frame["choices"][0]["text"] for frame in frames)
        assert frames[-1]["choices"][0]["finish_reason"] == "stop"
        free = client.completions.create(model=LIB, prompt=COUNTING, max_tokens=30, temperature=0).choices[0].text
        assert text.startswith(free), (text[:200], free)
        assert len(frames) > 200, len(frames)
    finally:
        slow.close()
    assert host.wait_idle() == 0


# ─── Loading, unloading, memory ─────────────────────────────────────────────

@pytest.fixture(scope="module")
def empty_host():
    """A host with every plugin and no model, for the tests that load and unload themselves."""
    server = start_server()
    try:
        yield server
    finally:
        stop_and_clean_up(server)


def test_llama_server_stays_the_default_for_gguf_unless_preferred(empty_host):
    status, body = empty_host.post("/api/inference/validate", {"model_path": SMOLLM2})
    assert status == 200 and body["backend"] == "llama-server", body
    status, body = empty_host.post("/api/inference/validate", {"model_path": SMOLLM2, "backend": "libllama"})
    assert status == 200 and body["backend"] == "libllama", body

    preferring = start_server(extra_args=["--prefer-backend", "libllama"])
    try:
        status, body = preferring.post("/api/inference/validate", {"model_path": SMOLLM2})
        assert status == 200 and body["backend"] == "libllama", body
        status, body = preferring.post("/api/inference/load", {"model_path": SMOLLM2})
        assert status == 200 and body["backend"] == "libllama", body
        assert llama_children(preferring.process.pid) == []
        reply = preferring.openai(timeout=120).chat.completions.create(model="default", messages=CAPITAL, max_tokens=20,
                                                                      **GREEDY)
        assert "Paris" in reply.choices[0].message.content
        # At exit the model is released (the plugin says so) before the host exits 0.
        preferring.stop()
        assert f"unloaded {SMOLLM2}" in preferring.log_text()
    finally:
        stop_and_clean_up(preferring)


def test_load_errors_are_clear(empty_host):
    def refused(fields: dict, status: int, *words: str):
        got, body = empty_host.post("/api/inference/load", {"model_path": SMOLLM2, "backend": "libllama", **fields})
        assert got == status, (fields, got, body)
        for word in words:
            assert word in body["error"]["message"], (fields, body)

    refused({"n_parallel": 0}, 400, "n_parallel")
    refused({"n_parallel": "four"}, 400, "n_parallel")
    refused({"n_batch": 64, "n_ubatch": 128}, 400, "n_ubatch")
    refused({"n_threads": -1}, 400, "n_threads")
    refused({"cache_type_kv": "q3_k"}, 400, "cache_type_kv")
    refused({"pooling": "max"}, 400, "pooling")
    refused({"llama_extra_args": ["--flash-attn", "on"]}, 400, "llama_extra_args")
    refused({"llama_server_path": "/usr/bin/true"}, 400, "llama_server_path")
    refused({"mmproj_path": SMOLLM2}, 400, "text only")
    refused({"model_path": "/nonexistent/model.gguf"}, 404, "/nonexistent/model.gguf")
    # Not a GGUF at all, forced onto this backend: llama.cpp refuses it, the host lives on.
    junk = empty_host.workdir / "junk.gguf"
    junk.write_bytes(b"GGUF" + os.urandom(4096))
    refused({"model_path": str(junk)}, 500, "could not load")
    assert empty_host.get("/v1/models")[1]["data"] == []
    assert empty_host.get("/health")[0] == 200


def test_load_progress_reaches_the_host(empty_host):
    """The plugin's own progress (the load phase, in the file's bytes) shows on the host's
    load-progress route, then ready at 1.0."""
    (status, body), samples = watch_load(empty_host, {"model_path": SMOLLM2, "backend": "libllama", "alias": "progress"})
    assert status == 200 and body["status"] == "loaded" and body["backend"] == "libllama", body
    try:
        loading = [s for s in samples if s["phase"] == "load"]
        assert loading, f"no progress from the plugin reached the host: {samples}"
        assert all(s["model"] == "progress" and s["bytes_total"] == os.path.getsize(SMOLLM2) for s in loading), loading
        assert [s["bytes_loaded"] for s in loading] == sorted(s["bytes_loaded"] for s in loading), loading
        final = empty_host.get("/api/inference/load-progress")[1]
        assert final["phase"] == "ready" and final["fraction"] == 1.0, final
    finally:
        unload(empty_host, "progress")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def load_use_unload(server: Server, alias: str) -> float:
    """Loads SmolLM2 in process, answers one short chat, unloads it (the plugin says so in the
    log). Returns the host's resident memory while the model was loaded, in MiB."""
    unloaded = server.log_text().count(f"unloaded {SMOLLM2}")
    load(server, alias)
    reply = server.openai(timeout=120).chat.completions.create(model=alias, messages=CAPITAL, max_tokens=2, **GREEDY)
    assert reply.choices[0].message.content
    loaded = rss_mib(server.process.pid)
    unload(server, alias)
    wait_for(lambda: server.log_text().count(f"unloaded {SMOLLM2}") > unloaded, 10, "the plugin's unload line")
    return loaded


def test_unload_gives_the_memory_back(empty_host):
    pid = empty_host.process.pid
    load_use_unload(empty_host, "warm-up")  # the host's and llama.cpp's one-time allocations
    before = rss_mib(pid)
    loaded = load_use_unload(empty_host, "measured")
    # The weights (about 100 MB, mapped) and an 8,192-token f16 KV cache (about 190 MB) were resident.
    assert loaded > before + 150, f"{before:.0f} MiB before the load, {loaded:.0f} MiB loaded"
    # Within 10% of before the load (the host caps glibc at two arenas and trims them after an
    # unload; without that, arena leftovers alone came to 11% at times).
    after = wait_for(lambda: (rss := rss_mib(pid)) <= before * 1.10 and rss, 10,
                     lambda: f"the memory back: {before:.1f} MiB before the load, {rss_mib(pid):.1f} MiB after unload")
    print(f"host RSS: {before:.1f} MiB before the load, {loaded:.1f} MiB loaded, {after:.1f} MiB after unload")


@pytest.mark.timeout(900)
def test_fifty_load_unload_cycles_leak_no_memory_and_no_threads(empty_host):
    pid = empty_host.process.pid
    load_use_unload(empty_host, "warm-up")
    threads_before = thread_count(pid)
    samples = {}
    for cycle in range(1, 51):
        load_use_unload(empty_host, f"cycle-{cycle}")
        if cycle in (5, 10, 20, 30, 40, 50):
            samples[cycle] = (rss_mib(pid), thread_count(pid))
    print("after cycle: " + ", ".join(f"{c}: {rss:.1f} MiB, {threads} threads" for c, (rss, threads) in samples.items()))
    # glibc's per-thread arenas (each load and each engine is a new thread) make the
    # resident size wander by several MiB from cycle to cycle (over 250 cycles it stays
    # within 59-74 MiB here); a leaked model, context or KV cache is 100 MiB or more a cycle.
    growth = samples[50][0] - samples[5][0]
    assert growth < 20, f"the host grew by {growth:.1f} MiB from cycle 5 to cycle 50: {samples}"
    # Every engine thread (and llama.cpp's workers) went with its model; the host's own
    # worker pools may idle a thread out, never add one per cycle.
    wait_for(lambda: thread_count(pid) <= threads_before, 10,
             lambda: f"the threads back: {threads_before} before, {thread_count(pid)} after 50 cycles")
    assert empty_host.get("/v1/models")[1]["data"] == []
