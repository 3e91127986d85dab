"""The API key and the admin key on every route the router has, read from the route files
themselves, so that a route added later is covered (and must be classified) without anyone
remembering this test."""
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, Server

ROUTE_SOURCES = ROOT / "Sources" / "PatchbayServer"

# The web page's static files (WebRoutes.swift): public GETs that carry no data; the page
# asks for a key when an API call needs one.
PAGE = {("GET", path) for path in (
    "/", "/ui/app.js", "/ui/page.js", "/ui/api.js", "/ui/models.js", "/ui/conversations.js", "/ui/transcript.js",
    "/ui/run.js", "/ui/audio.js", "/ui/markdown.js", "/ui/style.css", "/ui/favicon.svg")}
# Open without a key: health probes and the page.
OPEN = {("GET", "/health")} | PAGE
# The management routes: they change what runs on the machine or reveal its files, and need
# the admin key when one is set (README, "Serving").
MANAGEMENT = {("POST", "/api/inference/load"), ("POST", "/api/inference/unload"),
              ("POST", "/api/inference/validate"), ("GET", "/api/plugins"), ("POST", "/api/plugins/load"),
              ("GET", "/metrics")}
# Routes whose answer is not JSON: only their status is read.
NOT_JSON = PAGE | {("GET", "/metrics")}
# Routes outside /v1 that are deliberately not management: they need the API key only.
API_ONLY = {("GET", "/api/inference/status"), ("GET", "/api/inference/load-progress"),
            ("POST", "/api/inference/cancel")}

# Routes are declared on a route group (Routing/Routes.swift): `openAI.post("/v1/...")`,
# `RouteGroup.management.get("/api/...")`, or on a local name for one of them.
GROUP_NAMES = {"RouteGroup.openAI", "RouteGroup.anthropic", "RouteGroup.management"}
REGISTRATION = re.compile(r"((?:RouteGroup\.)?\w+)\s*\.\s*(get|post|put|patch|delete|head|on)\s*\(\s*\"([^\"]*)\"")
ANY_REGISTRATION = re.compile(r"((?:RouteGroup\.)?\w+)\s*\.\s*(?:get|post|put|patch|delete|head|on)\s*\(")
GROUP = re.compile(r"\blet\s+(\w+)\s*=\s*(RouteGroup\.\w+)\b")
# The page's files are routes made from one list in WebRoutes.swift: its entries, path first.
PAGE_FILE = re.compile(r"\"(/[^\"]*)\"\s*[:,]\s*\"[\w.-]+\.(?:html|js|css|svg|png|ico)\"")


def registered_routes() -> set[tuple[str, str]]:
    """(method, path) of every route declared in Sources/PatchbayServer. A declaration this
    cannot read fails, rather than being left out."""
    routes = set()
    for source in sorted(ROUTE_SOURCES.rglob("*.swift")):
        text = source.read_text()
        groups = set(GROUP_NAMES)
        for name, group in GROUP.findall(text):
            assert group in GROUP_NAMES, f"{source.name}: {name} is not a known route group ({group})"
            groups.add(name)
        for receiver, method, path in REGISTRATION.findall(text):
            if receiver in groups:
                routes.add((method.upper(), path))
        # A declaration whose path is not a plain string literal: only the page's file list.
        for call in ANY_REGISTRATION.finditer(text):
            if call.group(1) in groups and not REGISTRATION.match(text, call.start()):
                assert source.name == "WebRoutes.swift", \
                    f"{source.name}: cannot read the path of {text[call.start():call.start() + 80]!r}"
                routes |= {("GET", path) for path in PAGE_FILE.findall(text)}
    return routes


ROUTES = sorted(registered_routes())


def test_the_route_list_is_read_from_the_sources_and_every_route_is_classified():
    # The parser found the routes the README documents (so it is not silently finding none) ...
    documented = {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/responses"),
                  ("POST", "/v1/embeddings"), ("GET", "/v1/models"), ("POST", "/v1/messages"),
                  ("POST", "/v1/messages/count_tokens")} | OPEN | MANAGEMENT | API_ONLY
    assert documented <= set(ROUTES), documented - set(ROUTES)
    # ... and a new route outside /v1 must be put in one of the lists above: is it management?
    unclassified = [r for r in ROUTES if not r[1].startswith("/v1/") and r not in OPEN | MANAGEMENT | API_ONLY]
    assert not unclassified, f"classify these routes in {Path(__file__).name}: {unclassified}"


def concrete(path: str) -> str:
    """A path a request can take: `{id}`, `**` and other parameters become a plain segment."""
    return re.sub(r"\{[^}]*\}|\*\*", "some-model", path)


def call(server: Server, route, key_headers: dict) -> int:
    method, path = route
    if route in NOT_JSON:
        request = urllib.request.Request(server.base + path, headers=key_headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
    body = {} if method == "POST" else None
    return server.request(method, concrete(path), body, headers=key_headers, timeout=30)[0]


NO_KEY = {}
WRONG_KEYS = [{"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}, {"Authorization": "user-key"}]
USER = [{"Authorization": "Bearer user-key"}, {"x-api-key": "user-key"}]
ADMIN = [{"Authorization": "Bearer admin-key"}, {"x-api-key": "admin-key"}]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("keys"), extra_args=["--api-key", "user-key", "--admin-key", "admin-key"])
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def api_key_only(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("key"), extra_args=["--api-key", "user-key"])
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("route", ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_every_route_needs_its_key(keyed, route):
    if route in OPEN:
        assert call(keyed, route, NO_KEY) == 200
        return
    for headers in [NO_KEY, *WRONG_KEYS]:
        assert call(keyed, route, headers) == 401, f"{route} answered without a valid key ({headers})"
    for headers in USER:
        status = call(keyed, route, headers)
        if route in MANAGEMENT:
            assert status == 401, f"management route {route} accepted the API key instead of the admin key"
        else:
            assert status != 401, f"{route} refused the API key"
    for headers in ADMIN:
        assert call(keyed, route, headers) != 401, f"{route} refused the admin key"


@pytest.mark.parametrize("route", ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_without_an_admin_key_the_api_key_guards_every_route(api_key_only, route):
    if route in OPEN:
        assert call(api_key_only, route, NO_KEY) == 200
        return
    for headers in [NO_KEY, *WRONG_KEYS, *ADMIN]:
        assert call(api_key_only, route, headers) == 401, f"{route} answered without the API key ({headers})"
    for headers in USER:
        assert call(api_key_only, route, headers) != 401, f"{route} refused the API key"
