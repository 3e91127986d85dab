"""What Benchmarks/fuzz.py and Benchmarks/soak.py share: a private copy of the real
`patchbay` binary and the reference plugin, started on 127.0.0.1 with reference models,
a raw HTTP/1.1 client over plain sockets (keep-alive, chunked bodies, incremental
reads), and resident-memory sampling from /proc.

Only the standard library is used. Nothing here talks to any address but 127.0.0.1.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import sys
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCALHOST = "127.0.0.1"


# ─── The build ──────────────────────────────────────────────────────────────

def build_dir(configuration: str = "debug") -> Path:
    """$PATCHBAY_BUILD_DIR, else `.build/<configuration>`, else `swift build --show-bin-path`."""
    if os.environ.get("PATCHBAY_BUILD_DIR"):
        return Path(os.environ["PATCHBAY_BUILD_DIR"]).resolve()
    candidate = ROOT / ".build" / configuration
    if (candidate / "patchbay").exists():
        return candidate.resolve()
    out = subprocess.run(["swift", "build", "-c", configuration, "--show-bin-path"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def choose_build_dir(given: str | None, needed: list[str], release_holds: str) -> tuple[Path, str, list[str]]:
    """`given` (--build-dir), else .build/release when it holds every file in `needed`, else
    .build/debug. Returns the folder, why it was chosen (`release_holds` says what release has),
    and which of `needed` the folder lacks."""
    def missing(path: Path) -> list[str]:
        return [name for name in needed if not (path / name).exists()]
    if given:
        path, why = Path(given).resolve(), "--build-dir"
    else:
        release, debug = ROOT / ".build" / "release", ROOT / ".build" / "debug"
        if not missing(release):
            path, why = release.resolve(), f"release: it has {release_holds}"
        else:
            path, why = debug.resolve(), f"debug: release lacks {', '.join(missing(release))}"
    return path, why, missing(path)


def check_local(host: str) -> str:
    """Refuses any target but 127.0.0.1 (no names, no other addresses)."""
    if host != LOCALHOST:
        raise SystemExit(f"refusing target {host!r}: these load generators only ever talk to {LOCALHOST}")
    return host


def parse_local_url(url: str) -> int:
    """`http://127.0.0.1:PORT` -> PORT; anything else is refused."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.path not in ("", "/") or parts.query or parts.username:
        raise SystemExit(f"refusing target {url!r}: expected http://{LOCALHOST}:PORT")
    check_local(parts.hostname or "")
    return parts.port or 80


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def fd_count(pid: int) -> int:
    """Open file descriptors of a process (sockets included); -1 when unreadable."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def socket_states(pid: int, port: int) -> dict:
    """TCP sockets of `pid` on `port` by state, from `ss` (empty when ss is missing)."""
    try:
        out = subprocess.run(["ss", "-tanp"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    states = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[3].endswith(f":{port}") and f"pid={pid}," in line and fields[0] != "LISTEN":
            states[fields[0]] = states.get(fields[0], 0) + 1
    return states


# ─── Engines, models and side-by-side rounds ──────────────────────────────────

CACHE = Path(os.environ.get("PATCHBAY_CACHE", Path.home() / ".cache" / "patchbay"))


def default_path(env: str, pattern: str) -> str:
    """$env, else the newest match of `pattern` in the engine cache that scripts/ fills."""
    if os.environ.get(env):
        return os.environ[env]
    found = sorted(CACHE.glob(pattern))
    if not found:
        sys.exit(f"{env} is not set and nothing matches {CACHE / pattern}; run scripts/test or scripts/run first")
    return str(found[-1])


def interleaved(sides, rounds):
    """(round, side) pairs: every round visits each side once, the first one alternating, so
    that a busy machine slows both sides alike."""
    for r in range(rounds):
        for side in (sides if r % 2 == 0 else list(reversed(sides))):
            yield r, side


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


class RssSampler(threading.Thread):
    """Samples a process's VmRSS every `interval` seconds; keeps the peak and the series."""

    def __init__(self, pid: int, interval: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.samples: list[tuple[float, int]] = []
        self._stop_event = threading.Event()

    def run(self):
        started = time.monotonic()
        while not self._stop_event.is_set():
            value = rss_kib(self.pid)
            self.peak = max(self.peak, value)
            self.samples.append((time.monotonic() - started, value))
            self._stop_event.wait(self.interval)

    def stop(self):
        self._stop_event.set()
        self.join(5)


# Clock ticks per second, the unit of /proc's CPU times.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def busy_ticks() -> int:
    """CPU time spent by the whole machine so far (all cores), in clock ticks."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal


def process_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return 0


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


# ─── The server ─────────────────────────────────────────────────────────────

class PatchbayServer:
    """A private copy of the binary and the reference plugin (so a concurrent rebuild cannot
    swap them underneath a long run), started on 127.0.0.1 with its log in the work folder."""

    def __init__(self, configuration="debug", extra_args=(), log_level="warning", keep=False, port=None, env=None):
        source = build_dir(configuration)
        self.source = source
        self.workdir = Path(tempfile.mkdtemp(prefix="patchbay-harness-"))
        self.keep = keep
        plugins = self.workdir / "plugins"
        plugins.mkdir()
        self.binary = self.workdir / "patchbay"
        shutil.copy2(source / "patchbay", self.binary)
        self.plugin = plugins / "libPatchbayReferencePlugin.so"
        shutil.copy2(source / "libPatchbayReferencePlugin.so", self.plugin)
        self.port = port or free_port()
        self.base = f"http://{LOCALHOST}:{self.port}"
        self.log_path = self.workdir / "server.log"
        self.env = dict(env or {})
        self.args = [str(self.binary), "serve", "--host", LOCALHOST, "--port", str(self.port),
                     "--plugin-dir", str(plugins), "--log-level", log_level, *extra_args]
        self.process = subprocess.Popen(self.args, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT,
                                        start_new_session=True, env={**os.environ, **(env or {})})
        self.pid = self.process.pid
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"patchbay exited at start ({self.process.returncode}):\n{self.log_tail()}")
            try:
                if request_json(self.port, "GET", "/health", timeout=1)[0] == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"patchbay did not start:\n{self.log_tail()}")

    def model_file(self, name: str, **settings) -> str:
        """Writes a reference-engine model file (see Tests/ScriptedPlugin/reference_plugin.c) and returns its path."""
        path = self.workdir / f"{name}.ref"
        path.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        return str(path)

    def load(self, name: str, **settings) -> dict:
        status, body = request_json(self.port, "POST", "/api/inference/load",
                                    {"model_path": self.model_file(name, **settings)}, timeout=60)
        if status != 200:
            raise RuntimeError(f"loading {name} failed: {status} {body}")
        return body

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss(self) -> int:
        return rss_kib(self.pid)

    def fds(self) -> int:
        return fd_count(self.pid)

    def sockets(self) -> dict:
        return socket_states(self.pid, self.port)

    def log_tail(self, lines=40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout=30) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` (and `self.killed` is set); returns the exit status."""
        self.killed = False
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.process.kill()
                self.process.wait()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return self.process.returncode


# ─── A raw HTTP/1.1 client ──────────────────────────────────────────────────

class NoResponse(Exception):
    """The server closed the connection before a complete status line and headers."""


class Truncated(Exception):
    """The connection ended inside a response body."""


class BodyOverLimit(Truncated):
    """A response body longer than the reader wants (the connection is then unusable)."""


class Connection:
    """One keep-alive connection to 127.0.0.1 with a buffered reader."""

    def __init__(self, port: int, timeout: float = 30.0, rcvbuf: int | None = None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)
        self.sock.connect((check_local(LOCALHOST), port))
        self.buf = bytearray()
        self.eof = False
        self.closed = False

    def settimeout(self, timeout):
        self.sock.settimeout(timeout)

    def send(self, data: bytes):
        self.sock.sendall(data)

    def _fill(self, want: int = 1 << 16) -> bool:
        if self.eof:
            return False
        data = self.sock.recv(max(want, 1 << 16))
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def readline(self, limit: int = 1 << 20) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                return line
            if len(self.buf) > limit:
                raise Truncated("line too long")
            if not self._fill():
                line = bytes(self.buf)
                self.buf.clear()
                return line

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill(n - len(self.buf)):
                raise Truncated(f"wanted {n} bytes, connection ended after {len(self.buf)}")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_some(self) -> bytes:
        """Whatever is buffered, else one recv (b"" at end of stream)."""
        if self.buf:
            out = bytes(self.buf)
            self.buf.clear()
            return out
        if self.eof:
            return b""
        data = self.sock.recv(1 << 16)
        if not data:
            self.eof = True
        return data

    def read_to_close(self, limit: int = 1 << 24) -> bytes:
        while len(self.buf) < limit and self._fill():
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def read_head(self):
        """Status line and headers of the next final (non-1xx) response.
        Returns (status, reason, headers as a list of (lower-case name, value), version)."""
        while True:
            line = self.readline(1 << 16)
            if not line:
                raise NoResponse("connection closed before a response")
            while line in (b"\r\n", b"\n"):  # tolerate stray empty lines between responses
                line = self.readline(1 << 16)
                if not line:
                    raise NoResponse("connection closed before a response")
            parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
                raise NoResponse(f"not an HTTP status line: {line[:80]!r}")
            version, status = parts[0], int(parts[1])
            reason = parts[2] if len(parts) > 2 else ""
            headers = []
            while True:
                h = self.readline(1 << 16)
                if not h:
                    raise NoResponse("connection closed inside the response headers")
                if h in (b"\r\n", b"\n"):
                    break
                name, _, value = h.decode("latin-1").partition(":")
                headers.append((name.strip().lower(), value.strip()))
            if 100 <= status < 200 and status != 101:
                continue
            return status, reason, headers, version

    def chunks(self):
        """Yields the payloads of a chunked body until its last chunk; raises Truncated."""
        while True:
            line = self.readline(1 << 12)
            if not line:
                raise Truncated("connection ended before a chunk size")
            size_text = line.split(b";")[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise Truncated(f"bad chunk size line {line[:40]!r}")
            if size == 0:
                while True:  # trailers
                    t = self.readline(1 << 12)
                    if t in (b"\r\n", b"\n", b""):
                        return
            data = self.read_exact(size)
            self.read_exact(2)
            yield data

    def close(self, reset: bool = False):
        if self.closed:
            return
        self.closed = True
        try:
            if reset:
                import struct
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()
        except OSError:
            pass


def header(headers, name, default=None):
    for n, v in headers:
        if n == name:
            return v
    return default


class Response:
    __slots__ = ("status", "reason", "headers", "body", "keep_alive", "version")

    def __init__(self, status, reason, headers, body, keep_alive, version):
        self.status, self.reason, self.headers, self.body = status, reason, headers, body
        self.keep_alive, self.version = keep_alive, version

    def header(self, name, default=None):
        return header(self.headers, name, default)

    def json(self):
        return json.loads(self.body)


def read_response(conn: Connection, head_request: bool = False, body_limit: int = 1 << 24) -> Response:
    """Reads one whole response (Content-Length, chunked, or to the connection's end)."""
    status, reason, headers, version = conn.read_head()
    te = (header(headers, "transfer-encoding") or "").lower()
    cl = header(headers, "content-length")
    close = "close" in (header(headers, "connection") or "").lower() or version == "HTTP/1.0"
    if head_request or status in (101, 204, 304):
        body = b""
    elif "chunked" in te:
        parts, size = [], 0
        for part in conn.chunks():
            size += len(part)
            if size > body_limit:
                raise BodyOverLimit(f"body over {body_limit} bytes")
            parts.append(part)
        body = b"".join(parts)
    elif cl is not None:
        if int(cl) > body_limit:
            raise BodyOverLimit(f"Content-Length {cl} over {body_limit} bytes")
        body = conn.read_exact(int(cl))
    else:
        body = conn.read_to_close(body_limit)
        close = True
    return Response(status, reason, headers, body, not close, version)


def build_request(method: str, path: str, port: int, body: bytes | None = None, headers=None,
                  content_type: str | None = "application/json", close=False) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {LOCALHOST}:{port}"]
    if body is not None:
        if content_type:
            lines.append(f"Content-Type: {content_type}")
        lines.append(f"Content-Length: {len(body)}")
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def request_json(port: int, method: str, path: str, body=None, timeout: float = 30.0):
    """One request on its own connection; returns (status, parsed JSON or raw text)."""
    conn = Connection(port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.send(build_request(method, path, port, data, close=True))
        resp = read_response(conn)
        try:
            return resp.status, resp.json()
        except ValueError:
            return resp.status, resp.body.decode("utf-8", "replace")
    finally:
        conn.close()


def active_generations(port: int) -> int | None:
    try:
        status, body = request_json(port, "GET", "/api/inference/status", timeout=10)
        return body.get("active_generations") if status == 200 and isinstance(body, dict) else None
    except (OSError, NoResponse, Truncated):
        return None


def wait_idle(port: int, timeout: float) -> tuple[int | None, float]:
    """Polls /api/inference/status until active_generations is 0; returns (last value, seconds waited)."""
    started = time.monotonic()
    value = active_generations(port)
    while value != 0 and time.monotonic() - started < timeout:
        time.sleep(0.1)
        value = active_generations(port)
    return value, time.monotonic() - started


def final_checks(port: int, model: str) -> list[tuple[str, bool, str]]:
    """/health, a real chat completion, and a real streamed one; returns (name, ok, detail)."""
    results = []
    try:
        status, body = request_json(port, "GET", "/health", timeout=10)
        results.append(("GET /health", status == 200, f"{status} {body}"))
    except (OSError, NoResponse, Truncated) as err:
        results.append(("GET /health", False, repr(err)))
    try:
        status, body = request_json(port, "POST", "/v1/chat/completions", {
            "model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "still there?"}]}, timeout=30)
        content = body["choices"][0]["message"]["content"] if status == 200 and isinstance(body, dict) else None
        results.append(("chat completion", status == 200 and bool(content), f"{status} content={content!r}"))
    except (OSError, NoResponse, Truncated, KeyError, TypeError, IndexError) as err:
        results.append(("chat completion", False, repr(err)))
    try:
        conn = Connection(port, timeout=30)
        payload = json.dumps({"model": model, "max_tokens": 4, "stream": True,
                              "messages": [{"role": "user", "content": "still there?"}]}).encode()
        conn.send(build_request("POST", "/v1/chat/completions", port, payload, close=True))
        resp = read_response(conn)
        conn.close()
        ok = resp.status == 200 and b"data: [DONE]" in resp.body
        results.append(("streamed chat completion", ok, f"{resp.status} {len(resp.body)} bytes, [DONE]={b'[DONE]' in resp.body}"))
    except (OSError, NoResponse, Truncated) as err:
        results.append(("streamed chat completion", False, repr(err)))
    return results


def stop_and_report(server: "PatchbayServer", failures: list[str], keep: bool):
    """Stops the server with SIGTERM, says how it exited, and counts a server that had to be killed as a failure."""
    status = server.stop()
    print(f"server stopped with exit status {status}" +
          (" (killed: it did not exit within 30 s of SIGTERM)" if server.killed else ""))
    if server.killed:
        failures.append("the server did not exit within 30 s of SIGTERM")
    if keep:
        print(f"server log: {server.log_path}")


def verdict(failures: list[str]) -> int:
    """Prints PASS or FAIL with the reasons; the exit status."""
    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print("PASS")
    return 0


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]
