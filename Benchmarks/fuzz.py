#!/usr/bin/env python3
"""HTTP fuzz run against the real `patchbay` binary and the reference plugin.

Starts its own server on 127.0.0.1 (a private copy of the binary and plugin from
$PATCHBAY_BUILD_DIR, else .build/<--configuration>, else `swift build --show-bin-path`),
loads reference models, warms up, then sends --requests requests (default 100,000; at most
--max-seconds) from --workers processes, each on its own keep-alive connection (plus fresh
connections for requests that break framing). Every route and method (and unknown ones)
gets malformed, truncated, wrongly typed and oversized bodies and headers, mixed with valid
requests that run real generations (small max_tokens, streaming and not), cancels with
random ids and clients that abort mid-response.

    ~/.cache/patchbay/venv/bin/python Benchmarks/fuzz.py                      # 100k requests
    ~/.cache/patchbay/venv/bin/python Benchmarks/fuzz.py --requests 20000 --seed 7
    ~/.cache/patchbay/venv/bin/python Benchmarks/fuzz.py --replay main:3:1234  # one request again

Every request is a pure function of (--seed, phase, worker, index), printed as
`[phase:worker:index]` beside each example, so `--replay phase:worker:index` re-sends exactly
that request to a fresh server and prints the request bytes and the response.

It fails (exit status 1) when:
  - any response has a 5xx status (there are no exceptions);
  - the server crashed, or /health, a chat completion or a streamed one fails at the end;
  - a route refuses its canonical valid request at the end (e.g. GET /v1/models/<loaded id>);
  - a well-framed request got no answer within --request-timeout (a hang);
  - /api/inference/status still counts active generations --idle-timeout seconds after the load;
  - after the settle, the server still holds TCP connections (all clients have closed theirs);
  - the resident memory after the run and a settle is above baseline + max(25 %, 16 MiB),
    baseline being VmRSS after the warm-up (--rss-tolerance-pct / --rss-tolerance-mib). The
    server runs with MALLOC_ARENA_MAX=2 MALLOC_TRIM_THRESHOLD_=131072 so that freed memory
    goes back to the system and RSS growth means memory kept (--glibc-defaults: without).
Other oddities (a 4xx whose body is not JSON, a 200 stream without its terminal event, a
connection closed without a response to a well-framed request) are counted and shown, as
warnings.
"""
import argparse
import collections
import json
import multiprocessing
import os
import random
import re
import socket
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import LOCALHOST, BodyOverLimit, Connection, NoResponse, Truncated, read_response  # noqa: E402

EXAMPLES = 20
BODY_LIMIT = 1 << 20  # a longer response (a mutated max_tokens) is cut off by closing the connection

# ─── Values a mutation puts in a field ──────────────────────────────────────


class Raw:
    """JSON text written verbatim (numbers JSON cannot hold, NaN, deep nesting)."""
    __slots__ = ("text",)

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return f"Raw({self.text[:40]!r}{'…' if len(self.text) > 40 else ''})"


class Pairs:
    """A JSON object as a list of (key, value), so keys can repeat."""
    __slots__ = ("items",)

    def __init__(self, items):
        self.items = list(items)

    def __repr__(self):
        return f"Pairs({self.items!r:.60})"


def _special(value):
    raise TypeError("Raw or Pairs")


_HUGE = {}


def huge(n: int, ch="a") -> str:
    key = (n, ch)
    if key not in _HUGE:
        _HUGE[key] = ch * n
    return _HUGE[key]


WEIRD_STRINGS = [
    "", " ", "0", "-1", "true", "null", "NaN", "Infinity", "-inf", "1e400", "\u0000", "a\u0000b", "\ud800",
    "\udfff", "😀" * 8, "\u202eevil", "ｆｕｌｌ", "../../etc/passwd", "/etc/passwd", "/dev/zero", "/", ".", "%00",
    "%s%n%x", "' OR 1=1 --", "<script>", "\r\nX-Injected: 1", "\\", "\"", "{}", "[]", "chatcmpl-", "msg_",
    "resp_", "cmpl-", "fz-1", "fs-1", "\t\n", "\x7f", "é", "e\u0301", "ǅ", "\U0010ffff",
]
HUGE_SIZES = [1000, 65536, 300_000]


def mutation_values(r: random.Random):
    """One replacement value for a field: every JSON type, extremes, and text JSON cannot hold."""
    pick = r.randrange(40)
    if pick < 12:
        return r.choice([None, True, False, 0, -1, 1, 2 ** 31, 2 ** 53 + 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64,
                         -2 ** 63 - 1, 10 ** 40, -10 ** 40])
    if pick < 16:
        return r.choice([0.5, -0.0, 1e308, -1e308, 5e-324, 1.7976931348623157e308, 3.4e38, -2.5])
    if pick < 21:
        return Raw(r.choice(["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1.0e+", "01", "0x10", "+1",
                             ".5", "1.", "-", "1e-400", "123456789012345678901234567890e10", "tru", "nul", "\"\\ud800\"",
                             "\"\\uDC00\\uD800\"", "\"\\u0000\"", "\"\\x41\"", "\"\\q\"", "'single'", "undefined"]))
    if pick < 28:
        return r.choice(WEIRD_STRINGS)
    if pick < 30:
        return huge(r.choice(HUGE_SIZES), r.choice("aé😀"))
    if pick < 35:
        return r.choice([[], [None], [1, 2, 3], ["x"], [{}], [[]], {}, {"a": 1}, {"type": "text"},
                         {"type": "function", "function": {"name": "f"}}, {"role": "user"}, [""] * 3000])
    depth = r.choice([64, 513, 600, 5000])
    return Raw(r.choice(["[" * depth + "]" * depth, "{\"a\":" * depth + "1" + "}" * depth]))


def dumps(value, ascii_only=True) -> str:
    try:  # the fast path: nothing in it needs writing by hand
        return json.dumps(value, ensure_ascii=ascii_only, separators=(",", ":"), default=_special)
    except (TypeError, ValueError):
        pass
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Pairs):
        return "{" + ",".join(json.dumps(k, ensure_ascii=ascii_only) + ":" + dumps(v, ascii_only) for k, v in value.items) + "}"
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(k, ensure_ascii=ascii_only) + ":" + dumps(v, ascii_only) for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dumps(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


def encode(value, r: random.Random) -> bytes:
    # Either \u escapes or raw UTF-8; a lone surrogate written raw is invalid UTF-8 (CESU bytes).
    ascii_only = r.random() < 0.6
    return dumps(value, ascii_only).encode("utf-8", "surrogatepass")


# ─── Valid request templates, one per route ─────────────────────────────────

TINY_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def ids(r):
    return {"cancel_id": f"fz-{r.randrange(64)}"} if r.random() < 0.35 else {}


def maybe(r, p, d):
    return d if r.random() < p else {}


def gen_model(r):
    # "scratch" comes and goes (load, unload, force_reload): runs on it race with those.
    x = r.random()
    return "slow" if x < 0.2 else ("scratch" if x < 0.25 else "fuzz")


def max_tokens(r, model):
    return r.randint(1, 24) if model == "slow" else r.randint(1, 8)


def chat_template(r, ctx, stream):
    model = gen_model(r)
    shape = r.randrange(5)
    if shape == 0:
        messages = [{"role": "user", "content": "hi"}]
    elif shape == 1:
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    elif shape == 2:
        messages = [{"role": "user", "content": "weather?"},
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    elif shape == 3:
        messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "r"},
                    {"role": "user", "content": "c", "name": "n"}]
    else:
        messages = [{"role": "user", "content": [{"type": "text", "text": "what is this"},
                                                 {"type": "image_url", "image_url": {"url": "data:image/png;base64," + TINY_PNG}}]}]
    body = {"model": model, "messages": messages, "max_tokens": max_tokens(r, model), "stream": stream}
    body.update(ids(r))
    body.update(maybe(r, 0.2, {"session_id": f"fs-{r.randrange(16)}"}))
    body.update(maybe(r, 0.3, {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 42}))
    body.update(maybe(r, 0.2, {"repetition_penalty": 1.1, "presence_penalty": 0.1, "frequency_penalty": 0.1}))
    body.update(maybe(r, 0.2, {"stop": r.choice(["x", ["from", "zz"]])}))
    body.update(maybe(r, 0.15, {"n": 1, "logprobs": False, "user": "u"}))
    if stream:
        body.update(maybe(r, 0.4, {"stream_options": {"include_usage": True}}))
        body.update(maybe(r, 0.2, {"return_progress": True}))
    body.update(maybe(r, 0.2, {"tools": [{"type": "function", "function": {
        "name": "get_weather", "description": "d", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        "tool_choice": r.choice(["auto", "none", "required", {"type": "function", "function": {"name": "get_weather"}}]),
        "parallel_tool_calls": True}))
    body.update(maybe(r, 0.15, {"response_format": {"type": "json_object"}}))
    body.update(maybe(r, 0.2, {"enable_thinking": True, "reasoning_effort": "low", "preserve_thinking": False,
                               "chat_template_kwargs": {"x": 1}}))
    body.update(maybe(r, 0.1, {"max_completion_tokens": max_tokens(r, model)}))
    return "POST", "/v1/chat/completions", body


def completion_template(r, ctx, stream):
    model = gen_model(r)
    body = {"model": model, "prompt": r.choice(["Once upon a time", ["Once"]]), "max_tokens": max_tokens(r, model),
            "stream": stream}
    body.update(ids(r))
    body.update(maybe(r, 0.3, {"echo": True}))
    body.update(maybe(r, 0.3, {"stop": ["zz"], "temperature": 0.2, "seed": 1, "top_k": 3}))
    if stream:
        body.update(maybe(r, 0.4, {"stream_options": {"include_usage": True}}))
    return "POST", "/v1/completions", body


def responses_template(r, ctx, stream):
    model = gen_model(r)
    shape = r.randrange(4)
    if shape == 0:
        inp = "hi"
    elif shape == 1:
        inp = [{"role": "user", "content": "hi"}]
    elif shape == 2:
        inp = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}]
    else:
        inp = [{"role": "user", "content": "weather?"},
               {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
               {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
               {"type": "reasoning", "summary": []}]
    body = {"model": model, "input": inp, "max_output_tokens": max_tokens(r, model), "stream": stream}
    body.update(ids(r))
    body.update(maybe(r, 0.2, {"session_id": f"fs-{r.randrange(16)}"}))
    body.update(maybe(r, 0.3, {"instructions": "be brief", "temperature": 0.5, "top_p": 0.9}))
    body.update(maybe(r, 0.2, {"reasoning": {"effort": "low"}, "text": {"format": {"type": "text"}}}))
    body.update(maybe(r, 0.2, {"tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
                               "tool_choice": r.choice(["auto", "none", "required", {"type": "function", "name": "get_weather"}]),
                               "parallel_tool_calls": False}))
    body.update(maybe(r, 0.05, {"previous_response_id": "resp_1"}))
    return "POST", "/v1/responses", body


def embeddings_template(r, ctx, stream):
    body = {"model": "fuzz", "input": r.choice(["a", ["a", "b"], ["x" * 50]])}
    body.update(maybe(r, 0.3, {"encoding_format": r.choice(["float", "base64"])}))
    body.update(maybe(r, 0.1, {"dimensions": 8}))
    return "POST", "/v1/embeddings", body


def anthropic_messages(r):
    shape = r.randrange(4)
    if shape == 0:
        return [{"role": "user", "content": "hi"}]
    if shape == 1:
        return [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    if shape == 2:
        return [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "s"},
                                                  {"type": "tool_use", "id": "tu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "tu_1", "content": "sunny"}]}]
    return [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": TINY_PNG}},
                                         {"type": "text", "text": "what"}]}]


def messages_template(r, ctx, stream):
    model = gen_model(r)
    body = {"model": model, "max_tokens": max_tokens(r, model), "messages": anthropic_messages(r), "stream": stream}
    body.update(ids(r))
    body.update(maybe(r, 0.2, {"session_id": f"fs-{r.randrange(16)}"}))
    body.update(maybe(r, 0.3, {"system": r.choice(["be brief", [{"type": "text", "text": "be brief"}]])}))
    body.update(maybe(r, 0.3, {"temperature": 0.5, "top_p": 0.9, "top_k": 5, "stop_sequences": ["zz"], "metadata": {"user_id": "u"}}))
    body.update(maybe(r, 0.2, {"thinking": {"type": "enabled", "budget_tokens": 1024}}))
    body.update(maybe(r, 0.2, {"tools": [{"name": "get_weather", "description": "d", "input_schema": {"type": "object"}}],
                               "tool_choice": r.choice([{"type": "auto"}, {"type": "any"}, {"type": "none"},
                                                        {"type": "tool", "name": "get_weather"}])}))
    return "POST", "/v1/messages", body


def count_tokens_template(r, ctx, stream):
    body = {"model": "fuzz", "messages": anthropic_messages(r)}
    body.update(maybe(r, 0.3, {"system": "be brief"}))
    body.update(maybe(r, 0.2, {"tools": [{"name": "f", "input_schema": {"type": "object"}}]}))
    return "POST", "/v1/messages/count_tokens", body


def load_template(r, ctx, stream):
    # Mostly the scratch model; sometimes a reload of the main one while it serves.
    body = {"model_path": ctx["fuzz_path"] if r.random() < 0.1 else ctx["scratch_path"]}
    body.update(maybe(r, 0.3, {"alias": "scratch"}))
    body.update(maybe(r, 0.3, {"max_seq_length": 2048, "cache_type_kv": r.choice(["f16", "q8_0"])}))
    body.update(maybe(r, 0.2, {"force_reload": r.random() < 0.5, "backend": "reference"}))
    body.update(maybe(r, 0.1, {"chat_template_override": "{{ messages }}", "gguf_variant": "Q4_0"}))
    return "POST", "/api/inference/load", body


def unload_template(r, ctx, stream):
    body = {"model_path": r.choice(["scratch", ctx["scratch_path"], "not-loaded"])}
    body.update(maybe(r, 0.5, {"force_cancel_active": r.random() < 0.5}))
    return "POST", "/api/inference/unload", body


def validate_template(r, ctx, stream):
    body = {"model_path": r.choice([ctx["scratch_path"], ctx["fuzz_path"], "/nonexistent/x.ref", ctx["workdir"],
                                    ctx["text_path"]])}
    body.update(maybe(r, 0.3, {"backend": r.choice(["reference", "nope"])}))
    return "POST", "/api/inference/validate", body


def cancel_template(r, ctx, stream):
    key = r.choice(["cancel_id", "cancel_id", "session_id", "completion_id", "response_id", "message_id"])
    value = {"cancel_id": f"fz-{r.randrange(64)}", "session_id": f"fs-{r.randrange(16)}",
             "completion_id": f"chatcmpl-{r.getrandbits(96):024x}", "response_id": f"resp_{r.getrandbits(96):024x}",
             "message_id": f"msg_{r.getrandbits(96):024x}"}[key]
    if r.random() < 0.2:
        value = f"rnd-{r.getrandbits(64):x}"
    body = {key: value}
    body.update(maybe(r, 0.1, {"session_id": f"fs-{r.randrange(16)}"}))
    return "POST", "/api/inference/cancel", body


def plugin_load_template(r, ctx, stream):
    return "POST", "/api/plugins/load", {"path": r.choice([ctx["plugin_path"], "/nonexistent/lib.so", ctx["text_path"],
                                                           "/dev/null", ctx["workdir"], "", "libc.so.6"])}


GET_ROUTES = ["/health", "/v1/models", "/v1/models/fuzz", "/v1/models/slow", "/api/inference/status",
              "/api/inference/load-progress", "/api/plugins"]

POST_TEMPLATES = [
    (chat_template, 8, True), (completion_template, 3, True), (responses_template, 4, True),
    (embeddings_template, 2, False), (messages_template, 5, True), (count_tokens_template, 2, False),
    (load_template, 1, False), (unload_template, 1, False), (validate_template, 1, False),
    (cancel_template, 3, False), (plugin_load_template, 1, False),
]
_POST_WEIGHTS = [w for _, w, _ in POST_TEMPLATES]

KNOWN_PATHS = [t(random.Random(0), {"scratch_path": "", "fuzz_path": "", "workdir": "", "text_path": "", "plugin_path": ""},
                 False)[1] for t, _, _ in POST_TEMPLATES] + GET_ROUTES
UNKNOWN_PATHS = ["/", "/v1", "/v1/", "/v1/chat", "/v1/chat/completions/", "/v1//chat/completions", "/V1/CHAT/COMPLETIONS",
                 "/v1/chat/completions/x", "/v2/chat/completions", "/api", "/api/inference", "/api/inference/",
                 "/api/inference/loads", "/api/plugins/", "/api/plugins/unload", "/v1/messages/", "/v1/messages/batches",
                 "/v1/models/", "/v1/models//", "/v1/models/a/b/c", "/v1/models/%00", "/v1/models/%ff%fe", "/v1/models/..%2f..%2f",
                 "/v1/models/" + "m" * 8000, "/%2e%2e/%2e%2e/etc/passwd", "/../../etc/passwd", "/health/", "/healthz",
                 "/metrics", "/favicon.ico", "/v1/files", "/v1/audio/transcriptions", "/v1/engines", "/.env", "/%", "/%zz",
                 "/v1/chat/completions%00", "/v1/chat/completions;x", "/v1/embeddings/../models", "//", "/" + "a/" * 3000]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "FOO", "get", "post", "PRI", "PROPFIND",
           "M" * 300]


# ─── One request ────────────────────────────────────────────────────────────

class Req:
    __slots__ = ("family", "detail", "method", "path", "pieces", "fresh", "expect", "head", "halfclose", "abort",
                 "stream", "dialect", "timeout", "responses")

    def __init__(self, family, detail, method, path, data, fresh=False, expect=True, head=False, halfclose=False,
                 abort=None, stream=False, dialect=None, timeout=None, responses=1):
        # `dialect`: one name, or one per response of a pipeline.
        self.family, self.detail, self.method, self.path = family, detail, method, path
        self.pieces = data if isinstance(data, list) else [data]
        self.fresh, self.expect, self.head, self.halfclose, self.abort = fresh, expect, head, halfclose, abort
        self.stream, self.dialect, self.timeout, self.responses = stream, dialect, timeout, responses

    @property
    def case(self) -> str:
        """The request's kind without its numbers, to group failures."""
        return re.sub(r"\d+", "N", f"{self.family}/{self.detail}")[:60]

    @property
    def data(self) -> bytes:
        return b"".join(self.pieces)

    def summary(self, limit=300) -> str:
        data = self.data
        return (f"{self.family}/{self.detail} {self.method[:20]} {self.path[:80]} ({len(data)} bytes"
                f"{', fresh connection' if self.fresh else ''}{', abort ' + self.abort if self.abort else ''}): "
                f"{data[:limit]!r}{'…' if len(data) > limit else ''}")


def std_headers(port, body_len, content_type="application/json"):
    h = [("Host", f"{LOCALHOST}:{port}")]
    if body_len is not None:
        if content_type is not None:
            h.append(("Content-Type", content_type))
        h.append(("Content-Length", str(body_len)))
    return h


def dialect_of(path):
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/v1/responses"):
        return "responses"
    return "openai"


def json_paths(value, prefix=()):
    """Every (path, container, key) in a JSON tree, for picking a field to mutate."""
    out = []
    if isinstance(value, dict):
        for k in list(value.keys()):
            out.append((prefix + (k,), value, k))
            out.extend(json_paths(value[k], prefix + (k,)))
    elif isinstance(value, list):
        for i in range(len(value)):
            out.append((prefix + (i,), value, i))
            out.extend(json_paths(value[i], prefix + (i,)))
    return out


def path_text(path):
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(path)) or "body"


def mutate_fields(r, body):
    """Mutates 1–3 fields of a template in place; returns a description."""
    notes = []
    for _ in range(r.choice([1, 1, 1, 2, 3])):
        paths = json_paths(body)
        if not paths:
            break
        path, container, key = r.choice(paths)
        op = r.randrange(10)
        if op < 7:
            value = mutation_values(r)
            container[key] = value
            notes.append(f"{path_text(path)}={value!r}"[:80])
        elif op == 7 and isinstance(container, dict):
            del container[key]
            notes.append(f"del {path_text(path)}")
        elif op == 8 and isinstance(container, dict):
            name = r.choice(["unknown", "model", "stream", "max_tokens", "messages", "__proto__", "", "\u0000", "MODEL"])
            container[name + ("" if r.random() < 0.5 else "_x")] = mutation_values(r)
            notes.append(f"add {name!r} in {path_text(path[:-1])}")
        else:
            # Duplicate a key: the same object written with a key twice.
            if isinstance(container, dict):
                pairs = Pairs(container.items())
                pairs.items.insert(r.randrange(len(pairs.items) + 1), (key, mutation_values(r)))
                replace_in_parent(body, path[:-1], pairs)
                notes.append(f"dup {path_text(path)}")
                break  # the tree below now holds a Pairs; stop walking it
            container[key] = mutation_values(r)
            notes.append(f"{path_text(path)}=…")
    return "; ".join(notes) or "none"


def replace_in_parent(root, path, new):
    if not path:
        root.clear()
        root.update({"__dup_root__": new})  # replaced below by encode_root
        return
    parent = root
    for p in path[:-1]:
        parent = parent[p]
    parent[path[-1]] = new


def encode_root(r, body):
    if isinstance(body, dict) and list(body.keys()) == ["__dup_root__"]:
        return encode(body["__dup_root__"], r)
    return encode(body, r)


INVALID_UTF8 = [b"\xff", b"\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xe2\x82", b"\xf4\x90\x80\x80",
                b"\xc3"]


def mutate_bytes(r, data: bytes, max_body: int):
    op = r.randrange(16)
    n = len(data)
    if op == 0:
        cut = r.randrange(max(n, 1))
        return data[:cut], f"truncated at {cut}/{n}"
    if op == 1:
        at = r.randrange(n + 1)
        bad = r.choice(INVALID_UTF8)
        return data[:at] + bad + data[at:], f"invalid UTF-8 {bad!r} at {at}"
    if op == 2:
        # Invalid UTF-8 inside a string value.
        at = data.find(b'"', r.randrange(max(n, 1)))
        at = at + 1 if at >= 0 else n
        bad = r.choice(INVALID_UTF8)
        return data[:at] + bad + data[at:], f"invalid UTF-8 {bad!r} in a string at {at}"
    if op == 3:
        out = bytearray(data)
        for _ in range(r.randint(1, 5)):
            if out:
                out[r.randrange(len(out))] = r.randrange(256)
        return bytes(out), "random bytes flipped"
    if op == 4:
        a = r.randrange(n + 1)
        b = min(n, a + r.randint(1, 20))
        return data[:a] + data[b:], f"deleted [{a}:{b}]"
    if op == 5:
        at = r.randrange(n + 1)
        junk = "".join(r.choice('{}[]:,"\\ \t\n0123456789aeflnrstu-+.') for _ in range(r.randint(1, 8))).encode()
        return data[:at] + junk + data[at:], f"junk {junk!r} at {at}"
    if op == 6:
        depth = r.choice([1000, 100_000, 200_000])
        return (b"[" * depth, f"{depth} x '['") if r.random() < 0.5 else (b'{"a":' * (depth // 5), f"{depth // 5} x '{{\"a\":'")
    if op == 7:
        whole = r.choice([b"", b"null", b"[]", b"{}", b"1", b"-0", b"\"s\"", b"true", b"   ", b"\n", b"\x00",
                          b"\x00" * 1000, b"{'model': 'fuzz'}", b"{model: fuzz}", b"[{}]", b"{\"\":\"\"}", b"{\"a\"}",
                          b"{\"a\":}", b"{,}", b"[,]", b"{\"a\":1,}", b"1e400", b"NaN", b"\"\\ud800\"", b"\xef\xbb\xbf{}"])
        return whole, f"whole body {whole[:20]!r}"
    if op == 8:
        return b"\xef\xbb\xbf" + data, "UTF-8 BOM"
    if op == 9:
        return data.decode("utf-8", "surrogatepass").encode(r.choice(["utf-16", "utf-16-le", "utf-32"]), "surrogatepass"), "UTF-16/32"
    if op == 10:
        tail = r.choice([b"}{", b"{}", b" x", b"\x00", b"]", b"," + data, data])
        return data + tail, f"trailing {tail[:10]!r}"
    if op == 11:
        return b"[" + b",".join([data] * r.randint(1, 50)) + b"]", "array of bodies"
    if op == 12:
        pad = b" " * r.choice([1000, 100_000, max_body // 2])
        return pad + data + pad[: r.randrange(len(pad))], f"{len(pad)} spaces padding"
    if op == 13:
        return r.randbytes(r.randint(1, 4096)), "random bytes"
    if op == 14:
        return data.replace(b'"', b"'"), "single quotes"
    return data.replace(b":", b": /* c */", 1), "comment"


CONTENT_TYPES = [None, "text/plain", "application/json; charset=utf-8", "application/json;charset=UTF-16", "APPLICATION/JSON",
                 "application/jsonx", "application/x-www-form-urlencoded", "multipart/form-data; boundary=----x", "*/*", "",
                 " application/json ", "application/json, text/html", "text/event-stream", "application/json; charset=\"\"",
                 "a" * 10000, "application/vnd.api+json", "application/json; charset=latin1", "json"]
HOSTS = ["example.com", "evil.com:80", "localhost", "127.0.0.1", "[::1]", "", "127.0.0.1:1", "a" * 5000, "127.0.0.1.nip.io",
         "ｌｏｃａｌｈｏｓｔ", "127.0.0.1:{port}, example.com"]


def header_mutation(r, port, headers: list):
    """Mutates headers of an otherwise well-framed request; returns (headers, note, risky)."""
    op = r.randrange(12)
    h = list(headers)
    if op == 0:
        ct = r.choice(CONTENT_TYPES)
        h = [x for x in h if x[0] != "Content-Type"]
        if ct is not None:
            h.append(("Content-Type", ct))
        return h, f"Content-Type={ct!r}"[:60], False
    if op == 1:
        host = r.choice(HOSTS).replace("{port}", str(port))
        h = [x for x in h if x[0] != "Host"]
        if r.random() < 0.8:
            h.append(("Host", host))
        if r.random() < 0.2:
            h.append(("Host", f"{LOCALHOST}:{port}"))
        return h, f"Host={host[:40]!r}", False
    if op == 2:
        size = r.choice([8 * 1024, 64 * 1024, 200 * 1024, 1024 * 1024])
        name = r.choice(["X-Fuzz", "Cookie", "User-Agent", "Authorization", "x-api-key", "Accept", "Referer"])
        h.append((name, huge(size, "b")))
        return h, f"{name}: {size} bytes", True
    if op == 3:
        count = r.choice([100, 1000, 5000])
        h.extend((f"X-H-{i}", "v") for i in range(count))
        return h, f"{count} extra headers", True
    if op == 4:
        value = r.choice(["Bearer " + "x" * 100, "Bearer", "Basic Zm9vOmJhcg==", "", "Bearer \u00e9", "Bearer a b c"])
        h.append((r.choice(["Authorization", "x-api-key"]), value))
        return h, f"auth {value[:20]!r}", False
    if op == 5:
        h.append(("Expect", "100-continue"))
        return h, "Expect: 100-continue", False
    if op == 6:
        pair = r.choice([("Connection", "upgrade"), ("Upgrade", "h2c"), ("Upgrade", "websocket"), ("HTTP2-Settings", "AAMAAABkAAQAAP__"),
                         ("Accept-Encoding", "gzip, br"), ("Content-Encoding", "gzip"), ("Accept", "text/event-stream"),
                         ("Connection", "keep-alive, foo"), ("Accept-Charset", "utf-16"), ("Origin", "http://evil.com"),
                         ("X-Forwarded-For", "1.2.3.4"), ("Forwarded", "for=1.2.3.4;host=evil.com"), ("Range", "bytes=0-1")])
        h.append(pair)
        return h, f"{pair[0]}: {pair[1]}", pair[0] in ("Connection", "Upgrade", "HTTP2-Settings")
    if op == 7:
        bad = r.choice([("Bad Name", "x"), ("X-Ctl", "a\x01b"), ("X-Nul", "a\x00b"), ("X-Del", "\x7f"), ("X-UTF8", "é😀"),
                        ("X-Latin", "\udce9"), ("", "empty name"), ("X-Fold", "a\r\n continued"), (":authority", "x"),
                        ("X-Colon", ":::")])
        h.insert(r.randrange(len(h) + 1), bad)
        return h, f"odd header {bad[0]!r}: {bad[1][:10]!r}", True
    if op == 8:
        h.insert(r.randrange(len(h) + 1), ("X-No-Colon-Line-Marker", None))
        return h, "a header line without a colon", True
    if op == 9:
        h = [(n.lower() if r.random() < 0.5 else n.upper(), v) for n, v in h]
        return h, "header name case", False
    if op == 10:
        h.append(("Transfer-Encoding", "identity"))
        return h, "Transfer-Encoding: identity", True
    r.shuffle(h)
    return h, "headers shuffled", False


def render_head(method, path, headers, version="HTTP/1.1") -> bytes:
    out = [f"{method} {path} {version}" if version else f"{method} {path}"]
    for name, value in headers:
        out.append(name if value is None else f"{name}: {value}")
    return ("\r\n".join(out) + "\r\n\r\n").encode("utf-8", "surrogateescape")


def template_request(r, ctx, stream=None):
    fn, _, streams = r.choices(POST_TEMPLATES, weights=ctx.get("route_weights") or _POST_WEIGHTS)[0]
    if stream is None:
        stream = streams and r.random() < 0.5
    method, path, body = fn(r, ctx, stream and streams)
    return method, path, body, stream and streams


FAMILIES = ["valid", "field", "body", "header", "framing", "line", "get", "cancel", "abort", "pipeline", "oversize", "slow-send"]
FAMILY_WEIGHTS = [22, 25, 14, 10, 4, 6, 6, 6, 3, 2, 0.4, 0.6]


def generate(seed, phase, wid, index, ctx) -> Req:
    """The request number `index` of worker `wid`: a pure function of its arguments."""
    r = random.Random(f"{seed}:{phase}:{wid}:{index}")
    port, max_body = ctx["port"], ctx["max_body"]
    family = r.choices(FAMILIES, weights=ctx.get("weights") or FAMILY_WEIGHTS)[0]

    if family in ("valid", "field", "body", "header"):
        method, path, body, stream = template_request(r, ctx)
        detail = "stream" if stream else "plain"
        if family == "field":
            detail = mutate_fields(r, body)
        data = encode_root(r, body)
        if family == "body":
            data, detail = mutate_bytes(r, data, max_body)
        headers = std_headers(port, len(data))
        risky = False
        if family == "header":
            headers, detail, risky = header_mutation(r, port, headers)
        if len(data) > max_body:
            risky = True
        return Req(family, detail, method, path, render_head(method, path, headers) + data, fresh=risky,
                   expect=not risky or family != "header", stream=stream, dialect=dialect_of(path))

    if family == "get":
        path = r.choice(GET_ROUTES)
        q = r.randrange(6)
        if q == 1:
            path += "?model=" + r.choice(["fuzz", "scratch", "", "%00", "%zz", "a" * 4000, "x&model=y", "%E2%82"])
        elif q == 2:
            path += "?" + "&".join(f"k{i}=v{i}" for i in range(r.choice([1, 50, 2000])))
        elif q == 3:
            path += r.choice(["?", "??", "?=", "?&&", "#frag", "?a=b#c", "?stream=true&max_tokens=-1"])
        body = None
        if r.random() < 0.15:
            body = r.choice([b"{}", b"[" * 1000, b"garbage", b"{\"model\":\"fuzz\"}"])
        headers = std_headers(port, len(body) if body is not None else None)
        return Req("get", f"GET {path[:40]}", "GET", path, render_head("GET", path, headers) + (body or b""))

    if family == "cancel":
        _, path, body = cancel_template(r, ctx, False)
        if r.random() < 0.3:
            body[r.choice(list(body))] = mutation_values(r)
        data = encode_root(r, body)
        if r.random() < 0.15:
            data, _ = mutate_bytes(r, data, max_body)
        return Req("cancel", str(body)[:60], "POST", path, render_head("POST", path, std_headers(port, len(data))) + data,
                   fresh=len(data) > max_body)

    if family == "line":
        op = r.randrange(8)
        method = r.choice(METHODS)
        path = r.choice(KNOWN_PATHS + UNKNOWN_PATHS)
        body = b""
        if method not in ("GET", "HEAD", "get") and r.random() < 0.6:
            body = encode(template_request(r, ctx, stream=False)[2], r)
        headers = std_headers(port, len(body))
        head = method.upper() == "HEAD"
        if op <= 3:
            # A wrong method, an unknown path, or both: well-framed, so it is owed an answer.
            return Req("line", f"{method[:10]} {path[:40]}", method, path, render_head(method, path, headers) + body,
                       fresh=head or len(method) > 20 or len(path) > 4000, head=head)
        if op == 4:
            version = r.choice(["HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "HTTP/9.9", "http/1.1", "HTTP/1.1 x", "", "HTTP/1.10",
                                "HTTP/0.9", "HTTPS/1.1"])
            return Req("line", f"version {version!r}", method, path, render_head(method, path, headers, version) + body,
                       fresh=True, expect=False, head=head)
        if op == 5:
            target = r.choice([f"http://{LOCALHOST}:{port}/health", f"http://{LOCALHOST}:{port}/v1/models", "*",
                               f"{LOCALHOST}:{port}", "health", "/v1/models?x=" + "q" * 100_000, "/a b", "/\x00",
                               "/é", "/\t", "/v1/models/\xff"])
            return Req("line", f"target {target[:40]!r}", "GET", target, render_head("GET", target, headers) + body,
                       fresh=True, expect=False)
        if op == 6:
            raw = r.choice([b"\r\n\r\n", b"GET\r\n\r\n", b"GET /\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"GET / HTTP/1.1\n\n", b"GET / HTTP/1.1\r\nHost: x\n\r\n",
                            b" GET / HTTP/1.1\r\n\r\n", b"\x00" * 64, r.randbytes(200), b"GET " + b"/" * 100_000 + b" HTTP/1.1\r\n\r\n"])
            return Req("line", f"raw {raw[:20]!r}", "RAW", "-", raw, fresh=True, expect=False, halfclose=True)
        # A request cut short inside its head.
        data = render_head(method, path, headers) + body
        cut = r.randrange(1, max(2, data.find(b"\r\n\r\n") + 2))
        return Req("line", f"head cut at {cut}", method, path, data[:cut], fresh=True, expect=False, halfclose=True)

    if family == "framing":
        method, path, body, stream = template_request(r, ctx, stream=False)
        data = encode(body, r)
        op = r.randrange(14)
        base = [("Host", f"{LOCALHOST}:{port}"), ("Content-Type", "application/json")]
        if op == 0:
            claim = len(data) + r.randint(1, 1000)
            return Req("framing", f"Content-Length {claim} > {len(data)}", method, path,
                       render_head(method, path, base + [("Content-Length", str(claim))]) + data, fresh=True, expect=False,
                       halfclose=True)
        if op == 1:
            claim = r.randrange(max(len(data), 1))
            return Req("framing", f"Content-Length {claim} < {len(data)}", method, path,
                       render_head(method, path, base + [("Content-Length", str(claim))]) + data, fresh=True, expect=True,
                       halfclose=True)
        if op == 2:
            value = r.choice(["-1", "abc", "1, 2", "+5", "0x10", " 5", "5 ", "99999999999999999999999", "1e3", "", "٣"])
            return Req("framing", f"Content-Length {value!r}", method, path,
                       render_head(method, path, base + [("Content-Length", value)]) + data, fresh=True, expect=False,
                       halfclose=True)
        if op == 3:
            return Req("framing", "two different Content-Lengths", method, path,
                       render_head(method, path, base + [("Content-Length", str(len(data))), ("Content-Length", str(len(data) + 1))]) + data,
                       fresh=True, expect=False, halfclose=True)
        if op == 4:
            return Req("framing", "Content-Length and chunked", method, path,
                       render_head(method, path, base + [("Content-Length", str(len(data))), ("Transfer-Encoding", "chunked")])
                       + chunked(r, data), fresh=True, expect=False, halfclose=True)
        if op in (5, 6, 7):
            # Well-formed chunked bodies are valid HTTP/1.1: these are owed an answer.
            return Req("framing", "chunked body", method, path,
                       render_head(method, path, base + [("Transfer-Encoding", "chunked")]) + chunked(r, data), fresh=True)
        if op == 8:
            bad = r.choice([b"zz\r\n", b"ffffffffffffffffffff\r\n", b"5\r\nabc\r\n", b"-1\r\n", b"3;" + b"x" * 5000 + b"\r\nabc\r\n",
                            b"3\r\nabcdef", b"3\nabc\n0\n\n", b"0x3\r\nabc\r\n0\r\n\r\n"])
            return Req("framing", f"bad chunk {bad[:16]!r}", method, path,
                       render_head(method, path, base + [("Transfer-Encoding", "chunked")]) + bad, fresh=True, expect=False,
                       halfclose=True)
        if op == 9:
            te = r.choice(["gzip", "chunked, chunked", "chunked, gzip", "deflate", "x", "chunked\x00"])
            return Req("framing", f"Transfer-Encoding {te!r}", method, path,
                       render_head(method, path, base + [("Transfer-Encoding", te)]) + chunked(r, data), fresh=True, expect=False,
                       halfclose=True)
        if op == 10:
            # No length at all: the body is read as the next request.
            return Req("framing", "body without a length", method, path, render_head(method, path, base) + data, fresh=True,
                       expect=True, halfclose=True)
        if op == 11:
            # Chunked body whose last chunk never comes, then the client half-closes.
            return Req("framing", "chunked without its last chunk", method, path,
                       render_head(method, path, base + [("Transfer-Encoding", "chunked")]) + chunked(r, data)[:-5],
                       fresh=True, expect=False, halfclose=True)
        if op == 12:
            # Pipelined garbage after a valid request.
            return Req("framing", "garbage after a request", method, path,
                       render_head(method, path, base + [("Content-Length", str(len(data)))]) + data + r.randbytes(64),
                       fresh=True, expect=True)
        return Req("framing", "body sent in pieces", method, path,
                   [render_head(method, path, base + [("Content-Length", str(len(data)))])] + split(r, data), fresh=False)

    if family == "abort":
        method, path, body, stream = template_request(r, ctx, stream=True)
        if path not in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"):
            method, path, body, stream = chat_template(r, ctx, True) + (True,)
        body["model"] = "slow"
        body[{"/v1/responses": "max_output_tokens"}.get(path, "max_tokens")] = r.randint(20, 120)
        body["stream"] = r.random() < 0.8
        data = encode(body, r)
        how = r.choice(["mid-body", "before-head", "after-head", "after-chunk", "after-head-rst", "after-chunk-rst"])
        raw = render_head(method, path, std_headers(port, len(data))) + data
        if how == "mid-body":
            raw = raw[: len(raw) - r.randint(1, len(data))]
        return Req("abort", how, method, path, raw, fresh=True, abort=how, stream=body["stream"], dialect=dialect_of(path))

    if family == "pipeline":
        parts, dialects, n = [], [], r.randint(2, 5)
        for _ in range(n):
            if r.random() < 0.4:
                p = r.choice(GET_ROUTES)
                parts.append(render_head("GET", p, std_headers(port, None)))
            else:
                method, p, body, stream = template_request(r, ctx)
                data = encode(body, r)
                parts.append(render_head(method, p, std_headers(port, len(data))) + data)
            dialects.append(dialect_of(p))
        return Req("pipeline", f"{n} requests", "MIX", "-", b"".join(parts), responses=n, dialect=dialects)

    if family == "oversize":
        method, path, body, stream = template_request(r, ctx, stream=False)
        limit = 64 * 1024 if path == "/api/inference/cancel" else max_body
        size = limit + r.choice([1, 1024, limit // 4])
        pad = r.choice(["string", "spaces"])
        if pad == "string":
            key = "messages" if "messages" in body else next(iter(body))
            body["padding"] = huge(size, "p")
            data = encode(body, r)
        else:
            data = encode(body, r) + b" " * size
        return Req("oversize", f"{len(data)} bytes by {pad}", method, path,
                   render_head(method, path, std_headers(port, len(data))) + data, fresh=True)

    # slow-send: a valid request whose bytes arrive in several writes.
    method, path, body, stream = template_request(r, ctx)
    data = render_head(method, path, std_headers(port, len(encode(body, r)))) + encode(body, r)
    return Req("slow-send", "pieces", method, path, split(r, data), stream=stream, dialect=dialect_of(path))


def chunked(r, data: bytes) -> bytes:
    out, i = [], 0
    while i < len(data):
        piece = data[i:i + r.randint(1, max(1, len(data) // 3))]
        out.append(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        i += len(piece)
    return b"".join(out) + b"0\r\n\r\n"


def split(r, data: bytes) -> list:
    cuts = sorted(r.sample(range(1, len(data)), min(3, len(data) - 1))) if len(data) > 1 else []
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


# ─── Sending, reading, counting ─────────────────────────────────────────────

TERMINALS = {"openai": (b"data: [DONE]",), "anthropic": (b"event: message_stop", b"event: error"),
             "responses": (b"event: response.completed", b"event: response.failed", b"event: response.incomplete")}


class Stats:
    def __init__(self):
        self.sent = 0
        self.status = collections.Counter()
        self.family = collections.Counter()
        self.events = collections.Counter()      # no-response, timeouts, resets, anomalies
        self.examples = collections.defaultdict(list)
        self.by_family_status = collections.Counter()
        self.five_cases = collections.Counter()  # 5xx by request kind

    def example(self, kind, text, keep=EXAMPLES):
        if len(self.examples[kind]) < keep:
            self.examples[kind].append(text)

    def five(self, req, tag, text):
        self.five_cases[req.case] += 1
        self.example("5xx:" + req.case, f"{tag} {req.summary()}\n      -> {text}", keep=3)

    def five_examples(self, limit=EXAMPLES):
        """Up to `limit` 5xx examples, one kind of request after another."""
        lists = [self.examples["5xx:" + case] for case, _ in self.five_cases.most_common()]
        out, i = [], 0
        while len(out) < limit and any(i < len(x) for x in lists):
            out += [x[i] for x in lists if i < len(x)][: limit - len(out)]
            i += 1
        return out

    def merge(self, other: "Stats"):
        self.sent += other.sent
        self.status.update(other.status)
        self.family.update(other.family)
        self.events.update(other.events)
        self.by_family_status.update(other.by_family_status)
        self.five_cases.update(other.five_cases)
        for k, v in other.examples.items():
            room = (3 if k.startswith("5xx:") else EXAMPLES) - len(self.examples[k])
            self.examples[k].extend(v[:max(room, 0)])


def check_response(stats, req, resp, tag, k=0):
    stats.status[resp.status] += 1
    stats.by_family_status[(req.family, resp.status // 100)] += 1
    head = f"{resp.status} {resp.reason}"
    if resp.status >= 500:
        stats.five(req, tag, f"{head} {resp.body[:300]!r}")
        return
    ctype = (resp.header("content-type") or "").lower()
    if resp.status == 200 and ctype.startswith("text/event-stream"):
        dialect = req.dialect[k] if isinstance(req.dialect, list) else req.dialect
        terminals = TERMINALS.get(dialect or "openai", TERMINALS["openai"])
        if not any(t in resp.body for t in terminals):
            stats.events["200 stream without its terminal event"] += 1
            stats.example("200 stream without its terminal event", f"{tag} {req.summary()}\n      -> {head} {resp.body[-300:]!r}")
    elif resp.body and ("json" in ctype or resp.status >= 400):
        try:
            value = json.loads(resp.body)
            if resp.status >= 400 and not (isinstance(value, dict) and ("error" in value or "detail" in value)):
                stats.events["error response without an error envelope"] += 1
                stats.example("error response without an error envelope", f"{tag} {req.summary()}\n      -> {head} {resp.body[:300]!r}")
        except ValueError:
            kind = f"{resp.status // 100}xx body that is not JSON"
            stats.events[kind] += 1
            stats.example(kind, f"{tag} {req.summary()}\n      -> {head} [{ctype}] {resp.body[:300]!r}")
    elif resp.status >= 400 and not resp.body and req.expect and not req.fresh and req.family not in ("line", "header"):
        stats.events["error response with an empty body"] += 1
        stats.example("error response with an empty body", f"{tag} {req.summary()}\n      -> {head}")


class Worker:
    def __init__(self, port, request_timeout):
        self.port = port
        self.request_timeout = request_timeout
        self.conn = None
        self.stats = Stats()
        self.refused_in_a_row = 0

    def connect(self, timeout):
        conn = Connection(self.port, timeout=timeout)
        self.refused_in_a_row = 0
        return conn

    def run_one(self, req: Req, tag: str, body_limit=BODY_LIMIT):
        stats = self.stats
        stats.sent += 1
        stats.family[req.family] += 1
        timeout = req.timeout or (self.request_timeout if req.expect else 3.0)
        fresh = req.fresh or req.abort is not None
        try:
            if fresh:
                conn = self.connect(timeout)
            else:
                if self.conn is None:
                    self.conn = self.connect(timeout)
                conn = self.conn
                conn.settimeout(timeout)
        except ConnectionRefusedError:
            self.refused_in_a_row += 1
            stats.events["connection refused"] += 1
            stats.example("connection refused", f"{tag} {req.summary(120)}")
            return
        except OSError as err:
            stats.events[f"connect error {type(err).__name__}"] += 1
            return

        send_error = None
        try:
            for i, piece in enumerate(req.pieces):
                if i:
                    time.sleep(0.002)
                conn.send(piece)
            if req.halfclose:
                conn.sock.shutdown(socket.SHUT_WR)
        except OSError as err:
            # The server may answer (413, 400) and close before reading everything.
            send_error = type(err).__name__

        if req.abort:
            self.abort(conn, req, tag, send_error)
            return

        try:
            for k in range(req.responses):
                try:
                    resp = read_response(conn, head_request=req.head, body_limit=body_limit)
                except BodyOverLimit:
                    stats.events["client closed a response over 1 MiB (huge max_tokens)"] += 1
                    break
                except NoResponse as err:
                    if k == 0:
                        kind = "closed without a response" + ("" if not req.expect else " (well-framed request)")
                        stats.events[kind] += 1
                        if req.expect:
                            stats.example(kind, f"{tag} {req.summary()}\n      -> {err} (send error: {send_error})")
                    break
                check_response(stats, req, resp, tag, k)
                if not resp.keep_alive:
                    break
            else:
                if not fresh:
                    return  # the connection stays open for the next request
        except socket.timeout:
            if req.expect:
                stats.events["HANG: no answer to a well-framed request"] += 1
                stats.example("HANG: no answer to a well-framed request", f"{tag} {req.summary()}\n      -> nothing in {timeout} s")
            else:
                stats.events["no answer to a malformed request (timeout)"] += 1
        except Truncated as err:
            stats.events["response cut short"] += 1
            stats.example("response cut short", f"{tag} {req.summary()}\n      -> {err}")
        except ConnectionResetError:
            kind = "connection reset" + (" (well-framed request)" if req.expect and not send_error else "")
            stats.events[kind] += 1
            if req.expect and not send_error:
                stats.example(kind, f"{tag} {req.summary()}")
        except OSError as err:
            stats.events[f"socket error {type(err).__name__}"] += 1
            stats.example(f"socket error {type(err).__name__}", f"{tag} {req.summary()}\n      -> {err!r}")
        conn.close()
        if conn is self.conn:
            self.conn = None

    def abort(self, conn, req, tag, send_error):
        how = req.abort
        try:
            if how == "before-head" or how == "mid-body":
                time.sleep(0.001 * (zlib.crc32(tag.encode()) % 20))
            else:
                status, _, headers, _ = conn.read_head()
                self.stats.status[status] += 1
                self.stats.by_family_status[(req.family, status // 100)] += 1
                if status >= 500:
                    self.stats.five(req, tag, f"{status} (head only, then aborted)")
                if how.startswith("after-chunk") and "chunked" in (harness.header(headers, "transfer-encoding") or ""):
                    next(conn.chunks(), None)
        except (OSError, NoResponse, Truncated):
            pass
        conn.close(reset=how.endswith("-rst"))
        self.stats.events[f"aborted by the client ({how})"] += 1


def heavy_prelude(w: Worker, wid, ctx):
    """The largest legitimate allocations, all workers at once, before the RSS baseline: a
    non-streamed generation that runs to the wall-clock cap (its whole body is buffered), a
    streamed one closed after 1 MiB, and a body just over the limit. The allocator's high-water
    mark is then part of the baseline, and growth after it means memory that is kept."""
    port = ctx["port"]
    huge_chat = {"model": "fuzz", "max_tokens": 2 ** 31, "messages": [{"role": "user", "content": "hi"}]}
    for stream in (False, True):
        data = json.dumps(dict(huge_chat, stream=stream)).encode()
        req = Req("prelude", f"max_tokens 2^31 stream={stream}", "POST", "/v1/chat/completions",
                  render_head("POST", "/v1/chat/completions", std_headers(port, len(data))) + data, fresh=True, stream=stream)
        w.run_one(req, f"[prelude:{wid}]", body_limit=(1 << 20) if stream else (1 << 30))
    data = json.dumps(dict(huge_chat, padding="p" * ctx["max_body"])).encode()
    w.run_one(Req("prelude", "body over the limit", "POST", "/v1/chat/completions",
                  render_head("POST", "/v1/chat/completions", std_headers(port, len(data))) + data, fresh=True),
              f"[prelude:{wid}]")


def worker_main(wid, seed, phase, count, deadline, ctx, request_timeout, progress, out_q):
    w = Worker(ctx["port"], request_timeout)
    i = 0
    try:
        if phase == "warmup":
            heavy_prelude(w, wid, ctx)
        while i < count and time.monotonic() < deadline:
            req = generate(seed, phase, wid, i, ctx)
            w.run_one(req, f"[{phase}:{wid}:{i}]")
            i += 1
            if i % 32 == 0:
                progress[wid] = i
            if w.refused_in_a_row >= 20:
                w.stats.events["worker stopped: server refuses connections"] += 1
                break
    finally:
        progress[wid] = i
        if w.conn:
            w.conn.close()
        out_q.put(w.stats)


def run_phase(seed, phase, total, seconds, workers, ctx, request_timeout, server=None, sampler=None, report_every=10.0):
    """Runs `total` requests over `workers` processes; returns merged Stats and seconds taken."""
    mp = multiprocessing.get_context("fork")
    progress = mp.Array("q", workers, lock=False)
    out_q = mp.Queue()
    per = [total // workers + (1 if i < total % workers else 0) for i in range(workers)]
    started = time.monotonic()
    deadline = started + seconds
    procs = [mp.Process(target=worker_main, args=(w, seed, phase, per[w], deadline, ctx, request_timeout, progress, out_q),
                        daemon=True) for w in range(workers)]
    for p in procs:
        p.start()
    merged = Stats()
    got, last_report = 0, started
    while got < workers:
        try:
            merged.merge(out_q.get(timeout=1.0))
            got += 1
        except Exception:
            pass
        now = time.monotonic()
        if report_every and now - last_report >= report_every:
            last_report = now
            done = sum(progress)
            rss = f", server RSS {harness.mib(server.rss())}" if server else ""
            print(f"  [{phase}] {now - started:5.0f} s: {done:,} requests ({done / (now - started):,.0f}/s){rss}", flush=True)
        if now > deadline + request_timeout + 60 and got < workers:
            print(f"  [{phase}] workers did not report in time; {workers - got} missing", flush=True)
            merged.events["worker did not finish"] += workers - got
            break
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
    return merged, time.monotonic() - started


# ─── The run ────────────────────────────────────────────────────────────────

def setup(server, families=None, routes=None):
    ctx = {"port": server.port, "max_body": server.max_body}
    if families:
        wanted = set(families.split(","))
        if wanted - set(FAMILIES):
            raise SystemExit(f"unknown families: {', '.join(sorted(wanted - set(FAMILIES)))}")
        ctx["weights"] = [w if f in wanted else 0 for f, w in zip(FAMILIES, FAMILY_WEIGHTS)]
    if routes:
        wanted = routes.split(",")
        paths = [fn(random.Random(0), dict.fromkeys(["scratch_path", "fuzz_path", "workdir", "text_path", "plugin_path"], ""), False)[1]
                 for fn, _, _ in POST_TEMPLATES]
        ctx["route_weights"] = [w if p in wanted else 0 for p, w in zip(paths, _POST_WEIGHTS)]
        if not any(ctx["route_weights"]):
            raise SystemExit(f"--routes names none of {', '.join(paths)}")
    server.load("fuzz", repeat=1, token_delay_ms=0, slots=64)
    server.load("slow", repeat=1, token_delay_ms=3, slots=64)
    ctx["fuzz_path"] = server.model_file("fuzz", repeat=1, token_delay_ms=0, slots=64)
    ctx["scratch_path"] = server.model_file("scratch", repeat=1, token_delay_ms=0, slots=4)
    ctx["text_path"] = str(server.workdir / "not-a-library.txt")
    (server.workdir / "not-a-library.txt").write_text("hello\n")
    ctx["workdir"] = str(server.workdir)
    ctx["plugin_path"] = str(server.plugin)
    return ctx


def route_checks(port, ctx) -> list:
    """Every route with a canonical valid request, and the status it must get: a route that
    answers 4xx to it is broken even though nothing crashed. Returns (name, ok, detail)."""
    chat = {"model": "fuzz", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        ("GET", "/health", None), ("GET", "/v1/models", None), ("GET", "/v1/models/fuzz", None),
        ("GET", "/api/inference/status", None), ("GET", "/api/inference/load-progress", None),
        ("GET", "/api/inference/load-progress?model=fuzz", None), ("GET", "/api/plugins", None),
        ("POST", "/v1/chat/completions", chat),
        ("POST", "/v1/completions", {"model": "fuzz", "max_tokens": 3, "prompt": "Once"}),
        ("POST", "/v1/responses", {"model": "fuzz", "max_output_tokens": 3, "input": "hi"}),
        ("POST", "/v1/embeddings", {"model": "fuzz", "input": ["a", "b"]}),
        ("POST", "/v1/messages", chat),
        ("POST", "/v1/messages/count_tokens", {"model": "fuzz", "messages": chat["messages"]}),
        ("POST", "/api/inference/validate", {"model_path": ctx["fuzz_path"]}),
        ("POST", "/api/inference/load", {"model_path": ctx["fuzz_path"]}),
        ("POST", "/api/inference/cancel", {"cancel_id": "nobody"}),
    ]
    out = []
    for method, path, body in cases:
        try:
            status, answer = harness.request_json(port, method, path, body, timeout=30)
            out.append((f"{method} {path}", status == 200, f"{status} {str(answer)[:160]}"))
        except (OSError, NoResponse, Truncated) as err:
            out.append((f"{method} {path}", False, repr(err)))
    return out


# glibc keeps freed memory in per-thread arenas: after large transient buffers (a non-streamed
# answer is buffered whole; 300k-character strings), RSS stays up without anything being kept.
# Two arenas and a low trim threshold hand freed memory back, so that growth in RSS measures
# memory the server keeps. --glibc-defaults runs the allocator as shipped.
ALLOCATOR_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": "131072"}


def start_server(args):
    extra = ["--max-body-mb", str(args.max_body_mb), "--max-generation-seconds", str(args.max_generation_seconds)]
    env = {} if args.glibc_defaults else dict(ALLOCATOR_ENV)
    env.update(kv.split("=", 1) for kv in args.server_env)
    server = harness.PatchbayServer(configuration=args.configuration, extra_args=extra, keep=args.keep, env=env)
    server.max_body = args.max_body_mb * 1024 * 1024
    return server


def replay(args):
    phase, wid, index = args.replay.split(":")
    server = start_server(args)
    try:
        ctx = setup(server, args.families, args.routes)
        req = generate(args.seed, phase, int(wid), int(index), ctx)
        print(f"request [{args.replay}] seed {args.seed}: {req.family}/{req.detail}")
        print(f"  bytes ({len(req.data)}): {req.data[:2000]!r}{'…' if len(req.data) > 2000 else ''}")
        conn = Connection(server.port, timeout=args.request_timeout if req.expect else 3.0)
        for piece in req.pieces:
            conn.send(piece)
        if req.halfclose:
            conn.sock.shutdown(socket.SHUT_WR)
        try:
            for _ in range(req.responses):
                resp = read_response(conn, head_request=req.head)
                print(f"  -> {resp.status} {resp.reason} {resp.headers}\n     {resp.body[:2000]!r}")
        except (OSError, NoResponse, Truncated) as err:
            print(f"  -> {type(err).__name__}: {err}")
        conn.close()
        time.sleep(0.5)
        print(f"server alive: {server.alive()}")
        if not server.alive():
            print(server.log_tail())
    finally:
        server.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000, help="requests in the main phase (default 100,000)")
    parser.add_argument("--max-seconds", type=float, default=600, help="time bound of the main phase (default 600)")
    parser.add_argument("--seed", type=int, default=1, help="the run's seed (default 1)")
    parser.add_argument("--workers", type=int, default=6, help="client processes, one keep-alive connection each (default 6)")
    parser.add_argument("--warmup", type=int, default=3000, help="requests before the RSS baseline (default 3000)")
    parser.add_argument("--settle-seconds", type=float, default=5, help="wait before the final RSS (default 5)")
    parser.add_argument("--idle-timeout", type=float, default=10, help="how long active_generations may take to reach 0")
    parser.add_argument("--request-timeout", type=float, default=30, help="a well-framed request unanswered this long is a hang")
    parser.add_argument("--rss-tolerance-pct", type=float, default=25)
    parser.add_argument("--rss-tolerance-mib", type=float, default=16)
    parser.add_argument("--max-body-mb", type=int, default=1, help="the server's --max-body-mb, so oversized bodies stay cheap")
    parser.add_argument("--max-generation-seconds", type=int, default=1,
                        help="the server's wall-clock cap; small, as a mutated max_tokens runs until it and a "
                             "non-streamed answer is buffered whole (default 1)")
    parser.add_argument("--configuration", default="debug", choices=["debug", "release"],
                        help="which .build folder, unless PATCHBAY_BUILD_DIR is set (default debug)")
    parser.add_argument("--keep", action="store_true", help="keep the server's work folder (and its log)")
    parser.add_argument("--replay", metavar="PHASE:WORKER:INDEX", help="send that one request to a fresh server and print the answer")
    parser.add_argument("--families", help=f"only these request families, comma-separated ({','.join(FAMILIES)}); "
                        "the same seed then makes other requests")
    parser.add_argument("--routes", help="valid/field/body/header/framing requests only to these POST paths, comma-separated")
    parser.add_argument("--glibc-defaults", action="store_true",
                        help=f"do not give the server {' '.join(f'{k}={v}' for k, v in ALLOCATOR_ENV.items())} "
                             "(then glibc's arena caching shows as RSS growth)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment for the server, e.g. MALLOC_ARENA_MAX=2 (repeatable)")
    parser.add_argument("--target", default=LOCALHOST, help="only 127.0.0.1 is accepted")
    args = parser.parse_args()
    harness.check_local(args.target)

    if args.replay:
        replay(args)
        return 0

    server = start_server(args)
    print(f"patchbay {server.source} (copied to {server.workdir}), pid {server.pid}, port {server.port}; "
          f"seed {args.seed}, {args.workers} workers, {os.cpu_count()} cores; server environment {server.env or 'unchanged'}")
    failures = []
    try:
        ctx = setup(server, args.families, args.routes)
        warm, warm_s = run_phase(args.seed, "warmup", args.warmup, 120, args.workers, ctx, args.request_timeout, server,
                                 report_every=0)
        idle, _ = harness.wait_idle(server.port, args.idle_timeout)
        time.sleep(1)
        base_rss, base_fds = server.rss(), server.fds()
        print(f"warm-up: {warm.sent:,} requests in {warm_s:.1f} s; baseline RSS {harness.mib(base_rss)}", flush=True)

        sampler = harness.RssSampler(server.pid, interval=0.25)
        sampler.start()
        stats, seconds = run_phase(args.seed, "main", args.requests, args.max_seconds, args.workers, ctx,
                                   args.request_timeout, server)
        sampler.stop()
        alive_after_load = server.alive()
        idle, idle_s = harness.wait_idle(server.port, args.idle_timeout) if alive_after_load else (None, 0)
        time.sleep(args.settle_seconds)
        end_rss, end_fds, end_sockets = server.rss(), server.fds(), server.sockets()
        try:
            _, status_body = harness.request_json(server.port, "GET", "/api/inference/status") if server.alive() else (0, {})
        except (OSError, NoResponse, Truncated) as err:
            status_body = {"error": repr(err)}
        loaded = status_body.get("loaded", []) if isinstance(status_body, dict) else []
        checks = harness.final_checks(server.port, "fuzz") if server.alive() else []
        routes = route_checks(server.port, ctx) if server.alive() else []
        stats.merge(warm)
        total_s = seconds + warm_s

        print()
        print(f"requests sent: {stats.sent:,} ({warm.sent:,} warm-up + {stats.sent - warm.sent:,} main) in {total_s:.1f} s, "
              f"{(stats.sent - warm.sent) / seconds:,.0f}/s in the main phase")
        print("  by family: " + ", ".join(f"{k} {v:,}" for k, v in stats.family.most_common()))
        classes = collections.Counter()
        for code, n in stats.status.items():
            classes[f"{code // 100}xx"] += n
        print("responses by status class: " + ", ".join(f"{k} {classes[k]:,}" for k in sorted(classes)))
        print("  by status: " + ", ".join(f"{k} {v:,}" for k, v in sorted(stats.status.items())))
        fives = sum(n for code, n in stats.status.items() if code >= 500)
        print(f"5xx responses: {fives}")
        for case, n in stats.five_cases.most_common(40):
            print(f"  {n:6,}  {case}")
        if stats.five_cases:
            print(f"  examples (up to {EXAMPLES}; replay one with --seed {args.seed} --replay PHASE:WORKER:INDEX):")
        for text in stats.five_examples():
            print("    " + text)
        if fives:
            failures.append(f"{fives} responses with a 5xx status")
        print("connection-level events:")
        for kind, n in sorted(stats.events.items()):
            print(f"  {kind}: {n:,}")
        for kind, texts in sorted(stats.examples.items()):
            if kind.startswith("5xx:"):
                continue
            print(f"  examples of '{kind}':")
            for text in texts[:5]:
                print("    " + text)
        hangs = stats.events.get("HANG: no answer to a well-framed request", 0)
        if hangs:
            failures.append(f"{hangs} well-framed requests got no answer within {args.request_timeout} s")
        refused = stats.events.get("connection refused", 0)

        alive = server.alive()
        print(f"server alive at the end: {alive}" + ("" if alive else f" (exit status {server.process.returncode})"))
        if not alive or not alive_after_load:
            failures.append("the server died")
            print(server.log_tail())
        if refused:
            failures.append(f"{refused} connections refused")
        for name, ok, detail in checks:
            print(f"  final {name}: {'ok' if ok else 'FAILED'} ({detail})")
            if not ok:
                failures.append(f"final {name} failed")
        bad_routes = [(name, detail) for name, ok, detail in routes if not ok]
        print(f"routes answering a canonical valid request with 200: {len(routes) - len(bad_routes)} of {len(routes)}")
        for name, detail in bad_routes:
            print(f"  {name}: {detail}")
        if bad_routes:
            failures.append(f"{len(bad_routes)} routes refuse a valid request ({', '.join(n for n, _ in bad_routes)})")
        print(f"active_generations at rest: {idle} (after {idle_s:.1f} s)")
        if alive and idle != 0:
            failures.append(f"active_generations is {idle}, not 0, {args.idle_timeout} s after the load")
        tolerance = max(base_rss * args.rss_tolerance_pct / 100, args.rss_tolerance_mib * 1024)
        print(f"server RSS: baseline after warm-up {harness.mib(base_rss)}, peak {harness.mib(sampler.peak)}, "
              f"end after {args.settle_seconds:.0f} s settle {harness.mib(end_rss)} "
              f"(limit {harness.mib(base_rss + tolerance)} = baseline + max({args.rss_tolerance_pct:.0f} %, {args.rss_tolerance_mib:.0f} MiB))")
        print(f"server file descriptors: {base_fds} after the warm-up, {end_fds} at the end; "
              f"its TCP connections at the end: {end_sockets or 'none'}")
        if alive and end_sockets:
            failures.append(f"the server still holds {sum(end_sockets.values())} TCP connections that every client "
                            f"has closed ({', '.join(f'{k} {v}' for k, v in end_sockets.items())})")
        print(f"models loaded at the end: {len(loaded)} ({', '.join(repr(m[:20]) for m in loaded[:8])}{', …' if len(loaded) > 8 else ''})")
        if alive and end_rss > base_rss + tolerance:
            failures.append(f"RSS {harness.mib(end_rss)} is not back near the baseline {harness.mib(base_rss)}")
    finally:
        harness.stop_and_report(server, failures, keep=args.keep)
    return harness.verdict(failures)


if __name__ == "__main__":
    sys.exit(main())
