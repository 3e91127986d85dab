"""The llama-server backend on ABI 1.1, end to end: the real llama-server, the real
SmolLM2-135M-Instruct, the real `patchbay` binary. Stop sequences reported as such, prompt
progress and keep-alive during a long prefill, a client that leaves during that prefill
stopping the engine (verified at llama-server itself), the model facts the plugin reads,
and probe: a file that merely carries the .gguf name is refused."""
import http.client
import json
import socket
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import test_llama_server
from test_llama_server import CAPITAL, GREEDY, LONG_ANSWER, load_smollm2, start_server, stop_and_clean_up, the_child
from test_llama_server import llama  # noqa: F401 - the shared SmolLM2 host fixture

pytestmark = test_llama_server.pytestmark

# SmolLM2 answers CAPITAL greedily with "The capital of France is Paris." (checked first, below),
# so "Paris" is a stop string it surely produces, and "Lyon" one it never does.
STOP = "Paris"
NEVER = "Lyon"
# Greedy sampling for the anthropic SDK, which (in this version) takes no `temperature` argument.
GREEDY_BODY = {"temperature": 0}

# A paragraph repeated into a prompt of about 3,000 tokens: some ten seconds of prompt
# processing for SmolLM2 on two CPU cores at the plugin's prompt batch of 128 tokens
# (4,000 tokens took 17 s there), so that there is a prefill to watch and to leave.
PARAGRAPH = ("The baker rose before dawn, lit the oven, weighed the flour and the salt, and folded the dough "
             "by hand while the street outside was still dark and quiet. ")
LONG_PROMPT_REPEATS = 90  # 33 tokens each


@pytest.fixture
def claude(llama):  # noqa: F811 - pytest's fixture injection
    return llama.anthropic(timeout=120)


@pytest.fixture
def client(llama):  # noqa: F811
    return llama.openai(timeout=120)


def long_prompt() -> list:
    """A long user turn that starts with words of its own, so that no earlier prompt in
    llama-server's cache shares more than the template's opening with it."""
    return [{"role": "user", "content": f"Request {uuid.uuid4().hex}. Summarise this text: " +
             PARAGRAPH * LONG_PROMPT_REPEATS}]


# ─── Stop sequences ─────────────────────────────────────────────────────────

def test_the_stop_string_is_what_smollm2_says(client):
    """The premise of the stop-sequence tests: without a stop, the greedy answer has it."""
    reply = client.chat.completions.create(model="default", messages=CAPITAL, max_tokens=48, **GREEDY)
    assert STOP in reply.choices[0].message.content, reply.choices[0].message.content


def test_anthropic_stop_sequence_non_streaming(claude):
    message = claude.messages.create(model="default", max_tokens=48, system=CAPITAL[0]["content"],
                                     messages=[CAPITAL[1]], stop_sequences=[NEVER, STOP], extra_body=GREEDY_BODY)
    assert message.stop_reason == "stop_sequence"
    assert message.stop_sequence == STOP
    text = message.content[0].text
    assert text and STOP not in text  # llama-server cuts the matched string out
    assert "capital" in text.lower()


def test_anthropic_stop_sequence_streaming(claude):
    deltas = []
    with claude.messages.stream(model="default", max_tokens=48, system=CAPITAL[0]["content"],
                                messages=[CAPITAL[1]], stop_sequences=[STOP], extra_body=GREEDY_BODY) as stream:
        for event in stream:
            if event.type == "message_delta":
                deltas.append(event.delta)
        final = stream.get_final_message()
    [delta] = deltas
    assert delta.stop_reason == "stop_sequence"
    assert delta.stop_sequence == STOP
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == STOP
    assert STOP not in final.content[0].text


def test_a_natural_end_is_end_turn_even_with_stop_sequences(claude):
    message = claude.messages.create(model="default", max_tokens=200, system=CAPITAL[0]["content"],
                                     messages=[CAPITAL[1]], stop_sequences=[NEVER], extra_body=GREEDY_BODY)
    assert message.stop_reason == "end_turn"
    assert message.stop_sequence is None
    assert STOP in message.content[0].text


def test_openai_finish_reason_stays_stop_for_a_stop_sequence(client):
    whole = client.chat.completions.create(model="default", messages=CAPITAL, max_tokens=48, **GREEDY)
    text = whole.choices[0].message.content
    cut = client.chat.completions.create(model="default", messages=CAPITAL, max_tokens=48, stop=[STOP], **GREEDY)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[:text.index(STOP)]
    finish = None
    for chunk in client.chat.completions.create(model="default", messages=CAPITAL, max_tokens=48, stop=[STOP],
                                                stream=True, **GREEDY):
        if chunk.choices:
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"


# ─── A long prefill: keep-alive, progress, and a client that leaves ─────────

class RawStream:
    """A streamed /v1/chat/completions read line by line off the wire (http.client undoes
    the chunked transfer encoding, nothing else), so that SSE comments are seen too."""

    def __init__(self, server, body: dict):
        self.connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        self.connection.request("POST", "/v1/chat/completions", body=json.dumps(body),
                                headers={"Content-Type": "application/json"})
        self.started = time.perf_counter()
        self.response = self.connection.getresponse()
        assert self.response.status == 200, self.response.read()

    def lines(self, timeout: float = 200):
        """(seconds since the request, line) for every non-empty line, until the stream ends;
        fails if it has not ended after `timeout` s."""
        while True:
            assert time.perf_counter() - self.started < timeout, f"the stream still runs after {timeout} s"
            raw = self.response.readline()
            if not raw:
                return
            line = raw.decode().rstrip("\r\n")
            if line:
                yield time.perf_counter() - self.started, line

    def drop(self):
        """Leaves as a client that goes away does: the socket closes, nothing more is read."""
        sock = self.connection.sock
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
        self.response.close()
        self.connection.close()


def stream_body(**extra) -> dict:
    return {"model": "default", "messages": long_prompt(), "max_tokens": 8, "stream": True, **GREEDY, **extra}


def content_of(line: str):
    """The text a data: line carries, or None."""
    if not line.startswith("data:") or line == "data: [DONE]":
        return None
    chunk = json.loads(line[5:])
    for choice in chunk.get("choices") or []:
        if (choice.get("delta") or {}).get("content"):
            return choice["delta"]["content"]
    return None


def test_long_prefill_sends_keep_alive_before_the_first_token(llama):  # noqa: F811
    stream = RawStream(llama, stream_body())
    keep_alives, first_token_at = [], None
    for at, line in stream.lines():
        if line == ": keep-alive":
            assert first_token_at is None, "a keep-alive after the answer began"
            keep_alives.append(at)
        elif content_of(line) is not None and first_token_at is None:
            first_token_at = at
        assert not line.startswith("data:") or "prompt_progress" not in line, "progress without return_progress"
    assert first_token_at is not None, "no answer came"
    assert first_token_at > 3, f"the prompt took only {first_token_at:.1f} s; make it longer"
    assert keep_alives, "no keep-alive during the prefill"
    # The host writes one when the client has heard nothing for a second (checked every
    # second), so they come one to two seconds apart; more slack for a loaded machine.
    gaps = [b - a for a, b in zip([0.0] + keep_alives, keep_alives + [first_token_at])]
    assert max(gaps) < 3.5, gaps


def test_return_progress_streams_prompt_progress_up_to_the_total(llama):  # noqa: F811
    stream = RawStream(llama, stream_body(return_progress=True))
    progress, answer_started, progress_after_answer = [], False, []
    for _, line in stream.lines():
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[5:])
        if "prompt_progress" in chunk:
            assert chunk["object"] == "chat.completion.chunk"
            assert chunk["choices"] == []
            assert set(chunk["prompt_progress"]) == {"total", "cache", "processed", "time_ms"}
            (progress_after_answer if answer_started else progress).append(chunk["prompt_progress"])
        elif content_of(line) is not None:
            answer_started = True
    assert answer_started
    # A heartbeat before llama-server has counted the prompt may say total 0 (not known yet).
    known = [p for p in progress if p["total"] > 0]
    assert len(known) >= 3, progress
    total = known[0]["total"]
    assert total > 2000, f"the prompt is only {total} tokens"
    assert all(p["total"] == total for p in known)
    processed = [p["processed"] for p in known]
    assert processed == sorted(processed), processed
    assert all(0 <= p["cache"] <= p["processed"] <= total for p in known), known
    assert processed[-1] == total, processed
    assert processed[0] < total / 2, processed
    assert not progress_after_answer


def test_a_client_that_leaves_during_prefill_stops_llama_server(llama):  # noqa: F811
    child = the_child(llama)
    prompt_before = child.prompt_tokens_total()
    predicted_before = child.tokens_predicted_total()
    stream = RawStream(llama, stream_body(max_tokens=50))
    for _, line in stream.lines():
        assert content_of(line) is None, "the answer began before the first keep-alive; make the prompt longer"
        if line == ": keep-alive":
            break
    assert child.busy(), "llama-server is not processing the prompt"
    left = time.perf_counter()
    stream.drop()
    # The host notices at its next keep-alive write (every second), cancels, the plugin closes
    # its connection, and llama-server notices at its next prompt batch.
    child.wait_idle(timeout=5)
    stopped_after = time.perf_counter() - left
    time.sleep(0.5)
    assert not child.busy()
    assert child.tokens_predicted_total() == predicted_before, "llama-server decoded after the client left"
    # The prompt is about 3,000 tokens: a stopped prefill counts none or a part of it (about
    # 1,300 here: a second or two for the host to notice the client, then a prompt batch).
    counted = child.prompt_tokens_total() - prompt_before
    assert counted < 2000, f"llama-server processed {counted} prompt tokens for a client that left"
    assert stopped_after < 5.0, f"llama-server went on for {stopped_after:.1f} s"
    assert llama.wait_idle() == 0


# ─── Model facts ────────────────────────────────────────────────────────────

DETAILS = ("parallel_slots", "embedding_dimensions", "training_context_length", "parameter_count", "size_bytes",
           "architecture")


def check_smollm2_details(model: dict):
    assert set(DETAILS) <= set(model), model
    assert model["parallel_slots"] == 4  # the plugin's default n_parallel, as llama-server reports it
    assert model["training_context_length"] == 8192  # SmolLM2's n_ctx_train
    assert 100_000_000 < model["parameter_count"] < 200_000_000  # 135M
    size = Path(test_llama_server.SMOLLM2).stat().st_size
    assert 0.5 * size < model["size_bytes"] <= size  # the tensors' bytes, within the file
    assert model["architecture"] == "llama"  # general.architecture from the GGUF header


def test_model_facts_on_v1_models_and_status(llama):  # noqa: F811
    status, models = llama.get("/v1/models")
    assert status == 200
    [model] = [m for m in models["data"] if m["id"] == "SmolLM2-135M-Instruct.Q4_1"]
    check_smollm2_details(model)
    status, body = llama.get("/api/inference/status")
    assert status == 200
    [loaded] = [m for m in body["models"] if m.get("model_path") == test_llama_server.SMOLLM2
                or m.get("id") == "SmolLM2-135M-Instruct.Q4_1"]
    check_smollm2_details(loaded)
    for key in DETAILS:
        assert loaded[key] == model[key]


# ─── Probe ──────────────────────────────────────────────────────────────────

def test_a_file_that_is_not_gguf_is_refused_by_probe(llama):  # noqa: F811
    with tempfile.TemporaryDirectory() as directory:
        impostor = Path(directory) / "not-really.gguf"
        impostor.write_bytes(b"PK\x03\x04 this is a zip archive, not a GGUF model" + bytes(4096))
        status, body = llama.post("/api/inference/load", {"model_path": str(impostor)})
    assert status == 400, body
    assert body["error"]["code"] == "no_backend_for_format"
    message = body["error"]["message"]
    assert "no backend" in message.lower()
    assert "llama-server: not a GGUF file" in message  # the plugin's probe, in the host's answer
    # Nothing was started for it.
    assert len(test_llama_server.llama_children(llama.process.pid)) == 1


# ─── The wall-clock budget ──────────────────────────────────────────────────

def test_the_wall_clock_budget_ends_a_generation_as_a_time_limit():
    """max_wall_ms (the host's --max-generation-seconds) reached: the plugin ends the run with
    PB_FINISH_TIME_LIMIT, which OpenAI reads as "length" and Anthropic as "max_tokens", not
    as the cancel of the host's backstop a second later ("stop")."""
    server = start_server(extra_args=["--max-generation-seconds", "2"])
    try:
        load_smollm2(server)
        client = server.openai()
        started = time.perf_counter()
        reply = client.chat.completions.create(model="default", messages=LONG_ANSWER, max_tokens=4000, **GREEDY)
        took = time.perf_counter() - started
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens < 4000
        assert 1.5 < took < 4.0, took
        claude = server.anthropic()
        message = claude.messages.create(model="default", max_tokens=4000, messages=LONG_ANSWER, extra_body=GREEDY_BODY)
        assert message.stop_reason == "max_tokens"
        assert message.usage.output_tokens < 4000
        the_child(server).wait_idle(timeout=10)  # the plugin's close reached llama-server
    finally:
        stop_and_clean_up(server)
