"""Looks at a llama-server child directly: the host's children, their socket and key, and
what the engine itself reports (/slots, /metrics). Tests use this to check at the
engine, not through Patchbay, that a cancel really stopped decoding."""
import http.client
import json
import socket
import time
import urllib.error
from pathlib import Path


def host_children(host_pid: int) -> list[tuple[int, list[str]]]:
    """(pid, argv) of every live child of the host, whatever it runs."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            argv = (entry / "cmdline").read_bytes().decode().rstrip("\0").split("\0")
        except (OSError, ValueError):
            continue
        if int(fields[1]) == host_pid and fields[0] != "Z":
            found.append((int(entry.name), argv))
    return found


def llama_children(host_pid: int) -> list["Child"]:
    """The llama-server processes whose parent is `host_pid`."""
    return [Child(pid) for pid, argv in host_children(host_pid) if argv[0].endswith("llama-server")]


def is_running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while is_running(pid) and time.time() < deadline:
        time.sleep(0.05)
    return not is_running(pid)


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over the Unix socket a child serves on (it binds no TCP port)."""

    def __init__(self, path: str, timeout: float = 10):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


class Child:
    def __init__(self, pid: int):
        self.pid = pid
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")
        self.args = args
        host = args[args.index("--host") + 1]
        # Patchbay's children serve on a Unix socket; one a benchmark starts may use TCP.
        self.socket_path = host if host.endswith(".sock") else None
        self.port = None if self.socket_path else int(args[args.index("--port") + 1])
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        self.environ = dict(e.decode().split("=", 1) for e in environ if b"=" in e)
        self.key = self.environ["LLAMA_API_KEY"]

    def request(self, method: str, path: str, body=None, key=True):
        """(status, text) of a request straight to the child."""
        headers = {"Authorization": f"Bearer {self.key}"} if key else {}
        if body is not None:
            headers["Content-Type"] = "application/json"
        conn = (UnixHTTPConnection(self.socket_path) if self.socket_path
                else http.client.HTTPConnection("127.0.0.1", self.port, timeout=10))
        try:
            conn.request(method, path, json.dumps(body) if body is not None else None, headers)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    def get(self, path: str, key=True):
        status, body = self.request("GET", path, key=key)
        if status >= 400:
            raise urllib.error.HTTPError(path, status, body, None, None)
        return json.loads(body) if path != "/metrics" else body

    def slots(self) -> list:
        return self.get("/slots")

    def busy(self) -> bool:
        return any(slot.get("is_processing") for slot in self.slots())

    def decoding(self) -> int:
        """Tokens decoded so far by the slots processing now (live, unlike /metrics)."""
        return sum(token.get("n_decoded", 0) for slot in self.slots() if slot.get("is_processing")
                   for token in slot.get("next_token", []))

    def prompt_processing(self) -> int:
        """Prompt tokens processed so far by the slots processing now (live, unlike /metrics,
        which counts a prompt's tokens when it ends or is cut short)."""
        return sum(slot.get("n_prompt_tokens_processed", 0) for slot in self.slots() if slot.get("is_processing"))

    def metric(self, name: str) -> float:
        """One of llama-server's /metrics counters, e.g. `prompt_tokens_total`."""
        for line in self.get("/metrics").splitlines():
            if line.startswith(f"llamacpp:{name} "):
                return float(line.split()[-1])
        raise AssertionError(f"llama-server's /metrics has no {name}")

    def tokens_predicted_total(self) -> int:
        """llama-server's counter of decoded tokens; it grows when a request ends."""
        return int(self.metric("tokens_predicted_total"))

    def prompt_tokens_total(self) -> int:
        """llama-server's counter of prompt tokens processed (cached ones excluded). It grows
        when a prompt ends or, for one cut short, when its slot goes idle."""
        return int(self.metric("prompt_tokens_total"))

    def prompt_seconds_total(self) -> float:
        return self.metric("prompt_seconds_total")

    def wait_idle(self, timeout: float = 5.0) -> float:
        """Seconds until no slot is processing; raises on timeout. Polls every 5 ms: each poll
        is a task for llama-server's main loop, so polling harder slows what it measures."""
        start = time.perf_counter()
        while self.busy():
            if time.perf_counter() - start > timeout:
                raise AssertionError(f"llama-server still busy after {timeout} s")
            time.sleep(0.005)
        return time.perf_counter() - start
