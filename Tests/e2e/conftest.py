"""End-to-end fixtures: the real `patchbay` binary, real plugins, real HTTP clients.

What keeps a failure from disappearing:
- an engine test that would skip fails instead under PATCHBAY_REQUIRE_ENGINES=1, which
  scripts/test sets (a skip is allowed there only with the `optional_environment` marker);
- a thread started with `start_thread` hands its exception back on `join`; one the test
  did not join is joined at its teardown, and what it raised fails the test;
- every server must exit 0 on SIGTERM, leave no llama-server child behind and have no crash
  or sanitizer report in its log, checked when it is stopped (a test that kills one on
  purpose says so with `Server.kill`);
- every test has a timeout (pytest-timeout, see pytest.ini), and `wait_for` bounds a wait.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from llama_child import llama_children, wait_gone

ROOT = Path(__file__).resolve().parents[2]
BUILD_DIR = Path(os.environ.get("PATCHBAY_BUILD_DIR", ROOT / ".build" / "debug"))
BINARY = BUILD_DIR / "patchbay"
REFERENCE_PLUGIN = BUILD_DIR / "libPatchbayReferencePlugin.so"
LLAMA_PLUGIN = BUILD_DIR / "libPatchbayLlamaServerPlugin.so"
LIBLLAMA_PLUGIN = BUILD_DIR / "libPatchbayLibLlamaPlugin.so"
WHISPER_PLUGIN = BUILD_DIR / "libPatchbayWhisperPlugin.so"

# ─── Engines the set-up provides ──────────────────────────────────────────────────────

LLAMA_SERVER = os.environ.get("PATCHBAY_LLAMA_SERVER", "")
SMOLLM2 = os.environ.get("PATCHBAY_SMOLLM2", "")
# scripts/test sets it: then a test that would skip fails instead.
REQUIRE_ENGINES = os.environ.get("PATCHBAY_REQUIRE_ENGINES") == "1"

needs_llama = pytest.mark.skipif(
    not (SMOLLM2 and LLAMA_SERVER),
    reason="needs PATCHBAY_SMOLLM2 and PATCHBAY_LLAMA_SERVER (scripts/test sets them)")
needs_libllama = pytest.mark.skipif(
    not (SMOLLM2 and LIBLLAMA_PLUGIN.exists()),
    reason=f"needs PATCHBAY_SMOLLM2 and the in-process plugin {LIBLLAMA_PLUGIN.name} (scripts/test builds it)")
WHISPER_MODEL = os.environ.get("PATCHBAY_WHISPER_MODEL", "")
needs_whisper = pytest.mark.skipif(
    not (WHISPER_MODEL and WHISPER_PLUGIN.exists() and shutil.which("espeak-ng")),
    reason=f"needs PATCHBAY_WHISPER_MODEL, the plugin {WHISPER_PLUGIN.name} and espeak-ng (scripts/test provides them)")
# A real model on two CPU cores: its tests (and the shared host's set-up) need longer than
# pytest.ini's default timeout.
LLAMA_TIMEOUT = pytest.mark.timeout(300)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "optional_environment: this test may skip even under PATCHBAY_REQUIRE_ENGINES=1, for a "
                   "condition the set-up cannot provide (e.g. running as root)")
    if not config.pluginmanager.hasplugin("timeout"):
        raise pytest.UsageError("pytest-timeout is not installed: use the venv scripts/test prepares "
                                "(pip install -r Tests/e2e/requirements.txt)")


def _skip_reason(report) -> str:
    return report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Under PATCHBAY_REQUIRE_ENGINES=1 a skip is a failure: the set-up promised the engines."""
    report = yield
    if (REQUIRE_ENGINES and report.skipped and not hasattr(report, "wasxfail")
            and not item.get_closest_marker("optional_environment")):
        report.outcome = "failed"
        report.longrepr = f"skipped, but PATCHBAY_REQUIRE_ENGINES=1 forbids skips: {_skip_reason(report)}"
    if report.failed:
        item.failed_already = True  # for teardown checks that would only repeat the failure
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module that skips itself while being collected."""
    report = yield
    if REQUIRE_ENGINES and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped, but PATCHBAY_REQUIRE_ENGINES=1 forbids skips: {_skip_reason(report)}"
    return report


# ─── Waiting with a deadline ──────────────────────────────────────────────────────────

def wait_for(predicate, timeout: float, message="condition", interval: float = 0.02):
    """Polls `predicate` until it returns something truthy, which is returned; fails after
    `timeout` s, saying what it waited for (`message`, or a function that tells it then)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            what = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def recv_until(sock: socket.socket, marker: bytes, timeout: float, received: bytes = b"") -> bytes:
    """Reads until `marker` has arrived; returns everything read. Fails after `timeout` s, or if
    the peer closes first."""
    deadline = time.monotonic() + timeout
    while marker not in received:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{marker!r} did not arrive within {timeout} s; got {received[-300:]!r}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            chunk = None
        if chunk is None:
            raise AssertionError(f"{marker!r} did not arrive within {timeout} s; got {received[-300:]!r}")
        if not chunk:
            raise AssertionError(f"the connection closed before {marker!r}; got {received[-300:]!r}")
        received += chunk
    return received


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the peer sends until it closes the connection; fails after `timeout` s."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the connection was still open after {timeout} s; got {data[-300:]!r}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            raise AssertionError(f"the connection was still open after {timeout} s; got {data[-300:]!r}") from None
        if not chunk:
            return data
        data += chunk


# ─── Threads that hand their exception back ───────────────────────────────────────────

class Worker(threading.Thread):
    """A thread that keeps what its function returned or raised: `join` returns the one
    or re-raises the other, and fails if the thread is still running at its deadline."""

    started: list["Worker"] = []  # this test's workers, checked at its teardown

    def __init__(self, fn, *args, **kwargs):
        super().__init__(daemon=True, name=getattr(fn, "__name__", "worker"))
        self._call = lambda: fn(*args, **kwargs)
        self.value = None
        self.error: BaseException | None = None
        self.joined = False

    def run(self):
        try:
            self.value = self._call()
        except BaseException as error:  # noqa: BLE001 - handed to whoever joins
            self.error = error

    def join(self, timeout: float = 30):
        super().join(timeout)
        if self.is_alive():
            raise AssertionError(f"thread {self.name!r} still running after {timeout} s")
        self.joined = True
        if self.error is not None:
            raise self.error
        return self.value


def start_thread(fn, *args, **kwargs) -> Worker:
    """Runs fn(*args, **kwargs) on a Worker; `join()` gives its result or raises its exception."""
    worker = Worker(fn, *args, **kwargs)
    Worker.started.append(worker)
    worker.start()
    return worker


@pytest.fixture(autouse=True)
def workers_are_joined(request):
    """A thread's failure may not vanish because the test never looked at it: a worker the
    test did not join is joined here, and what it raised fails the test (unless the test
    failed already, which then says more)."""
    Worker.started.clear()
    yield
    workers, Worker.started[:] = list(Worker.started), []
    for worker in workers:
        if worker.joined:
            continue
        try:
            worker.join(10)  # raises what the thread raised, or fails if it still runs
        except BaseException:
            if not getattr(request.node, "failed_already", False):
                raise


# ─── The server ───────────────────────────────────────────────────────────────────────

# What a crash, an abort or a sanitizer leaves in a log (the Swift runtime, its
# backtracer, glibc, the sanitizers, the C++ runtime).
CRASH_REPORT = re.compile(
    r"Fatal error|Program crashed|Thread \d+ crashed|Current stack trace|Segmentation fault|Bus error|"
    r"Illegal instruction|\bAborted\b|core dumped|[A-Za-z]+Sanitizer|runtime error:|stack smashing|"
    r"double free|free\(\): invalid|malloc\(\): |corrupted (size|double-linked)|terminate called|"
    r"Assertion .* failed|\bpanic", re.IGNORECASE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One running `patchbay serve` process and a tiny JSON client for it."""

    def __init__(self, workdir: Path, extra_args=(), plugins=(REFERENCE_PLUGIN,)):
        self.workdir = workdir
        self.plugin_dir = workdir / "plugins"
        self.plugin_dir.mkdir(parents=True, exist_ok=True)
        for plugin in plugins:
            os.symlink(plugin, self.plugin_dir / Path(plugin).name)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "server.log"
        self.killed = False  # the test killed it on purpose: no exit check
        self.stopped = False
        self.cleanup = lambda: None
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [str(BINARY), "serve", "--port", str(self.port), "--plugin-dir", str(self.plugin_dir), *extra_args],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if self.get("/health", timeout=2)[0] == 200:
                    return
            except OSError:
                time.sleep(0.05)
        self.process.kill()
        self.process.wait(10)
        raise RuntimeError(f"patchbay did not start (exit {self.process.returncode}):\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, method, path, body=None, headers=None, raw=None, timeout=60):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def openai(self, **kw):
        import openai
        return openai.OpenAI(**{"base_url": self.base + "/v1", "api_key": "unused", "max_retries": 0,
                                "timeout": 60, **kw})

    def anthropic(self, **kw):
        import anthropic
        return anthropic.Anthropic(**{"base_url": self.base, "api_key": "unused", "max_retries": 0,
                                      "timeout": 60, **kw})

    def model_file(self, name: str, **settings) -> str:
        """Writes a reference-engine model (see Tests/ScriptedPlugin/reference_plugin.c) and returns its path."""
        path = self.workdir / f"{name}.ref"
        path.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        return str(path)

    def load(self, name: str, **settings) -> dict:
        status, body = self.post("/api/inference/load", {"model_path": self.model_file(name, **settings)})
        assert status == 200, body
        return body

    def active_generations(self) -> int:
        return self.get("/api/inference/status")[1]["active_generations"]

    def wait_idle(self, timeout=5.0):
        deadline = time.monotonic() + timeout
        while self.active_generations() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.active_generations()

    def kill(self):
        """SIGKILL, on purpose: the exit is then not checked."""
        self.killed = True
        self.process.kill()
        self.process.wait(10)

    def stop(self, timeout: float = 30):
        """SIGTERM (unless the process already ended), then checks that it exited 0 within
        `timeout`, took its llama-server children with it, and logged no crash."""
        if self.stopped:
            return
        self.stopped = True
        children = [child.pid for child in llama_children(self.process.pid)]
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                raise AssertionError(f"patchbay did not exit within {timeout} s of SIGTERM:\n{self.log_tail()}")
        left = [pid for pid in children if not wait_gone(pid, timeout=10)]
        if self.killed:
            return
        code = self.process.returncode
        assert code == 0, (f"patchbay exited with {describe_exit(code)} instead of 0:\n{self.log_tail()}")
        assert not left, f"llama-server children {left} outlived patchbay"
        check_log_is_clean(self.log_text())

    def log_tail(self, size=4000) -> str:
        return self.log_text()[-size:]


def describe_exit(code: int) -> str:
    if code is not None and code < 0:
        return f"signal {-code} ({signal.Signals(-code).name})"
    return f"exit status {code}"


def check_log_is_clean(log: str):
    """Fails on any crash, abort or sanitizer report in a server's log."""
    for line in log.splitlines():
        if CRASH_REPORT.search(line):
            lines = log.splitlines()
            at = lines.index(line)
            context = "\n".join(lines[max(0, at - 10):at + 30])
            raise AssertionError(f"the server's log has a crash report:\n{context}")


def start_server(plugins, prefix: str = "patchbay-e2e-", **kwargs) -> Server:
    """A server in a work directory of its own, for tests that start and stop it themselves;
    end it with stop_and_clean_up."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    server = Server(workdir, plugins=plugins, **kwargs)
    server.cleanup = lambda: shutil.rmtree(workdir, ignore_errors=True)
    return server


def stop_and_clean_up(server: Server):
    """Stops the host, checking its exit (Server.stop), then removes its work directory."""
    try:
        server.stop()
    finally:
        server.cleanup()


@pytest.fixture
def workdir():
    path = Path(tempfile.mkdtemp(prefix="patchbay-e2e-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server(workdir):
    s = Server(workdir)
    yield s
    s.stop()


@pytest.fixture
def openai_client(server):
    return server.openai()


def read_stats(path) -> dict:
    """The reference engine's own counters (written by the plugin, not the host)."""
    text = Path(path).read_text()
    return {k: int(v) for k, v in (line.split("=") for line in text.split())}


def wait_for_stats(path, timeout: float = 5, **expected) -> dict:
    """Waits until the engine's counters show `expected` (e.g. active_runs=0); returns them."""
    def matches():
        stats = read_stats(path)
        return stats if all(stats.get(key) == value for key, value in expected.items()) else None
    return wait_for(matches, timeout, lambda: f"the engine's stats to show {expected} (they say {read_stats(path)})")


def engine_stays_stopped(path, settle: float = 0.5) -> dict:
    """The engine's counters after `settle` s, checked unchanged: nothing decodes any more."""
    before = read_stats(path)
    time.sleep(settle)
    after = read_stats(path)
    assert after == before, f"the engine kept working: {before} -> {after}"
    return after


# ─── Load progress ────────────────────────────────────────────────────────────────────

def watch_load(server: Server, body: dict, timeout: float = 120, interval: float = 0.005):
    """Loads a model on a worker thread while polling /api/inference/load-progress.
    Returns ((status, body) of the load, every progress sample seen while it ran)."""
    loader = start_thread(server.post, "/api/inference/load", body, timeout=timeout)
    samples = []
    deadline = time.monotonic() + timeout
    while loader.is_alive():
        assert time.monotonic() < deadline, f"the load took over {timeout} s"
        samples.append(server.get("/api/inference/load-progress")[1])
        time.sleep(interval)
    return loader.join(), samples


def check_load_progress(server: Server, samples: list, distinct: int):
    """What a progress bar needs: at least `distinct` different fractions between 0 and 1 while
    loading (a bar that moves), and `ready` at 1.0 once loaded."""
    moving = {s["fraction"] for s in samples if s["phase"] not in (None, "ready") and 0 < s["fraction"] < 1}
    assert len(moving) >= distinct, f"a progress bar would not move: {sorted(moving)} in {samples}"
    assert all(s["fraction"] == 1.0 for s in samples if s["phase"] == "ready"), samples
    final = server.get("/api/inference/load-progress")[1]
    assert final["phase"] == "ready" and final["fraction"] == 1.0, final
