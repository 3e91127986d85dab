"""What Benchmarks/fuzz.py found: malformed requests get 4xx, never a 500, a hang or a
connection the server never lets go."""
import json
import socket
import time
from pathlib import Path


def send(server, data: bytes, half_close=False) -> bytes:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(data)
    if half_close:
        sock.shutdown(socket.SHUT_WR)
    reply = sock.recv(65536)
    sock.close()
    return reply


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def test_broken_body_framing_is_a_400_in_the_routes_envelope(server):
    server.load("m")
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    for framing in [b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", b"Transfer-Encoding: chunked\r\n\r\n-1\r\n",
                    b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n"]:
        reply = send(server, head + framing, half_close=True)
        assert status_of(reply) == 400, reply
        assert b'"code":"invalid_body"' in reply
    # A body shorter than its Content-Length, then the client stops sending.
    reply = send(server, b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"model\":\"m\"}", half_close=True)
    assert status_of(reply) == 400 and b'"type":"error"' in reply
    assert server.get("/health")[0] == 200


def test_oversized_request_heads_do_not_leave_connections_behind(server):
    def held() -> int:
        """The server's connections still holding a socket (not LISTEN, TIME_WAIT or CLOSE)."""
        count = 0
        for path in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(path).read_text().splitlines()[1:]:
                fields = line.split()
                count += fields[1].endswith(f":{server.port:04X}") and fields[3] not in ("0A", "06", "07")
        return count
    before = held()
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"b" * 300_000 + b"\r\n\r\n")
        assert status_of(sock.recv(200)) == 400
        sock.close()
    deadline = time.time() + 10
    while held() > before and time.time() < deadline:
        time.sleep(0.2)
    assert held() <= before, "the server kept connections whose request head it refused"


def test_a_device_or_pipe_is_not_a_model(server):
    for path in ["/dev/zero", "/dev/null"]:
        status, error = server.post("/api/inference/load", {"model_path": path, "backend": "reference"})
        assert status == 400 and "not a regular file" in error["error"]["message"], error
        status, error = server.post("/api/inference/validate", {"model_path": path, "backend": "reference"})
        assert status == 400
    assert server.get("/api/inference/status")[1]["loading"] == []


def test_model_aliases_are_printable_and_bounded(server):
    path = server.model_file("m")
    for alias in ["a\u0000b", "tab\there", "x" * 257, ""]:
        status, error = server.post("/api/inference/load", {"model_path": path, "alias": alias})
        assert status == 400 and error["error"]["param"] == "alias", alias
    assert server.post("/api/inference/load", {"model_path": path, "alias": "org/model-7b"})[0] == 200


def test_get_one_model_by_id_including_ids_with_slashes(server):
    path = server.model_file("m")
    assert server.post("/api/inference/load", {"model_path": path})[0] == 200
    assert server.post("/api/inference/load", {"model_path": path, "alias": "org/model-7b"})[0] == 200
    for model in ["m", "org/model-7b"]:
        status, body = server.get(f"/v1/models/{model}")
        assert status == 200 and body["id"] == model and body["object"] == "model", body
    status, error = server.get("/v1/models/absent")
    assert status == 404 and error["error"]["code"] == "model_not_found"
    assert json.dumps(error)  # an envelope, not an empty body
