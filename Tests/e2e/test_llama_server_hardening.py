"""The llama-server backend's protective defaults, end to end with the real llama-server, the
real SmolLM2 and the real `patchbay` binary: what a load request may ask of the child (an
allowlist of tuning flags, never the executable), the child's filtered environment and
private Unix socket, load failures told briefly to the client and fully to the log, a
respawn that a cancel or an unload does not wait for and that backs off when the child keeps
dying, a projector matched to its model, a bounded default context, and max_tokens at the
edge of Int64."""
import json
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

import test_llama_server
from conftest import Server, start_thread, wait_for
from llama_child import host_children, is_running, llama_children, wait_gone
from test_llama_server import (CAPITAL, GREEDY, LONG_ANSWER, SMOLLM2, load_smollm2, start_server, stop_and_clean_up,
                               the_child)
from test_llama_server import llama  # noqa: F401 - the shared SmolLM2 host fixture

pytestmark = test_llama_server.pytestmark
INT64_MAX = 9223372036854775807


@pytest.fixture
def server():
    s = start_server()
    try:
        yield s
    finally:
        stop_and_clean_up(s)


@pytest.fixture
def scratch():
    path = Path(tempfile.mkdtemp(prefix="patchbay-hardening-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def kill_child(pid: int):
    """SIGKILL, then wait until only the zombie is left: while any of its threads is still
    exiting, its parent cannot reap it, and the plugin would find it alive."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            threads = len(list(Path(f"/proc/{pid}/task").iterdir()))
        except OSError:
            return  # reaped already
        if threads <= 1 and not is_running(pid):
            return
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} did not die")


def log_text(server: Server) -> str:
    return server.log_path.read_text()


# ─── llama_extra_args: an allowlist ─────────────────────────────────────────

@pytest.mark.parametrize("args", [
    ["-mm", "/tmp/x.gguf"], ["--mmproj", "/tmp/x.gguf"], ["-mmu", "http://example.com/p.gguf"],
    ["-md", "/tmp/draft.gguf"], ["--lora", "/tmp/l.gguf"], ["--control-vector", "/tmp/v.gguf"],
    ["--grammar-file", "/etc/passwd"], ["-f", "/etc/passwd"], ["--rpc", "10.0.0.1:50052"],
    ["-lv", "5"], ["--log-file", "/tmp/llama.log"], ["--log_file", "/tmp/llama.log"],
    ["--slot-save-path", "/tmp"], ["--chat-template-file", "/etc/passwd"], ["--hf-repo", "a/b"],
    ["-hf", "a/b"], ["--model-url", "http://example.com/m.gguf"], ["--api-key-file=/etc/passwd"],
    ["--media-path", "/"], ["--port", "1"], ["--host", "0.0.0.0"], ["--webui"], ["--props"],
    ["--models-dir", "/"], ["-v"],
])
def test_extra_args_outside_the_allowlist_are_a_400_naming_the_flag(llama, args):  # noqa: F811
    status, body = llama.post("/api/inference/load", {"model_path": SMOLLM2, "alias": "refused",
                                                      "llama_extra_args": args})
    assert status == 400, body
    flag = args[0].split("=")[0].replace("_", "-") if args[0].startswith("--") else args[0]
    assert flag in body["error"]["message"]
    assert len(llama_children(llama.process.pid)) == 1  # the shared model's child only


def test_a_value_cannot_smuggle_a_flag(llama):  # noqa: F811
    # --temp takes the next element as its value, as llama-server does: "--log-file" is a (bad)
    # temperature, and the path after it stands where a flag should be.
    status, body = llama.post("/api/inference/load", {
        "model_path": SMOLLM2, "alias": "smuggled", "llama_extra_args": ["--temp", "--log-file", "/tmp/evil.log"]})
    assert status == 400, body
    assert "/tmp/evil.log" in body["error"]["message"]
    status, body = llama.post("/api/inference/load", {"model_path": SMOLLM2, "alias": "no-value",
                                                      "llama_extra_args": ["--temp"]})
    assert status == 400, body
    assert "--temp" in body["error"]["message"]


def test_a_flag_a_load_field_sets_points_at_the_field(llama):  # noqa: F811
    for flag, field in (("-c", "max_seq_length"), ("--threads", "n_threads"), ("-ctk", "cache_type_kv")):
        status, body = llama.post("/api/inference/load", {"model_path": SMOLLM2, "alias": "field",
                                                          "llama_extra_args": [flag, "1"]})
        assert status == 400, body
        assert flag in body["error"]["message"] and field in body["error"]["message"]


def test_tuning_flags_pass_in_every_spelling(server):
    load_smollm2(server, llama_extra_args=["-fa", "off", "--temp=0.5", "--threads_batch", "2", "-ngl", "0",
                                           "--no-warmup"])
    args = the_child(server).args
    for flag, value in (("-fa", "off"), ("--temp", "0.5"), ("--threads-batch", "2"), ("-ngl", "0")):
        assert args[args.index(flag) + 1] == value, args
    assert "--no-warmup" in args
    status, body = server.post("/v1/chat/completions", {"messages": CAPITAL, "max_tokens": 8, **GREEDY})
    assert status == 200, body


# ─── The executable is the operator's choice ────────────────────────────────

def test_a_load_may_not_choose_the_executable(llama):  # noqa: F811
    status, body = llama.post("/api/inference/load", {
        "model_path": SMOLLM2, "alias": "own-binary", "llama_server_path": os.environ["PATCHBAY_LLAMA_SERVER"]})
    assert status == 400, body
    message = body["error"]["message"]
    assert "llama_server_path" in message and "PATCHBAY_LLAMA_SERVER" in message
    assert len(llama_children(llama.process.pid)) == 1


# ─── The child's environment ────────────────────────────────────────────────

def test_the_child_gets_a_filtered_environment(monkeypatch):
    monkeypatch.setenv("LLAMA_API_KEY", "wrong")
    monkeypatch.setenv("LLAMA_ARG_CTX_SIZE", "64")
    monkeypatch.setenv("LLAMA_ARG_N_PREDICT", "1")
    monkeypatch.setenv("PATCHBAY_TEST_SECRET", "hush")
    server = start_server()
    try:
        load_smollm2(server)
        status, body = server.post("/v1/chat/completions", {"messages": CAPITAL, "max_tokens": 32, **GREEDY})
        assert status == 200, body
        assert "Paris" in body["choices"][0]["message"]["content"]
        child = the_child(server)
        raw = Path(f"/proc/{child.pid}/environ").read_bytes().split(b"\0")
        names = [entry.split(b"=", 1)[0].decode() for entry in raw if entry]
        assert names.count("LLAMA_API_KEY") == 1
        assert child.environ["LLAMA_API_KEY"] not in ("wrong", "")
        assert not [n for n in names if n.startswith(("LLAMA_ARG_", "PATCHBAY_"))], names
        assert "PATH" in names and "HOME" in names
        assert child.get("/props")["default_generation_settings"]["n_ctx"] == 8192
    finally:
        stop_and_clean_up(server)


# ─── The child's channel: a Unix socket in a 0700 directory ─────────────────

def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def tcp_listeners(pid: int) -> list[str]:
    """The local addresses `pid` listens on over TCP (hex, as /proc/net/tcp* writes them)."""
    inodes = socket_inodes(pid)
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                found.append(fields[1])
    return found


def unix_paths(pid: int) -> set[str]:
    inodes = socket_inodes(pid)
    return {fields[7] for fields in (line.split() for line in Path("/proc/net/unix").read_text().splitlines()[1:])
            if len(fields) > 7 and fields[6] in inodes}


def test_the_child_listens_on_no_tcp_port(llama):  # noqa: F811
    child = the_child(llama)
    assert tcp_listeners(child.pid) == []
    assert child.socket_path in unix_paths(child.pid)
    work_dir = Path(child.socket_path).parent
    assert work_dir.stat().st_mode & 0o777 == 0o700 and work_dir.stat().st_uid == os.getuid()
    # Everything goes through the socket: chat, raw completion, token counting, embeddings.
    status, body = llama.post("/v1/chat/completions", {"messages": CAPITAL, "max_tokens": 16, **GREEDY})
    assert status == 200 and "Paris" in body["choices"][0]["message"]["content"], body
    status, body = llama.post("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 4})
    assert status == 200, body
    status, body = llama.post("/v1/messages/count_tokens", {"model": "default", "messages": CAPITAL[1:]})
    assert status == 200 and body["input_tokens"] > 5, body
    load_smollm2(llama, alias="smol-embed", embedding=True)
    try:
        status, body = llama.post("/v1/embeddings", {"model": "smol-embed", "input": "bread"})
        assert status == 200 and len(body["data"][0]["embedding"]) == 576, body
        for pid in (c.pid for c in llama_children(llama.process.pid)):
            assert tcp_listeners(pid) == []
    finally:
        llama.post("/api/inference/unload", {"model_path": "smol-embed", "force_cancel_active": True})


@pytest.mark.optional_environment  # a set-up that does not run as root cannot provide it
@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3").exists(), reason="needs root to be another user")
def test_another_user_cannot_reach_the_socket(llama):  # noqa: F811
    child = the_child(llama)
    probe = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"
    result = subprocess.run(["/usr/bin/python3", "-c", probe, child.socket_path], user=65534, group=65534,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "PermissionError" in result.stderr, result.stderr


# ─── Load failures: a summary for the client, the child's log for the operator ─

def test_a_failed_load_tells_the_client_briefly_and_the_log_fully(server):
    status, body = server.post("/api/inference/load", {"model_path": SMOLLM2,
                                                       "llama_extra_args": ["--flash-attn", "sideways"]})
    assert status == 500, body
    message = body["error"]["message"]
    assert "exited during load" in message and "Patchbay's log" in message
    assert "sideways" not in message and "\n" not in message
    log = log_text(server)
    assert "llama-server: " in log and "sideways" in log  # the child's own words, in the host's log
    assert llama_children(server.process.pid) == []


SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

/* getrandom that fails for the llama-server plugin alone: the host's own randomness still works. */
ssize_t getrandom(void *buffer, size_t length, unsigned int flags) {
    Dl_info info;
    if (dladdr(__builtin_return_address(0), &info) && info.dli_fname && strstr(info.dli_fname, "LlamaServerPlugin")) {
        errno = EIO;
        return -1;
    }
    return syscall(SYS_getrandom, buffer, length, flags);
}
"""


@pytest.mark.skipif(not shutil.which("cc"), reason="needs a C compiler for the getrandom shim")
def test_no_randomness_fails_the_load(monkeypatch, scratch):
    source = scratch / "shim.c"
    source.write_text(SHIM)
    shim = scratch / "libnorandom.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(shim), str(source), "-ldl"], check=True)
    monkeypatch.setenv("LD_PRELOAD", str(shim))
    server = start_server()
    try:
        status, body = server.post("/api/inference/load", {"model_path": SMOLLM2})
        assert status == 500, body
        assert "random" in body["error"]["message"]
        assert llama_children(server.process.pid) == []
    finally:
        stop_and_clean_up(server)


# ─── Respawn: cancellable, never in anyone's way, backing off ───────────────

def slow_respawn_binary(directory: Path) -> tuple[Path, Path]:
    """A llama-server that, once the returned flag file exists, starts and never becomes ready
    (a load that takes forever), until it is killed."""
    flag = directory / "hang"
    binary = directory / "bin" / "llama-server"
    binary.parent.mkdir()
    binary.write_text(f"#!/bin/sh\nif [ -e '{flag}' ]; then exec sleep 600; fi\n"
                      f"exec '{os.environ['PATCHBAY_LLAMA_SERVER']}' \"$@\"\n")
    binary.chmod(0o755)
    return binary, flag


def hanging_children(server: Server) -> list[int]:
    return [pid for pid, argv in host_children(server.process.pid) if argv[:1] == ["sleep"]]


def kill_into_a_slow_respawn(server: Server, flag: Path):
    flag.touch()
    kill_child(the_child(server).pid)


def stream_in_background(server: Server, cancel_id: str):
    """A stream on a worker thread; join() returns how it ended: (text, finish reason), or
    the error the SDK raised (an unload may end it with one)."""
    client = server.openai(timeout=300)

    def consume():
        text, finish = "", None
        try:
            for chunk in client.chat.completions.create(model="default", messages=LONG_ANSWER, max_tokens=50,
                                                        stream=True, extra_body={"cancel_id": cancel_id}, **GREEDY):
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
        except openai.APIError as error:
            return error
        return text, finish

    return start_thread(consume)


def test_a_cancel_during_a_respawn_returns_promptly(monkeypatch, scratch):
    binary, flag = slow_respawn_binary(scratch)
    monkeypatch.setenv("PATCHBAY_LLAMA_SERVER", str(binary))
    server = start_server()
    try:
        load_smollm2(server, load_timeout_s=300)
        kill_into_a_slow_respawn(server, flag)
        stream = stream_in_background(server, "respawn-cancel")
        wait_for(lambda: hanging_children(server), 10, "a respawn to start")
        time.sleep(0.5)
        assert stream.is_alive(), "the stream did not wait for the respawn"
        # Other work on the host goes on meanwhile.
        assert server.get("/api/inference/status")[0] == 200
        sent = time.perf_counter()
        status, body = server.post("/api/inference/cancel", {"cancel_id": "respawn-cancel"})
        assert status == 200 and body["cancelled"] == 1, body
        # The run waited for the respawn; the cancel ends it at once, cleanly.
        assert stream.join(5) == ("", "stop"), "the run waited for the respawn after its cancel"
        assert time.perf_counter() - sent < 2.0
        assert server.wait_idle() == 0
        # The respawn goes on without the run; an unload stops it at once.
        [hanging] = hanging_children(server)
        sent = time.perf_counter()
        status, body = server.post("/api/inference/unload", {"model_path": SMOLLM2})
        assert status == 200, body
        assert time.perf_counter() - sent < 3.0
        assert wait_gone(hanging, timeout=2)
    finally:
        stop_and_clean_up(server)


def test_an_unload_during_a_respawn_returns_promptly(monkeypatch, scratch):
    binary, flag = slow_respawn_binary(scratch)
    monkeypatch.setenv("PATCHBAY_LLAMA_SERVER", str(binary))
    server = start_server()
    try:
        load_smollm2(server, load_timeout_s=300)
        kill_into_a_slow_respawn(server, flag)
        stream = stream_in_background(server, "respawn-unload")
        wait_for(lambda: hanging_children(server), 10, "a respawn to start")
        [hanging] = hanging_children(server)
        sent = time.perf_counter()
        status, body = server.post("/api/inference/unload", {"model_path": SMOLLM2, "force_cancel_active": True})
        assert status == 200, body
        assert time.perf_counter() - sent < 3.0, "the unload waited for the respawn"
        assert stream.join(5) == ("", "stop")  # the unload cancelled the waiting run: a clean end
        assert wait_gone(hanging, timeout=2)
        assert host_children(server.process.pid) == []
    finally:
        stop_and_clean_up(server)


def ask(server: Server) -> tuple[int, dict, float]:
    start = time.perf_counter()
    status, body = server.post("/v1/chat/completions", {"messages": CAPITAL, "max_tokens": 4, **GREEDY})
    return status, body, time.perf_counter() - start


def test_a_child_that_keeps_dying_is_refused_quickly_then_retried(server):
    load_smollm2(server)
    for _ in range(2):  # two young deaths: each respawned by the next request
        kill_child(the_child(server).pid)
        status, body, _ = ask(server)
        assert status == 200, body
    kill_child(the_child(server).pid)
    for _ in range(2):  # the third: no respawn for a while, and the refusal is quick
        status, body, took = ask(server)
        assert status == 503 and body["error"]["code"] == "engine_unavailable", body
        assert "keeps exiting" in body["error"]["message"]
        assert took < 1.0
        assert llama_children(server.process.pid) == []
    assert "died 3 times in a row" in log_text(server)
    # The client is told when to come back.
    request = urllib.request.Request(server.base + "/v1/chat/completions", method="POST",
                                     data=json.dumps({"messages": CAPITAL, "max_tokens": 4}).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 503 and 1 <= int(refused.value.headers["Retry-After"]) <= 5
    time.sleep(5.5)  # the first backoff
    status, body, _ = ask(server)
    assert status == 200, body
    # Young again: the next death backs off at once, for longer.
    kill_child(the_child(server).pid)
    status, body, took = ask(server)
    assert status == 503 and "again in 10 s" in body["error"]["message"], body


# ─── The projector beside a model ───────────────────────────────────────────

def fake_projector(path: Path):
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))


def test_a_shared_folder_does_not_lend_one_model_another_ones_projector(llama, scratch):  # noqa: F811
    for name in ("a.gguf", "b.gguf"):
        (scratch / name).symlink_to(SMOLLM2)
    fake_projector(scratch / "mmproj-b.gguf")
    status, body = llama.post("/api/inference/load", {"model_path": str(scratch / "a.gguf"), "alias": "model-a"})
    assert status == 200, body  # b's projector was not taken
    try:
        assert body["is_vision"] is False
        [child] = [c for c in llama_children(llama.process.pid) if c.args[c.args.index("--model") + 1].endswith("/a.gguf")]
        assert "--mmproj" not in child.args
        assert f"no vision projector for {scratch / 'a.gguf'}" in log_text(llama)
    finally:
        llama.post("/api/inference/unload", {"model_path": "model-a", "force_cancel_active": True})
    # b's own, by name (the fake projector then fails the load: what matters is which was chosen).
    llama.post("/api/inference/load", {"model_path": str(scratch / "b.gguf"), "alias": "model-b"})
    assert f"vision projector for {scratch / 'b.gguf'}: {scratch / 'mmproj-b.gguf'}" in log_text(llama)


def test_the_only_projector_beside_the_only_model_is_taken(llama, scratch):  # noqa: F811
    (scratch / "c.gguf").symlink_to(SMOLLM2)
    fake_projector(scratch / "mmproj-F16.gguf")
    llama.post("/api/inference/load", {"model_path": str(scratch / "c.gguf"), "alias": "model-c"})
    assert f"vision projector for {scratch / 'c.gguf'}: {scratch / 'mmproj-F16.gguf'}" in log_text(llama)


# ─── The default context ────────────────────────────────────────────────────

def with_training_context(scratch: Path, context: int) -> Path:
    """A copy of SmolLM2 whose metadata says it was trained on `context` tokens."""
    path = scratch / f"smollm2-ctx{context}.gguf"
    shutil.copyfile(SMOLLM2, path)
    with open(path, "r+b") as f:
        head = f.read(1 << 16)
        key = b"llama.context_length"
        at = head.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
        assert struct.unpack_from("<I", head, at)[0] == 4  # a u32
        f.seek(at + 4)
        f.write(struct.pack("<I", context))
    return path


def load_copy(server: Server, path: Path, **fields) -> dict:
    status, body = server.post("/api/inference/load", {"model_path": str(path), "alias": path.stem, **fields})
    assert status == 200, body
    [child] = [c for c in llama_children(server.process.pid) if c.args[c.args.index("--model") + 1] == str(path)]
    return {**body, "ctx_arg": int(child.args[child.args.index("--ctx-size") + 1])}


def test_the_default_context_is_the_training_context_at_most_8192(server, scratch):
    loaded = load_smollm2(server)
    assert loaded["context_length"] == 8192 and loaded["training_context_length"] == 8192
    long_trained = load_copy(server, with_training_context(scratch, 32768))
    assert long_trained["ctx_arg"] == 8192 and long_trained["context_length"] == 8192
    assert long_trained["training_context_length"] == 32768
    short_trained = load_copy(server, with_training_context(scratch, 2048))
    assert short_trained["ctx_arg"] == 2048 and short_trained["context_length"] == 2048
    status, models = server.get("/v1/models")
    contexts = {m["id"]: m["context_length"] for m in models["data"]}
    assert contexts["smollm2-ctx32768"] == 8192 and contexts["smollm2-ctx2048"] == 2048
    server.post("/api/inference/unload", {"model_path": "smollm2-ctx32768", "force_cancel_active": True})
    chosen = load_copy(server, scratch / "smollm2-ctx32768.gguf", max_seq_length=12288)
    assert chosen["ctx_arg"] == 12288 and chosen["context_length"] == 12288


# ─── max_tokens at the edge of Int64 ─────────────────────────────────────────

def test_max_tokens_near_int64_max_is_a_normal_answer_on_both_plugins(server):
    server.load("ref", reply="Hello from the reference engine.")
    status, body = server.post("/v1/chat/completions", {"model": "ref", "max_tokens": INT64_MAX,
                                                        "messages": [{"role": "user", "content": "Hi"}]})
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "Hello from the reference engine."
    assert body["choices"][0]["finish_reason"] == "stop"
    load_smollm2(server)
    status, body = server.post("/v1/chat/completions", {"model": "SmolLM2-135M-Instruct.Q4_1", "messages": CAPITAL,
                                                        "max_tokens": INT64_MAX, **GREEDY})
    assert status == 200, body
    assert "Paris" in body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert server.process.poll() is None
