"""A web page the user happens to open must not drive the server, and a request must
never choose what code runs on the machine. Each attack is sent the way a browser
would send it (a no-preflight text/plain POST, a rebinding Host, a foreign Origin)."""
import http.client
import json
import subprocess

import pytest

from conftest import Server


def raw(server, method, path, body=b"", headers=None):
    """One request with exactly the headers given (urllib would add its own)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    headers = {"Host": f"127.0.0.1:{server.port}", **(headers or {})}
    for name, value in headers.items():
        if value is not None:
            conn.putheader(name, value)
    if body:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body or None)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), json.loads(data) if data else None


@pytest.fixture
def evil_library(workdir):
    """A shared library whose constructor leaves a mark: proof that code ran on dlopen."""
    marker = workdir / "constructor-ran"
    source = workdir / "evil.c"
    source.write_text(f'#include <stdio.h>\n__attribute__((constructor)) static void mark(void) {{'
                      f' FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    library = workdir / "elsewhere" / "libevil.so"
    library.parent.mkdir()
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library, marker


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None])
def test_simple_cross_site_posts_are_refused_before_any_code_runs(server, evil_library, content_type):
    library, marker = evil_library
    body = json.dumps({"path": str(library)}).encode()
    status, _, error = raw(server, "POST", "/api/plugins/load", body, {"Content-Type": content_type})
    assert status == 415, error
    assert error["error"]["code"] == "unsupported_media_type"
    assert not marker.exists()

    model = server.model_file("m")
    status, _, error = raw(server, "POST", "/api/inference/load", json.dumps({"model_path": model}).encode(), {"Content-Type": content_type})
    assert status == 415
    assert server.get("/api/inference/status")[1]["loaded"] == []


def test_chat_with_text_plain_gets_415_in_openai_and_anthropic_envelopes(server):
    server.load("m")
    body = json.dumps({"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, _, error = raw(server, "POST", "/v1/chat/completions", body, {"Content-Type": "text/plain"})
    assert status == 415 and error["error"]["type"] == "invalid_request_error"
    status, _, error = raw(server, "POST", "/v1/messages", body, {"Content-Type": "text/plain"})
    assert status == 415 and error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    status, _, reply = raw(server, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json; charset=utf-8"})
    assert status == 200, reply


def test_plugins_load_only_from_plugin_dirs(server, evil_library):
    library, marker = evil_library
    for path in [str(library), str(server.plugin_dir / ".." / "elsewhere" / "libevil.so"), "../elsewhere/libevil.so", "/etc/passwd"]:
        status, error = server.post("/api/plugins/load", {"path": path})
        assert status == 403, (path, error)
        assert error["error"]["code"] == "plugin_path_not_allowed"
    assert not marker.exists()
    # The operator's folder is honoured: the same library copied there does load (and is refused as no plugin).
    (server.plugin_dir / "libevil.so").write_bytes(library.read_bytes())
    status, error = server.post("/api/plugins/load", {"path": "libevil.so"})
    assert status == 400 and "pb_plugin_entry" in error["error"]["message"]
    assert marker.exists()


def test_dns_rebinding_host_is_refused(server):
    server.load("m")
    for host in ["evil.example", f"evil.example:{server.port}", "127.0.0.1.evil.example"]:
        status, _, error = raw(server, "GET", "/v1/models", headers={"Host": host})
        assert status == 403, host
        assert error["error"]["code"] == "host_not_allowed"
    status, _, error = raw(server, "POST", "/v1/messages", b"{}", {"Host": "evil.example", "Content-Type": "application/json"})
    assert status == 403 and error["type"] == "error"
    for host in [f"localhost:{server.port}", f"127.0.0.1:{server.port}", f"[::1]:{server.port}", "app.localhost"]:
        status, _, _ = raw(server, "GET", "/v1/models", headers={"Host": host})
        assert status == 200, host


def test_allowed_hosts_flag(workdir):
    server = Server(workdir, extra_args=["--allowed-hosts", "box.lan,*.corp.example"])
    try:
        for host, expected in [("box.lan", 200), ("a.corp.example:8000", 200), ("corp.example", 403), ("other.lan", 403)]:
            assert raw(server, "GET", "/v1/models", headers={"Host": host})[0] == expected, host
    finally:
        server.stop()


def test_models_list_does_not_reveal_file_paths(server):
    server.load("m")
    status, body = server.get("/v1/models")
    assert status == 200
    assert str(server.workdir) not in json.dumps(body)


def test_foreign_origin_is_refused_and_cors_is_off_by_default(server):
    server.load("m")
    body = json.dumps({"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, headers, error = raw(server, "POST", "/v1/chat/completions", body,
                                 {"Origin": "https://evil.example", "Content-Type": "application/json"})
    assert status == 403 and error["error"]["code"] == "origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in headers
    status, headers, _ = raw(server, "OPTIONS", "/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    # A page served from the server's own origin is not cross-origin.
    status, _, _ = raw(server, "POST", "/v1/chat/completions", body,
                       {"Origin": f"http://127.0.0.1:{server.port}", "Content-Type": "application/json"})
    assert status == 200


def test_cors_origins_flag_allows_that_origin_only(workdir):
    server = Server(workdir, extra_args=["--cors-origins", "https://chat.example"])
    try:
        server.load("m")
        status, headers, _ = raw(server, "OPTIONS", "/v1/chat/completions", headers={
            "Origin": "https://chat.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization"})
        assert status == 204
        assert headers["Access-Control-Allow-Origin"] == "https://chat.example"
        assert "POST" in headers["Access-Control-Allow-Methods"]
        assert "authorization" in headers["Access-Control-Allow-Headers"]
        body = json.dumps({"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}).encode()
        status, headers, _ = raw(server, "POST", "/v1/chat/completions", body,
                                 {"Origin": "https://chat.example", "Content-Type": "application/json"})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "https://chat.example"
        status, _, _ = raw(server, "POST", "/v1/chat/completions", body,
                           {"Origin": "https://other.example", "Content-Type": "application/json"})
        assert status == 403
    finally:
        server.stop()


def test_admin_key_guards_management_routes_only(workdir):
    server = Server(workdir, extra_args=["--api-key", "user-key", "--admin-key", "admin-key"])
    try:
        model = server.model_file("m")
        user = {"Authorization": "Bearer user-key"}
        admin = {"x-api-key": "admin-key"}
        assert server.post("/api/inference/load", {"model_path": model}, headers=user)[0] == 401
        assert server.post("/api/inference/load", {"model_path": model})[0] == 401
        assert server.post("/api/inference/load", {"model_path": model}, headers=admin)[0] == 200
        assert server.get("/api/plugins", headers=user)[0] == 401
        assert server.get("/api/plugins", headers=admin)[0] == 200
        chat = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        assert server.post("/v1/chat/completions", chat, headers=user)[0] == 200
        assert server.post("/v1/chat/completions", chat, headers=admin)[0] == 200
        assert server.post("/v1/chat/completions", chat, headers={"Authorization": "Bearer user-kez"})[0] == 401
        assert server.post("/api/inference/unload", {"model_path": "m"}, headers=user)[0] == 401
        assert server.post("/api/inference/unload", {"model_path": "m"}, headers=admin)[0] == 200
    finally:
        server.stop()


def test_without_admin_key_the_api_key_guards_management(workdir):
    server = Server(workdir, extra_args=["--api-key", "user-key"])
    try:
        model = server.model_file("m")
        assert server.post("/api/inference/load", {"model_path": model})[0] == 401
        assert server.post("/api/inference/load", {"model_path": model}, headers={"Authorization": "Bearer user-key"})[0] == 200
    finally:
        server.stop()
