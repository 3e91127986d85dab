"""Plugin hosting, runtime plugin loading, model management and lifecycle."""
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from conftest import REFERENCE_PLUGIN, ROOT, Server

HEADER_DIR = ROOT / "Sources" / "CPatchbayABI" / "include"


def build_plugin(workdir: Path, name: str, source: str) -> str:
    """Compiles a small plugin against the real header."""
    src = workdir / f"{name}.c"
    src.write_text(source)
    out = workdir / f"lib{name}.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-I", str(HEADER_DIR), "-o", str(out), str(src)], check=True)
    return str(out)


FUTURE_MAJOR = r"""
#include "patchbay.h"
static const pb_plugin_api api = { .struct_size = sizeof(pb_plugin_api), .abi_major = 2, .abi_minor = 3, .name = "future" };
PB_EXPORT const pb_plugin_api *pb_plugin_entry(const pb_host_api *host) { (void)host; return &api; }
"""

NO_ENTRY = "int not_a_plugin(void) { return 1; }\n"


def test_plugins_are_listed_with_their_description(server):
    status, body = server.get("/api/plugins")
    assert status == 200
    [plugin] = body["plugins"]
    assert plugin["name"] == "reference" and plugin["abi_version"] == "1.1"
    assert plugin["model_formats"] == ["ref"]
    assert {"chat", "tools", "reasoning", "tokenize"} <= set(plugin["capabilities"])


def test_load_a_plugin_at_runtime_from_a_path(workdir):
    server = Server(workdir, plugins=())
    try:
        assert server.get("/api/plugins")[1]["plugins"] == []
        # Dropped into the plugin folder after start; only those folders are allowed.
        copy = server.plugin_dir / "libMyBackend.so"
        shutil.copy(REFERENCE_PLUGIN, copy)
        status, plugin = server.post("/api/plugins/load", {"path": str(copy)})
        assert status == 200 and plugin["name"] == "reference"
        server.load("hello", reply="swapped in")
        status, reply = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
        assert reply["choices"][0]["message"]["content"] == "swapped in"
        # The same library twice is refused, not loaded twice.
        assert server.post("/api/plugins/load", {"path": str(copy)})[0] == 409
    finally:
        server.stop()


def test_incompatible_plugins_are_refused_and_the_server_keeps_running(server, workdir):
    # Built into the plugin folder after start: a library elsewhere would be refused unopened.
    future = build_plugin(server.plugin_dir, "future", FUTURE_MAJOR)
    status, error = server.post("/api/plugins/load", {"path": future})
    assert status == 400
    assert "ABI 2.3" in error["error"]["message"] and "ABI 1.1" in error["error"]["message"]
    assert future in error["error"]["message"]

    no_entry = build_plugin(server.plugin_dir, "noentry", NO_ENTRY)
    status, error = server.post("/api/plugins/load", {"path": no_entry})
    assert status == 400 and "pb_plugin_entry" in error["error"]["message"]

    garbage = server.plugin_dir / "libgarbage.so"
    garbage.write_bytes(b"this is not an ELF file")
    status, error = server.post("/api/plugins/load", {"path": str(garbage)})
    assert status == 400 and "cannot open" in error["error"]["message"]

    assert server.post("/api/plugins/load", {"path": str(server.plugin_dir / "missing.so")})[0] == 404
    refused = {r["path"] for r in server.get("/api/plugins")[1]["refused"]}
    assert {future, no_entry, str(garbage)} <= refused
    assert server.get("/health")[0] == 200


def test_refused_plugins_in_the_plugin_dir_do_not_stop_startup(workdir):
    future = build_plugin(workdir, "future", FUTURE_MAJOR)
    server = Server(workdir, plugins=(REFERENCE_PLUGIN, future))
    try:
        body = server.get("/api/plugins")[1]
        assert [p["name"] for p in body["plugins"]] == ["reference"]
        assert "majors must match" in body["refused"][0]["reason"]
    finally:
        server.stop()


def test_load_progress_rises_to_one(server):
    path = server.model_file("big", load_ms=1500)
    fractions = []
    loader = threading.Thread(target=lambda: server.post("/api/inference/load", {"model_path": path}))
    loader.start()
    while loader.is_alive():
        progress = server.get("/api/inference/load-progress")[1]
        if progress["phase"]:
            fractions.append(progress["fraction"])
        time.sleep(0.1)
    loader.join()
    final = server.get("/api/inference/load-progress")[1]
    assert final["phase"] == "ready" and final["fraction"] == 1.0
    assert any(0 < f < 1 for f in fractions), fractions
    assert fractions == sorted(fractions)


def test_status_validate_unload(server):
    path = server.model_file("m")
    status, body = server.post("/api/inference/validate", {"model_path": path})
    assert status == 200 and body["valid"] and body["backend"] == "reference"
    assert server.post("/api/inference/validate", {"model_path": "/nope.ref"})[0] == 400
    status, body = server.post("/api/inference/validate", {"model_path": str(server.workdir / "x.unknownformat")})
    assert status == 400
    server.post("/api/inference/load", {"model_path": path, "max_seq_length": 1024})
    status = server.get("/api/inference/status")[1]
    assert status["loaded"] == ["m"] and status["context_length"] == 1024
    assert server.post("/api/inference/unload", {"model_path": "m"})[1] == {"status": "unloaded", "model": "m"}
    assert server.get("/api/inference/status")[1]["loaded"] == []
    assert server.post("/api/inference/unload", {"model_path": "m"})[0] == 404


def test_load_errors(server):
    assert server.post("/api/inference/load", {"model_path": "/does/not/exist.ref"})[0] == 404
    assert server.post("/api/inference/load", {"model_path": server.model_file("a"), "backend": "nope"})[0] == 400
    assert server.post("/api/inference/load", {"model_path": server.model_file("b"), "max_seq_length": -1})[0] == 400
    assert server.post("/api/inference/load", {"model_path": server.model_file("c"), "cache_type_kv": "q9"})[0] == 400
    assert server.post("/api/inference/load", {})[0] == 400
    status, body = server.post("/api/inference/load", raw=b"[1,2")
    assert status == 400 and body["detail"]


def test_unload_with_active_generation_is_409_unless_forced(server):
    server.load("slow", repeat=1, token_delay_ms=10)
    thread = threading.Thread(target=lambda: server.post(
        "/v1/chat/completions", {"model": "slow", "messages": [{"role": "user", "content": "go"}]}))
    thread.start()
    time.sleep(0.3)
    assert server.post("/api/inference/unload", {"model_path": "slow"})[0] == 409
    assert server.post("/api/inference/unload", {"model_path": "slow", "force_cancel_active": True})[0] == 200
    thread.join(10)
    assert not thread.is_alive()


def test_sigterm_drains_then_cancels_and_exits(workdir):
    server = Server(workdir, extra_args=["--shutdown-grace-seconds", "1"])
    server.load("slow", repeat=1, token_delay_ms=10)
    replies = []
    thread = threading.Thread(target=lambda: replies.append(server.post(
        "/v1/chat/completions", {"model": "slow", "messages": [{"role": "user", "content": "go"}]})))
    thread.start()
    time.sleep(0.3)
    started = time.time()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=15) == 0
    assert time.time() - started < 8
    thread.join(5)
    status, body = replies[0]
    assert status == 200 and body["choices"][0]["finish_reason"] == "stop"
    assert "cancelled generations" in server.log_path.read_text()


def test_unload_during_load_cancels_the_load(server):
    path = server.model_file("huge", load_ms=20000)
    replies = []
    loader = threading.Thread(target=lambda: replies.append(server.post("/api/inference/load", {"model_path": path})))
    loader.start()
    time.sleep(0.3)
    assert server.get("/api/inference/status")[1]["loading"] == ["huge"]
    started = time.time()
    assert server.post("/api/inference/unload", {"model_path": "huge"})[0] == 200
    loader.join(5)
    assert time.time() - started < 2
    status, body = replies[0]
    assert status == 409 and body["error"]["code"] == "load_cancelled"
    assert server.get("/api/inference/status")[1]["loaded"] == []
