"""The plugin templates (Examples/CPlugin, Examples/RustPlugin, Examples/SwiftPlugin) as a
backend author gets them: each is copied with patchbay.h alone (the C one also with the plugin
support files it vendors, in its support/ folder) into a temporary folder, built there with its
own build.sh (cc; cargo --offline; swiftc), and the library it made is the only plugin of a real
`patchbay serve`, which serves chats to the official openai SDK, streaming and not, and stops
one mid-stream through POST /api/inference/cancel.

scripts/test also builds all three into the build folder (build_template_plugins in
scripts/lib/engines.sh); the last test checks that it did. Without cargo the Rust tests skip,
which PATCHBAY_REQUIRE_ENGINES=1 (scripts/test) turns into failures.
"""
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

import conftest
from conftest import BUILD_DIR, ROOT, start_server, start_thread, stop_and_clean_up, wait_for

HEADER = ROOT / "Sources" / "CPatchbayABI" / "include" / "patchbay.h"
SUPPORT = ROOT / "Plugins" / "PluginSupport"

# Building a template from scratch (cargo's std-only crate, swiftc -O) takes a few seconds
# on an idle machine, more on a busy one; pytest.ini's 60 s covers the tests, not the build.
pytestmark = pytest.mark.timeout(300)


@dataclass(frozen=True)
class Template:
    key: str        # "c" | "rust" | "swift"
    folder: str     # under Examples/
    tool: str       # what builds it
    library: str    # what build.sh leaves in its output folder
    name: str       # the plugin's name (pb_plugin_api.name)
    extension: str  # the model files it claims
    vendored: tuple[str, ...] = ()  # Plugins/PluginSupport files an author copies into its support/


TEMPLATES = [
    Template("c", "CPlugin", "cc", "libc_template_plugin.so", "c-template", "echo",
             vendored=("include/plugin_events.h", "plugin_events.c", "include/plugin_util.h", "plugin_util.c",
                       "include/json_reader.h", "json_reader.c")),
    Template("rust", "RustPlugin", "cargo", "librust_template_plugin.so", "rust-template", "rsmodel"),
    Template("swift", "SwiftPlugin", "swiftc", "libswift_template_plugin.so", "swift-template", "swiftmodel"),
]


def exported_symbols(library) -> list[str]:
    if not shutil.which("nm"):
        pytest.skip("needs nm (binutils) to read the dynamic symbol table")
    out = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True)
    return [line.split()[-1] for line in out.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module", params=TEMPLATES, ids=[t.key for t in TEMPLATES])
def built(request, tmp_path_factory):
    """The template copied with the header alone into a temporary folder and built there."""
    template: Template = request.param
    if not shutil.which(template.tool):
        pytest.skip(f"needs {template.tool} to build Examples/{template.folder}")
    root = tmp_path_factory.mktemp(f"{template.key}-template")
    source = root / "my-plugin"
    # What an author copies: the template's own files, no build products of a checkout.
    shutil.copytree(ROOT / "Examples" / template.folder, source,
                    ignore=shutil.ignore_patterns("target", "*-target", "*-build", "support"))
    shutil.copy(HEADER, root / "patchbay.h")
    if template.vendored:
        (source / "support").mkdir()
        for name in template.vendored:
            shutil.copy(SUPPORT / name, source / "support")
    started = time.monotonic()
    # CARGO_TARGET_DIR from the caller's environment would build elsewhere: the test wants
    # everything in its own folder.
    # PATCHBAY_PLUGIN_SUPPORT would point the C build back into the checkout.
    env = {k: v for k, v in os.environ.items() if k not in ("CARGO_TARGET_DIR", "PATCHBAY_PLUGIN_SUPPORT")}
    result = subprocess.run([str(source / "build.sh"), str(root / "patchbay.h"), str(root / "out")],
                            cwd=root, env=env, capture_output=True, text=True, timeout=280)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{template.key} template did not build out of tree:\n{output[-4000:]}"
    # The Rust mirrors were checked against this very header (build.rs), not skipped.
    assert "NOT checked" not in output, output[-2000:]
    library = root / "out" / template.library
    assert library.is_file(), output[-2000:]
    print(f"{template.key} template built out of tree in {time.monotonic() - started:.1f} s")
    return template, library


@pytest.fixture(scope="module")
def template_server(built):
    """A server whose only plugin is the template just built."""
    template, library = built
    server = start_server([library], prefix=f"patchbay-{template.key}-template-")
    yield server
    stop_and_clean_up(server)


@pytest.fixture
def template(built) -> Template:
    return built[0]


def load_model(server, template: Template, name: str, **settings) -> str:
    """Writes a model file for the template (key=value lines) and loads it; returns its path."""
    path = server.workdir / f"{name}.{template.extension}"
    path.write_text("# written by test_templates.py\n" + "".join(f"{k}={v}\n" for k, v in settings.items()))
    status, body = server.post("/api/inference/load", {"model_path": str(path)})
    assert status == 200, body
    return str(path)


def stream_chat(client, **kwargs):
    """Starts a streaming chat on a worker thread. Returns (worker, result): `result` fills in
    as chunks arrive."""
    result = {"deltas": [], "finish": None, "usage": None, "first": threading.Event()}

    def consume():
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            if chunk.usage:
                result["usage"] = chunk.usage
            if chunk.choices:
                result["finish"] = chunk.choices[0].finish_reason or result["finish"]
                if chunk.choices[0].delta.content:
                    result["deltas"].append(chunk.choices[0].delta.content)
                    result["first"].set()
        return result

    return start_thread(consume), result


# ─── The library ────────────────────────────────────────────────────────────────────────

def test_it_builds_out_of_tree_and_exports_only_the_entry(built):
    _, library = built
    assert exported_symbols(library) == ["pb_plugin_entry"]


def test_it_passes_the_conformance_checker(built, tmp_path):
    """`patchbay plugin check` runs the out-of-tree build through the whole contract."""
    template, library = built
    model = tmp_path / f"check.{template.extension}"
    model.write_text("reply=hello from the template\ntoken_delay_ms=5\n")
    result = subprocess.run([str(conftest.BINARY), "plugin", "check", str(library), "--model", str(model)],
                            capture_output=True, text=True, timeout=240)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"^\d+ passed, 0 failed", result.stdout, re.MULTILINE), result.stdout[-2000:]


def test_the_server_lists_it_as_its_only_plugin(template_server, template):
    status, body = template_server.get("/api/plugins")
    assert status == 200 and body["refused"] == [], body
    [plugin] = body["plugins"]
    assert plugin["name"] == template.name and plugin["abi_version"] == "1.1", plugin
    assert plugin["model_formats"] == [template.extension]
    assert set(plugin["capabilities"]) == {"chat", "completion"}, plugin


def test_model_info_reaches_v1_models(template_server, template):
    path = load_model(template_server, template, "described", context_length=2048, reply="hi")
    models = {m["id"]: m for m in template_server.openai().models.list().model_dump()["data"]}
    model = models["described"]
    assert model["backend"] == template.name and model["context_length"] == 2048, model
    assert model["architecture"] == template.name and model["parallel_slots"] == 4, model
    assert model["size_bytes"] == os.path.getsize(path), model
    assert model["training_context_length"] == 2048, model


# ─── Serving ────────────────────────────────────────────────────────────────────────────

def test_a_chat_echoes_the_last_user_message(template_server, template):
    load_model(template_server, template, "echo")
    client = template_server.openai()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "An earlier question"},
                {"role": "assistant", "content": "An earlier answer"},
                {"role": "user", "content": [{"type": "text", "text": "Héllo there,"}, {"type": "text", "text": "plugin 😀"}]}]
    reply = client.chat.completions.create(model="echo", messages=messages)
    assert reply.choices[0].message.content == "Héllo there, plugin 😀"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 4  # "Héllo ", "there, ", "plugin ", "😀"
    assert reply.usage.prompt_tokens == 2 + 3 + 3 + 4  # words of every message
    completion = client.completions.create(model="echo", prompt="say this back")
    assert completion.choices[0].text == "say this back" and completion.choices[0].finish_reason == "stop"


def test_a_scripted_reply_streams_word_by_word_and_honours_max_tokens(template_server, template):
    load_model(template_server, template, "scripted", reply="One two three four five.", token_delay_ms=5)
    client = template_server.openai()
    worker, _ = stream_chat(client, model="scripted", messages=[{"role": "user", "content": "count"}],
                            stream_options={"include_usage": True})
    result = worker.join(30)
    assert result["deltas"] == ["One ", "two ", "three ", "four ", "five."]
    assert result["finish"] == "stop"
    assert result["usage"].completion_tokens == 5 and result["usage"].prompt_tokens == 1

    reply = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "x"}], max_tokens=3)
    assert reply.choices[0].message.content == "One two three "
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3


def test_cancel_mid_stream_stops_the_engine_at_once(template_server, template):
    words = 400
    load_model(template_server, template, "long", reply=" ".join(f"w{i}" for i in range(words)), token_delay_ms=20)
    client = template_server.openai()
    worker, result = stream_chat(client, model="long", messages=[{"role": "user", "content": "go"}],
                                 max_tokens=5000, extra_body={"cancel_id": f"{template.key}-cancel-1"},
                                 extra_headers={"x-request-id": f"{template.key}-cancel-request"})
    wait_for(lambda: len(result["deltas"]) >= 3 or not worker.is_alive(), 20, "three streamed words")
    asked = time.monotonic()
    status, body = template_server.post("/api/inference/cancel", {"cancel_id": f"{template.key}-cancel-1"})
    assert status == 200 and body == {"cancelled": 1}, body
    result = worker.join(10)
    stopped_in = time.monotonic() - asked
    assert result["finish"] == "stop"  # a cancelled stream ends cleanly, then [DONE]
    assert stopped_in < 1.5, f"the stream took {stopped_in:.2f} s to end after the cancel"
    received = len(result["deltas"])
    assert 3 <= received < words
    assert "".join(result["deltas"]) == " ".join(f"w{i}" for i in range(received)) + " "
    # The engine's own word: it ended the run as cancelled, once, after exactly what the client got.
    line = f"request {template.key}-cancel-request: run ended (cancelled) after {received} tokens"
    wait_for(lambda: line in template_server.log_text(), 5, lambda: f"{line!r} in the log")
    time.sleep(0.3)
    assert template_server.log_text().count(f"request {template.key}-cancel-request: run ended") == 1
    assert template_server.wait_idle() == 0


def test_errors_reach_the_client(template_server, template):
    load_model(template_server, template, "tiny", context_length=4)
    client = template_server.openai()
    with pytest.raises(openai.BadRequestError, match="exceeds the context"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "one two three four five"}])
    missing = template_server.workdir / f"missing.{template.extension}"
    status, body = template_server.post("/api/inference/load", {"model_path": str(missing)})
    assert status == 404, body
    bad = template_server.workdir / f"bad.{template.extension}"
    bad.write_text("token_delay_ms=soon\n")
    status, body = template_server.post("/api/inference/load", {"model_path": str(bad)})
    assert status >= 400 and re.search(r"bad\.\w+:1: token_delay_ms must be a whole number", body["error"]["message"]), body


# ─── The set-up ─────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("template", TEMPLATES, ids=[t.key for t in TEMPLATES])
def test_the_setup_built_it_for_the_other_tests(template):
    """scripts/test builds every template into the build folder (build_template_plugins)."""
    if not shutil.which(template.tool):
        pytest.skip(f"needs {template.tool}: scripts/test builds the {template.key} template only with it")
    library = BUILD_DIR / template.library
    if not library.is_file():
        pytest.skip(f"{library} is missing: scripts/test builds it (build_template_plugins in scripts/lib/engines.sh)")
    assert exported_symbols(library) == ["pb_plugin_entry"]
