"""Plugin hosting, runtime plugin loading, model management and lifecycle."""
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (REFERENCE_PLUGIN, ROOT, Server, check_load_progress, engine_stays_stopped, read_stats,
                      start_thread, wait_for, wait_for_stats, watch_load)

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


REQUIRED = ["name", "load", "model_info", "unload", "run_create", "run_execute", "run_cancel", "run_destroy"]


def stub_plugin(name: str, struct_size: str = "sizeof(pb_plugin_api)", missing: str | None = None) -> str:
    """A plugin whose functions are stubs: its table declares `struct_size` and lacks `missing`."""
    fields = {"name": f'"{name}"', "load": "load", "model_info": "model_info", "unload": "unload",
              "run_create": "run_create", "run_execute": "run_execute", "run_cancel": "run_cancel",
              "run_destroy": "run_destroy"}
    if missing:
        fields[missing] = "NULL"
    table = ", ".join(f".{field} = {value}" for field, value in fields.items())
    return r"""
#include <stddef.h>
#include "patchbay.h"
static pb_status load(const char *r, const pb_load_callbacks *c, pb_model **m, char *e, size_t n) {
    (void)r; (void)c; (void)m; (void)e; (void)n; return PB_ERR_INTERNAL; }
static void model_info(pb_model *m, pb_model_info *i) { (void)m; (void)i; }
static void unload(pb_model *m) { (void)m; }
static pb_status run_create(pb_model *m, const char *r, pb_run **o, char *e, size_t n) {
    (void)m; (void)r; (void)o; (void)e; (void)n; return PB_ERR_INTERNAL; }
static void run_execute(pb_run *r, const pb_event_sink *s) { (void)r; (void)s; }
static void run_cancel(pb_run *r) { (void)r; }
static void run_destroy(pb_run *r) { (void)r; }
static const pb_plugin_api api = { .struct_size = STRUCT_SIZE, .abi_major = PB_ABI_VERSION_MAJOR,
    .abi_minor = PB_ABI_VERSION_MINOR, .model_formats = "stub", .capabilities = PB_CAP_CHAT, TABLE };
PB_EXPORT const pb_plugin_api *pb_plugin_entry(const pb_host_api *host) { (void)host; return &api; }
""".replace("STRUCT_SIZE", struct_size).replace("TABLE", table)


def test_a_complete_stub_table_is_accepted(server):
    """The control for the refusals below: the same stubs, nothing missing, load."""
    library = build_plugin(server.plugin_dir, "stub", stub_plugin("stub"))
    status, plugin = server.post("/api/plugins/load", {"path": library})
    assert status == 200 and plugin["name"] == "stub", plugin


@pytest.mark.parametrize("size", ["8", "PB_PLUGIN_API_SIZE_1_0 - sizeof(void *)"])
def test_a_table_smaller_than_abi_1_0_is_refused(server, size):
    library = build_plugin(server.plugin_dir, "small", stub_plugin("small", struct_size=size))
    status, error = server.post("/api/plugins/load", {"path": library})
    assert status == 400, error
    message = error["error"]["message"]
    assert library in message and "smaller than ABI 1.0 requires" in message, message
    assert [p["name"] for p in server.get("/api/plugins")[1]["plugins"]] == ["reference"]
    assert library in {r["path"] for r in server.get("/api/plugins")[1]["refused"]}


@pytest.mark.parametrize("missing", REQUIRED)
def test_a_table_without_a_required_function_is_refused(server, missing):
    library = build_plugin(server.plugin_dir, f"no_{missing}", stub_plugin(f"no-{missing}", missing=missing))
    status, error = server.post("/api/plugins/load", {"path": library})
    assert status == 400, error
    assert "lacks a name or a required function" in error["error"]["message"], error
    assert [p["name"] for p in server.get("/api/plugins")[1]["plugins"]] == ["reference"]
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


def test_load_progress_moves_while_loading_and_ends_ready_at_one(server):
    (status, body), samples = watch_load(server, {"model_path": server.model_file("big", load_ms=1500)},
                                         interval=0.05)
    assert status == 200 and body["status"] == "loaded", body
    # 1.5 s of loading, reported every 10 ms and polled every 50 ms: a bar that moves smoothly.
    check_load_progress(server, samples, distinct=10)


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


def test_unload_with_active_generation_is_409_unless_forced(server, workdir):
    stats = workdir / "slow.stats"
    server.load("slow", repeat=1, token_delay_ms=10, stats_file=stats)
    chat = start_thread(server.post, "/v1/chat/completions",
                        {"model": "slow", "messages": [{"role": "user", "content": "go"}]})
    wait_for_stats(stats, active_runs=1)
    assert server.post("/api/inference/unload", {"model_path": "slow"})[0] == 409
    assert read_stats(stats)["active_runs"] == 1  # the refused unload left the run alone
    assert server.post("/api/inference/unload", {"model_path": "slow", "force_cancel_active": True})[0] == 200
    status, body = chat.join(10)
    assert status == 200 and body["choices"][0]["finish_reason"] == "stop", body
    assert read_stats(stats)["active_runs"] == 0
    engine_stays_stopped(stats)


def test_sigterm_drains_then_cancels_and_exits(workdir):
    server = Server(workdir, extra_args=["--shutdown-grace-seconds", "1"])
    try:
        stats = workdir / "slow.stats"
        server.load("slow", repeat=1, token_delay_ms=10, stats_file=stats)
        chat = start_thread(server.post, "/v1/chat/completions",
                            {"model": "slow", "messages": [{"role": "user", "content": "go"}]})
        wait_for_stats(stats, active_runs=1)
        started = time.time()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=15) == 0
        assert time.time() - started < 8
        status, body = chat.join(5)
        assert status == 200 and body["choices"][0]["finish_reason"] == "stop"
        assert "cancelled generations" in server.log_text()
        # The engine stopped the run when the grace was over; it would have gone on for minutes.
        stats = read_stats(stats)
        assert stats["active_runs"] == 0 and stats["produced_tokens"] < 500, stats
    finally:
        server.stop()  # it exited already: this checks that it exited 0 and logged no crash


def test_a_run_that_finishes_within_the_grace_period_is_not_cut(workdir):
    server = Server(workdir, extra_args=["--shutdown-grace-seconds", "30"])
    try:
        stats = workdir / "m.stats"
        server.load("m", reply="tick", repeat=1, token_delay_ms=50, stats_file=stats)
        chat = start_thread(server.post, "/v1/chat/completions",
                            {"model": "m", "max_tokens": 40, "messages": [{"role": "user", "content": "go"}]})
        wait_for(lambda: read_stats(stats)["produced_tokens"] >= 5, 10, "the engine to produce five tokens")
        started = time.time()
        server.process.send_signal(signal.SIGTERM)
        status, body = chat.join(20)
        # The whole answer, ended by max_tokens: the drain let it finish.
        assert status == 200 and body["choices"][0]["finish_reason"] == "length", body
        assert body["usage"]["completion_tokens"] == 40
        assert server.process.wait(timeout=15) == 0
        # It exited once the run was done, not at the end of the 30 s grace.
        assert time.time() - started < 10
        assert "cancelled generations" not in server.log_text()
        assert read_stats(stats) == {"produced_tokens": 40, "active_runs": 0}
    finally:
        server.stop()


def test_unload_during_load_cancels_the_load(server):
    path = server.model_file("huge", load_ms=20000)
    loader = start_thread(server.post, "/api/inference/load", {"model_path": path})
    wait_for(lambda: server.get("/api/inference/status")[1]["loading"] == ["huge"], 5, "the load to start")
    started = time.time()
    assert server.post("/api/inference/unload", {"model_path": "huge"})[0] == 200
    status, body = loader.join(5)
    assert time.time() - started < 2
    assert status == 409 and body["error"]["code"] == "load_cancelled"
    assert server.get("/api/inference/status")[1]["loaded"] == []
