"""End-to-end fixtures: the real `patchbay` binary, real plugins, real HTTP clients."""
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_DIR = Path(os.environ.get("PATCHBAY_BUILD_DIR", ROOT / ".build" / "debug"))
BINARY = BUILD_DIR / "patchbay"
REFERENCE_PLUGIN = BUILD_DIR / "libPatchbayReferencePlugin.so"


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
        self.process = subprocess.Popen(
            [str(BINARY), "serve", "--port", str(self.port), "--plugin-dir", str(self.plugin_dir), *extra_args],
            stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"patchbay did not start:\n{self.log_path.read_text()}")

    def request(self, method, path, body=None, headers=None, raw=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def model_file(self, name: str, **settings) -> str:
        """Writes a reference-engine model (see Examples/ReferencePlugin) and returns its path."""
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
        deadline = time.time() + timeout
        while self.active_generations() and time.time() < deadline:
            time.sleep(0.02)
        return self.active_generations()

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


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
    import openai
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)


def read_stats(path: str) -> dict:
    """The reference engine's own counters (written by the plugin, not the host)."""
    text = Path(path).read_text()
    return {k: int(v) for k, v in (line.split("=") for line in text.split())}
