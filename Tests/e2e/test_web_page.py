"""The web chat page at `/`, in a real headless Chromium: Debian's `chromium` driven through its
`chromium-driver` by selenium (pinned in requirements.txt; nothing downloads a browser).

A person's path through the page: load a model and watch the progress bar reach 100%, chat
with a streamed answer, press Stop (or Escape) and see at the engine itself (the reference
plugin's own token counters) that generation stopped, also behind a proxy that keeps the
connection open after the browser's abort, also while the model is loading or the prompt is
being processed; reload and find the conversation; give the API key when asked; turn speech
into the message; use it on a phone-sized screen. Then the same with the real SmolLM2.

Set PATCHBAY_WEB_SCREENSHOTS=docs to refresh the screenshots the README shows (every run also
writes them to a temporary folder, patchbay-web-shots-*)."""
import json
import os
import re
import shutil
import socket
import struct
import tempfile
import time
import wave
from pathlib import Path

import pytest

import conftest
from conftest import (LLAMA_PLUGIN, LLAMA_TIMEOUT, REFERENCE_PLUGIN, ROOT, SMOLLM2, WHISPER_MODEL, WHISPER_PLUGIN,
                      Server, engine_stays_stopped, needs_llama, needs_whisper, read_stats, start_thread,
                      stop_and_clean_up, wait_for, wait_for_stats)

os.environ.setdefault("SE_OFFLINE", "true")  # selenium must never try to fetch a driver

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
WEB = ROOT / "Sources" / "PatchbayServer" / "Web"
SCREENSHOTS = Path(os.environ["PATCHBAY_WEB_SCREENSHOTS"]) if os.environ.get("PATCHBAY_WEB_SCREENSHOTS") else None
SHOT_DIR = Path(tempfile.mkdtemp(prefix="patchbay-web-shots-"))

needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (scripts/test installs them: ensure_browser)")

DESKTOP = {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False}
PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}

# What the reference engine answers in the chat tests: Markdown, and HTML that must stay text.
MARKDOWN_REPLY = ("Here is **bold text**, some `inline code`, an <img src=x onerror=alert(1)> tag that stays "
                  "text, a [safe link](https://example.com/docs) and a [bad link](javascript:alert(1)). Done.")
TRANSCRIPT = "Hello from the reference transcriber."


# ─── The browser ──────────────────────────────────────────────────────────────────────

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(needs_browser.kwargs["reason"])
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--no-first-run", "--disable-extensions", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--mute-audio",
                     # The microphone: Chromium's fake capture device, allowed without a prompt.
                     "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                     "--autoplay-policy=no-user-gesture-required",
                     f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The chat page in the browser, read and driven the way a person would (clicks and keys),
    with the DOM read back through small scripts."""

    def __init__(self, driver):
        self.driver = driver
        self.server = None

    # Opening and looking

    def open(self, base: str, wait_ready=True):
        self.driver.get(base + "/")
        if wait_ready:
            self.wait(lambda: self.js("return document.getElementById('server-status').textContent"),
                      10, "the page's first look at the server")

    def js(self, script, *args):
        return self.driver.execute_script(script, *args)

    def el(self, element_id):
        return self.driver.find_element(By.ID, element_id)

    def wait(self, predicate, timeout=10, message="the page"):
        return wait_for(predicate, timeout, message, interval=0.02)

    def visible(self, element_id) -> bool:
        return self.js("const e = document.getElementById(arguments[0]); return !!e && !e.closest('[hidden]') "
                       "&& e.getClientRects().length > 0", element_id)

    def shot(self, name: str):
        """A screenshot of the page as it is now, in the temporary folder (and in
        PATCHBAY_WEB_SCREENSHOTS when set)."""
        png = self.driver.get_screenshot_as_png()
        (SHOT_DIR / name).write_bytes(png)
        if SCREENSHOTS:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            (SCREENSHOTS / name).write_bytes(png)
        return png

    def emulate(self, metrics):
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)

    # Models

    def type_into(self, element_id, text):
        field = self.el(element_id)
        field.clear()
        field.send_keys(text)

    def start_load(self, path):
        self.type_into("load-path", path)
        self.el("load-button").click()

    def progress(self) -> dict:
        return self.js("""
            const bar = document.getElementById('load-progress');
            return {value: bar.hasAttribute('value') ? bar.value : null,
                    label: document.getElementById('load-label').textContent,
                    percent: document.getElementById('load-percent').textContent,
                    shown: !document.getElementById('load-status').hidden,
                    state: document.getElementById('load-status').dataset.state || null,
                    error: document.getElementById('load-error').hidden ? null : document.getElementById('load-error').textContent};""")

    def watch_load(self, path, timeout=30) -> list[dict]:
        """Loads `path` with the page's form and samples its progress bar until the load
        ends; returns the samples, the last one taken after the end."""
        self.start_load(path)
        return self.follow_load(timeout)

    def follow_load(self, timeout=30) -> list[dict]:
        """Samples the progress bar until the load in progress ends."""
        samples = []
        deadline = time.monotonic() + timeout
        while True:
            sample = self.progress()
            samples.append(sample)
            if sample["state"] in ("ready", "failed"):
                return samples
            assert time.monotonic() < deadline, f"the load did not end within {timeout} s: {samples[-3:]}"
            time.sleep(0.02)

    def model_options(self) -> list[str]:
        return self.js("return [...document.getElementById('model-select').options].map(o => o.value)")

    def loaded_models(self) -> list[str]:
        return self.js("return [...document.querySelectorAll('#model-list .model-item:not(.loading)')].map(e => e.dataset.model)")

    def wait_model_listed(self, model, timeout=10):
        self.wait(lambda: model in self.loaded_models() and model in self.model_options(), timeout,
                  lambda: f"{model} in the model list and menu (list {self.loaded_models()}, menu {self.model_options()})")

    # Chatting

    def type_message(self, *lines):
        """Types the lines into the message box, Shift+Enter between them."""
        box = self.el("input")
        box.click()
        for index, line in enumerate(lines):
            if index:
                box.send_keys(Keys.SHIFT, Keys.ENTER)
            box.send_keys(line)

    def send(self, *lines):
        self.type_message(*lines)
        self.el("input").send_keys(Keys.ENTER)

    def messages(self) -> list[dict]:
        return self.js("""
            return [...document.querySelectorAll('#messages .message')].map(m => {
                const content = m.querySelector('.message-content');
                return {
                    role: m.classList.contains('user') ? 'user' : 'assistant',
                    state: m.dataset.state || null,
                    text: content ? content.textContent : '',
                    tags: content ? [...content.querySelectorAll('*')].map(e => e.tagName.toLowerCase()) : [],
                    links: content ? [...content.querySelectorAll('a')].map(a => ({href: a.getAttribute('href'), rel: a.rel, target: a.target, text: a.textContent})) : [],
                    status: (m.querySelector('.message-status') || {}).textContent || '',
                    reasoning: (m.querySelector('.reasoning-text') || {}).textContent || '',
                    reasoningShown: !!m.querySelector('.reasoning') && !m.querySelector('.reasoning').hidden,
                    reasoningOpen: !!m.querySelector('.reasoning') && m.querySelector('.reasoning').open,
                    reasoningVisible: !!m.querySelector('.reasoning-text') && m.querySelector('.reasoning-text').checkVisibility(),
                    tools: [...m.querySelectorAll('.tool-call')].map(t => ({
                        name: t.querySelector('.tool-call-name').textContent,
                        arguments: t.querySelector('.tool-call-arguments').textContent})),
                    stats: Object.fromEntries([...m.querySelectorAll('.message-meta .stat')].map(s => [s.classList[1], s.dataset.value])),
                };
            });""")

    def answer(self) -> dict:
        answers = [m for m in self.messages() if m["role"] == "assistant"]
        assert answers, "no answer on the page"
        return answers[-1]

    def wait_answer(self, predicate, timeout=15, what="the answer"):
        return self.wait(lambda: (lambda a: a if predicate(a) else None)(self.answer()), timeout,
                         lambda: f"{what}; the answer is {self.answer()}")

    def stop_shown(self) -> bool:
        return self.visible("stop")

    def conversations(self) -> list[str]:
        return self.js("return [...document.querySelectorAll('#conversation-list .conversation-open')].map(b => b.textContent)")

    def console_problems(self) -> list[str]:
        """Script errors and CSP violations the browser logged since the last call."""
        problems = []
        for entry in self.driver.get_log("browser"):
            text = entry.get("message", "")
            if "Content Security Policy" in text or "Refused to" in text:
                problems.append(text)
            elif entry.get("level") == "SEVERE" and entry.get("source") != "network":
                problems.append(text)
        return problems


@pytest.fixture
def page(browser):
    """The browser at desktop size, with a clean log; at the end, no script error and no CSP
    violation may have happened (a test that provokes one reads the log itself)."""
    page = Page(browser)
    page.emulate(DESKTOP)
    browser.get("about:blank")
    browser.get_log("browser")
    yield page
    problems = page.console_problems()
    try:
        browser.get("about:blank")  # closes the page's connections before its server stops
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert not problems, f"the browser logged script errors or CSP violations: {problems}"


@pytest.fixture
def server(workdir):
    server = Server(workdir)
    yield server
    server.stop()


def reference_model(server: Server, name: str, **settings) -> tuple[str, str]:
    """A reference-engine model file and its stats file (the engine's own token counters)."""
    stats = str(server.workdir / f"{name}.stats")
    return server.model_file(name, stats_file=stats, **settings), stats


def distinct_partial_lengths(page: Page, until_words: int, timeout=15) -> list[int]:
    """The answer's text length, sampled while it streams, until it has `until_words` words:
    the different lengths seen while its state was 'streaming'."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        answer = page.answer()
        if answer["state"] == "streaming" and (not seen or seen[-1] != len(answer["text"])):
            seen.append(len(answer["text"]))
        if len(answer["text"].split()) >= until_words or answer["state"] in ("done", "error", "stopped"):
            return seen
        assert time.monotonic() < deadline, f"the answer did not reach {until_words} words: {answer}"
        time.sleep(0.01)


# ─── The files ────────────────────────────────────────────────────────────────────────

SCRIPTS = ("app.js", "page.js", "api.js", "models.js", "conversations.js", "transcript.js", "run.js", "audio.js",
           "markdown.js")
PAGE_FILES = {"/": "text/html", **{f"/ui/{name}": "text/javascript" for name in SCRIPTS},
              "/ui/style.css": "text/css", "/ui/favicon.svg": "image/svg+xml"}


def raw_get(server: Server, path: str, headers=None):
    import urllib.error
    import urllib.request
    request = urllib.request.Request(server.base + path, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_the_page_is_public_static_and_locked_down(workdir):
    """The page's files are served without a key, from the repository's Web folder, with a CSP
    that allows this origin only and no inline script or style; nothing else opens up."""
    server = Server(workdir, extra_args=["--api-key", "user-key"])
    try:
        served = {path.name for path in WEB.iterdir()}
        assert served == {"index.html" if p == "/" else p.removeprefix("/ui/") for p in PAGE_FILES}, \
            f"every file in {WEB} must have a route in WebRoutes.swift (and this list): {served}"
        for path, content_type in PAGE_FILES.items():
            status, headers, body = raw_get(server, path)
            assert status == 200, (path, body[:200])
            assert headers["Content-Type"].startswith(content_type), (path, headers["Content-Type"])
            source = WEB / ("index.html" if path == "/" else path.removeprefix("/ui/"))
            assert body == source.read_bytes(), f"{path} is not {source} as it is in the repository"
            csp = headers["Content-Security-Policy"]
            directives = dict((d.split(" ", 1) + [""])[:2] for d in (d.strip() for d in csp.split(";")) if d)
            assert directives["default-src"] == "'self'" and directives["script-src"] == "'self'", csp
            assert directives["style-src"] == "'self'" and directives["frame-ancestors"] == "'none'", csp
            assert directives["object-src"] == "'none'" and directives["base-uri"] == "'none'", csp
            assert "unsafe" not in csp and "*" not in csp and "http" not in csp, csp
            assert headers["X-Content-Type-Options"] == "nosniff"
            assert headers["Referrer-Policy"] == "no-referrer"
            assert headers["X-Frame-Options"] == "DENY"

        # Only those paths, only GET: the API, a made-up asset and a POST to / still need the key.
        assert raw_get(server, "/v1/models")[0] == 401
        assert raw_get(server, "/api/inference/status")[0] == 401
        assert raw_get(server, "/ui/secret.js")[0] == 401
        assert raw_get(server, "/ui/")[0] == 401
        assert server.post("/", {})[0] == 401
        assert raw_get(server, "/ui/secret.js", {"Authorization": "Bearer user-key"})[0] == 404

        # Nothing inline for the CSP to have to allow, and nothing from another origin.
        html = (WEB / "index.html").read_text()
        scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S | re.I)
        assert scripts and all("src=" in attributes and not body.strip() for attributes, body in scripts), scripts
        assert not re.search(r"\sstyle\s*=", html, re.I), "an inline style attribute"
        assert not re.search(r"\son[a-z]+\s*=", html, re.I), "an inline event handler"
        assert "<style" not in html.lower()
        for name in ("index.html", "style.css"):
            assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", (WEB / name).read_text(), re.I), \
                f"{name} refers to another origin"
        for name in SCRIPTS:
            code = (WEB / name).read_text()
            for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
                assert sink not in code, f"{name} uses {sink}: model text must only ever become text nodes"
    finally:
        server.stop()


# ─── The Markdown renderer ────────────────────────────────────────────────────────────

RENDER_JS = """
const [text, done] = [arguments[0], arguments[arguments.length - 1]];
import('/ui/markdown.js').then(({renderMarkdown}) => {
    const box = document.createElement('div');
    box.append(renderMarkdown(text));
    document.body.append(box);
    const all = [...box.querySelectorAll('*')];
    done({
        tags: all.map(e => e.tagName.toLowerCase()),
        text: box.textContent,
        links: [...box.querySelectorAll('a')].map(a => ({href: a.getAttribute('href'), rel: a.rel, target: a.target, text: a.textContent})),
        attributes: [...new Set(all.flatMap(e => [...e.attributes].map(a => a.name)))],
        html: box.innerHTML,
        pwned: window.__pwned === 1,
    });
    box.remove();
}, (error) => done({error: String(error)}));
"""


def render(page: Page, text: str) -> dict:
    result = page.driver.execute_async_script(RENDER_JS, text)
    assert "error" not in result, result
    return result


def test_markdown_renders_structure_and_never_html(server, page):
    page.open(server.base)
    rich = render(page, "# Title\n\nA **bold** and *italic* word, `a < b`, snake_case_name.\n\n"
                        "```python\nprint('<b>hi</b>')\n```\n\n- one\n- two\n  - nested\n\n3. third\n4. fourth\n\n"
                        "> quoted\n\n| a | b |\n|---|:-:|\n| 1 | 2 |\n\n---\n\nSee https://example.com/x.")
    tags = rich["tags"]
    for tag in ("h1", "p", "strong", "em", "code", "pre", "ul", "ol", "li", "blockquote", "table", "th", "td", "hr", "a"):
        assert tag in tags, (tag, rich["html"])
    assert tags.count("ul") == 2, rich["html"]  # the nested list
    assert "print('<b>hi</b>')" in rich["text"] and "b" not in [t for t in tags if t == "b"]
    assert '<code class="language-python">' in rich["html"]
    assert "snake_case_name" in rich["text"], "underscores inside a word are not emphasis"
    assert '<ol start="3">' in rich["html"]
    assert rich["links"] == [{"href": "https://example.com/x", "rel": "noopener noreferrer", "target": "_blank",
                              "text": "https://example.com/x"}]

    hostile = render(page, '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=1"> '
                           '[click](javascript:window.__pwned=1) [data](data:text/html,<b>x</b>) '
                           '<a href="javascript:window.__pwned=1">raw</a> [ok](http://example.org/?q=<x>) '
                           '**<i onmouseover=1>not html</i>** <style>body{display:none}</style>')
    assert set(hostile["tags"]) <= {"p", "a", "strong"}, hostile["html"]
    assert hostile["links"] == [{"href": "http://example.org/?q=%3Cx%3E", "rel": "noopener noreferrer",
                                 "target": "_blank", "text": "ok"}], hostile["links"]
    assert set(hostile["attributes"]) <= {"href", "rel", "target"}, hostile["attributes"]
    assert "<script>window.__pwned=1</script>" in hostile["text"] and "<img src=x" in hostile["text"]
    assert not hostile["pwned"]

    streaming = render(page, "Code:\n```js\nconst a = 1;")  # an answer cut mid-block while it streams
    assert streaming["tags"][-2:] == ["pre", "code"] and "const a = 1;" in streaming["text"]


# ─── Loading, chatting, stopping ──────────────────────────────────────────────────────

def test_load_with_progress_then_a_streamed_answer_that_survives_a_reload(server, page):
    model, stats = reference_model(server, "helper", load_ms=2000, load_bytes=512 << 20, reply=MARKDOWN_REPLY,
                                   token_delay_ms=40)
    page.open(server.base)
    assert page.visible("welcome") and page.model_options() == [""]
    assert "No model" in page.js("return document.getElementById('model-select').selectedOptions[0].textContent")

    # The progress bar: fed by /api/inference/load-progress, it moves, then reaches 100%.
    page.start_load(model)
    page.wait(lambda: (page.progress()["value"] or 0) >= 30, 10, lambda: f"the bar to pass 30%: {page.progress()}")
    page.shot("web-page-loading.png")
    samples = page.follow_load()
    moving = sorted({s["value"] for s in samples if s["value"] is not None and 0 < s["value"] < 100})
    assert len(moving) >= 3, f"the bar did not move: {samples}"
    values = [s["value"] for s in samples if s["value"] is not None]
    assert values == sorted(values), f"the bar went backwards: {values}"
    final = samples[-1]
    assert final["state"] == "ready" and final["value"] == 100 and final["percent"] == "100%", final
    assert "helper is ready" in final["label"]
    page.wait_model_listed("helper")
    assert page.js("return document.getElementById('model-select').value") == "helper"

    # Enter sends; Shift+Enter was a line break inside the message.
    page.type_message("Hello there,", "second line")
    assert page.js("return document.getElementById('input').value") == "Hello there,\nsecond line"
    assert page.messages() == [], "Shift+Enter sent the message"
    page.el("input").send_keys(Keys.ENTER)
    partial = distinct_partial_lengths(page, until_words=len(MARKDOWN_REPLY.split()))
    answer = page.wait_answer(lambda a: a["state"] == "done")
    assert len(partial) >= 3, f"the answer did not arrive piece by piece: {partial}"
    assert page.messages()[0] == {**page.messages()[0], "role": "user", "text": "Hello there,\nsecond line"}
    assert page.js("return document.getElementById('input').value") == ""

    # Rendered as Markdown, and the HTML in it stayed text.
    expected_text = ("Here is bold text, some inline code, an <img src=x onerror=alert(1)> tag that stays text, "
                     "a safe link and a bad link. Done.")
    assert answer["text"] == expected_text, answer
    assert {"strong", "code", "a"} <= set(answer["tags"]) and "img" not in answer["tags"], answer["tags"]
    assert answer["links"] == [{"href": "https://example.com/docs", "rel": "noopener noreferrer", "target": "_blank",
                                "text": "safe link"}]
    # Speed: time to first token and tokens per second, from the usage the server sent.
    words = len(MARKDOWN_REPLY.split())
    assert int(answer["stats"]["tokens"]) == words == read_stats(stats)["produced_tokens"]
    assert 0 < int(answer["stats"]["ttft"]) < 5000
    assert 5 < float(answer["stats"]["tps"]) < 60, answer["stats"]  # 40 ms a token: about 25/s
    page.shot("web-page-chat.png")

    # Reload: the conversation is still there, from the browser's storage.
    page.driver.refresh()
    page.wait(lambda: page.conversations() == ["Hello there, second line"], 10,
              lambda: f"the conversation after a reload: {page.conversations()}")
    restored = page.messages()
    assert [m["role"] for m in restored] == ["user", "assistant"]
    assert restored[0]["text"] == "Hello there,\nsecond line" and restored[1]["text"] == expected_text
    assert restored[1]["state"] == "done" and restored[1]["stats"]["tokens"] == str(words)


def test_stop_mid_answer_stops_the_engine(server, page):
    model, stats = reference_model(server, "endless", repeat=1, token_delay_ms=25,
                                    reply="This answer goes on and on until you press Stop. ")
    server.post("/api/inference/load", {"model_path": model})
    page.open(server.base)
    page.wait_model_listed("endless")
    page.send("Talk forever.")
    distinct_partial_lengths(page, until_words=12)
    assert page.stop_shown() and not page.visible("send")
    page.el("stop").click()

    # At the engine: no run holds a slot, and no token is produced any more.
    after = wait_for_stats(stats, timeout=3, active_runs=0)
    assert engine_stays_stopped(stats)["produced_tokens"] == after["produced_tokens"]
    assert 12 <= after["produced_tokens"] < 400, after
    assert server.active_generations() == 0
    answer = page.wait_answer(lambda a: a["state"] == "stopped", 5)
    assert answer["stats"]["finish"] == "stopped" and int(answer["stats"]["tokens"]) <= after["produced_tokens"]
    page.wait(lambda: page.visible("send") and not page.stop_shown(), 5, "Send back in place of Stop")
    text = answer["text"]
    time.sleep(0.3)
    assert page.answer()["text"] == text, "the answer kept growing after Stop"
    page.shot("web-page-stopped.png")

    # The next question runs normally (its own cancel_id: the old Stop does not touch it).
    page.send("Once more.")
    distinct_partial_lengths(page, until_words=5)
    assert read_stats(stats)["active_runs"] == 1
    page.el("input").send_keys(Keys.ESCAPE)  # Escape stops as well
    wait_for_stats(stats, timeout=3, active_runs=0)
    page.wait_answer(lambda a: a["state"] == "stopped", 5)


class AbortSwallowingProxy:
    """A TCP relay in front of the server that, like some reverse proxies, does not pass a
    client's departure on: when the browser closes its connection, the relay keeps the
    server's connection open and goes on reading the answer, so the server never learns."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.sockets: list[socket.socket] = []
        self.threads = []
        self.swallowed = 0  # client connections that ended while their server connection stayed
        self.closing = False
        self.threads.append(start_thread(self._accept))

    def _accept(self):
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.sockets += [client, upstream]
            self.threads.append(start_thread(self._to_server, client, upstream))
            self.threads.append(start_thread(self._to_client, upstream, client))

    def _to_server(self, client, upstream):
        while True:
            try:
                data = client.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                if not self.closing:
                    self.swallowed += 1  # and `upstream` stays open
                return
            try:
                upstream.sendall(data)
            except OSError:
                return

    def _to_client(self, upstream, client):
        client_there = True
        while True:
            try:
                data = upstream.recv(1 << 16)
            except OSError:
                return
            if not data:
                try:
                    client.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if client_there:
                try:
                    client.sendall(data)
                except OSError:
                    client_there = False  # the browser left: keep reading the server

    def close(self):
        self.closing = True
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in self.threads:
            thread.join(10)


def test_stop_reaches_the_engine_behind_a_proxy_that_swallows_aborts(server, page):
    model, stats = reference_model(server, "endless", repeat=1, token_delay_ms=20, reply="and on and on ")
    server.post("/api/inference/load", {"model_path": model})
    proxy = AbortSwallowingProxy(server.port)
    try:
        # The proxy does swallow a departure: a client that leaves mid-stream through it does
        # not stop its run, which goes on to its max_tokens.
        before = read_stats(stats)["produced_tokens"]
        with socket.create_connection(("127.0.0.1", proxy.port)) as client:
            body = json.dumps({"model": "endless", "stream": True, "max_tokens": 40,
                               "messages": [{"role": "user", "content": "go"}]}).encode()
            client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            conftest.recv_until(client, b"data: ", timeout=10)
        wait_for(lambda: proxy.swallowed == 1, 5, "the relay to see the client leave")
        wait_for_stats(stats, timeout=10, produced_tokens=before + 40, active_runs=0)

        # The page, through the same proxy: its Stop still stops the engine, by the cancel call.
        page.open(proxy.base)
        page.wait_model_listed("endless")
        page.send("Talk forever.")
        distinct_partial_lengths(page, until_words=10)
        page.el("stop").click()
        after = wait_for_stats(stats, timeout=3, active_runs=0)
        assert engine_stays_stopped(stats) == after
        page.wait_answer(lambda a: a["state"] == "stopped", 5)
        assert server.active_generations() == 0
    finally:
        page.driver.get("about:blank")
        proxy.close()


def test_stop_while_the_prompt_is_processed_and_while_the_model_loads(server, page):
    prefill, prefill_stats = reference_model(server, "prefill", prefill_ms=8000, reply="never shown")
    server.post("/api/inference/load", {"model_path": prefill})
    page.open(server.base)
    page.wait_model_listed("prefill")
    page.send("A long prompt.")
    wait_for_stats(prefill_stats, timeout=5, active_runs=1)  # the engine is processing the prompt
    page.wait_answer(lambda a: a["state"] == "waiting" and ("model" in a["status"] or "prompt" in a["status"]), 5)
    page.el("input").send_keys(Keys.ESCAPE)
    stopped_at = time.monotonic()
    wait_for_stats(prefill_stats, timeout=3, active_runs=0)
    assert time.monotonic() - stopped_at < 2
    assert engine_stays_stopped(prefill_stats)["produced_tokens"] == 0
    page.wait_answer(lambda a: a["state"] == "stopped" and a["text"] == "", 5)

    # A message sent while its model is still loading waits for the load; Stop ends it there,
    # and the model, once loaded, never runs it.
    late, late_stats = reference_model(server, "late", load_ms=2500, reply="too late")
    page.start_load(late)
    page.wait(lambda: "late" in page.model_options(), 5, "the loading model in the menu")
    Select(page.el("model-select")).select_by_value("late")
    page.send("Are you there yet?")
    page.wait_answer(lambda a: "Waiting for late to load" in a["status"], 5)
    assert page.progress()["state"] == "loading"
    page.el("stop").click()
    page.wait_answer(lambda a: a["state"] == "stopped", 5)
    page.wait(lambda: page.progress()["state"] == "ready", 15, lambda: f"the load to finish: {page.progress()}")
    page.wait_model_listed("late")
    assert engine_stays_stopped(late_stats, settle=1.0) == {"produced_tokens": 0, "active_runs": 0}
    assert page.answer()["text"] == ""


# ─── Reasoning, tool calls, several conversations ─────────────────────────────────────

def test_reasoning_collapsed_tool_calls_shown_and_conversations_kept_apart(server, page):
    server.post("/api/inference/load", {"model_path": server.model_file(
        "thinker", reply="The weather in **Paris** is mild today.", reasoning="The user asks about the weather. I should answer briefly.",
        tool_arguments='{"city": "Paris", "unit": "celsius"}', token_delay_ms=5)})
    page.open(server.base)
    page.wait_model_listed("thinker")

    page.driver.find_element(By.CSS_SELECTOR, "#settings > summary").click()
    assert page.js("return document.getElementById('settings').open")
    page.el("system-prompt").send_keys("You are terse.")
    Select(page.el("thinking")).select_by_value("on")
    page.send("How is the weather in Paris?")
    answer = page.wait_answer(lambda a: a["state"] == "done")
    assert answer["reasoning"] == "The user asks about the weather. I should answer briefly."
    assert answer["reasoningShown"] and not answer["reasoningOpen"], "reasoning is shown, collapsed"
    assert not answer["reasoningVisible"], "collapsed reasoning is not shown until opened"
    assert answer["text"] == "The weather in Paris is mild today." and "strong" in answer["tags"]
    page.driver.find_element(By.CSS_SELECTOR, ".message.assistant .reasoning summary").click()
    assert page.answer()["reasoningOpen"] and page.answer()["reasoningVisible"]
    page.shot("web-page-reasoning.png")

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    page.type_into("tools", json.dumps(tools))
    page.send("And tomorrow?")
    called = page.wait_answer(lambda a: a["state"] == "done" and a["tools"])
    assert called["tools"] == [{"name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"}, indent=2)}]
    page.driver.find_element(By.CSS_SELECTOR, "#settings > summary").click()  # closes the settings
    page.js("document.getElementById('sidebar').scrollTop = 0")
    page.shot("web-page-tool-call.png")
    page.driver.find_element(By.CSS_SELECTOR, "#settings > summary").click()

    # A second conversation, then back to the first: each keeps its own messages.
    page.type_into("tools", "")
    page.el("new-chat").click()
    assert page.messages() == [] and page.visible("welcome")
    page.send("Second chat here.")
    page.wait_answer(lambda a: a["state"] == "done")
    assert page.conversations() == ["Second chat here.", "How is the weather in Paris?"]
    page.driver.find_element(By.XPATH, "//button[@class='conversation-open' and text()='How is the weather in Paris?']").click()
    first = page.messages()
    assert [m["text"] for m in first if m["role"] == "user"] == ["How is the weather in Paris?", "And tomorrow?"]
    assert first[-1]["tools"][0]["name"] == "get_weather"
    # Settings are kept too.
    page.driver.refresh()
    page.wait(lambda: page.conversations(), 5, "the conversations after a reload")
    assert page.js("return document.getElementById('system-prompt').value") == "You are terse."
    assert page.js("return document.getElementById('thinking').value") == "on"


# ─── The API key ──────────────────────────────────────────────────────────────────────

def test_the_key_is_asked_for_once_and_kept_for_the_session_only(workdir, page):
    server = Server(workdir, extra_args=["--api-key", "user-key", "--admin-key", "admin-key"])
    try:
        page.open(server.base, wait_ready=False)
        page.wait(lambda: page.js("return document.getElementById('key-dialog').open"), 10, "the key dialog")
        assert "API key" in page.el("key-reason").text
        page.shot("web-page-api-key.png")
        page.el("key-input").send_keys("wrong-key", Keys.ENTER)
        page.wait(lambda: "refused" in page.el("key-reason").text, 10, "the dialog to say the key was refused")
        page.el("key-input").send_keys("user-key", Keys.ENTER)
        page.wait(lambda: page.el("server-status").text == "no model loaded", 10,
                  lambda: f"the status with the key (it says {page.el('server-status').text!r})")
        assert not page.js("return document.getElementById('key-dialog').open")

        # Loading needs the admin key: the page asks for it, saying so.
        model = server.model_file("guarded", reply="Behind a key.")
        page.start_load(model)
        page.wait(lambda: page.js("return document.getElementById('key-dialog').open"), 10, "the admin key dialog")
        assert "admin key" in page.el("key-reason").text
        page.el("key-input").send_keys("admin-key", Keys.ENTER)
        page.wait(lambda: page.progress()["state"] == "ready", 10, lambda: f"the load: {page.progress()}")
        page.send("Hello?")
        assert page.wait_answer(lambda a: a["state"] == "done")["text"] == "Behind a key."

        # In sessionStorage (this tab), never in localStorage; a reload does not ask again.
        assert page.js("return sessionStorage.getItem('patchbay.api-key')") == "admin-key"
        stored = page.js("return JSON.stringify(localStorage)")
        assert "admin-key" not in stored and "user-key" not in stored, stored
        page.driver.refresh()
        page.wait(lambda: page.el("server-status").text == "1 model loaded", 10, "the status after a reload")
        assert not page.js("return document.getElementById('key-dialog').open")
        page.js("sessionStorage.clear()")
    finally:
        page.driver.get("about:blank")
        server.stop()


# ─── Audio ────────────────────────────────────────────────────────────────────────────

def tone_wav(path: Path, seconds=1.0, rate=16000):
    with wave.open(str(path), "wb") as clip:
        clip.setnchannels(1)
        clip.setsampwidth(2)
        clip.setframerate(rate)
        frames = (int(8000 * (((i * 440 * 2) // rate) % 2 * 2 - 1)) for i in range(int(seconds * rate)))
        clip.writeframes(b"".join(struct.pack("<h", f) for f in frames))
    return path


def test_audio_file_and_microphone_fill_the_message_box(server, page):
    page.open(server.base)
    assert not page.visible("audio-tools"), "no transcription model yet: no audio buttons"
    server.post("/api/inference/load", {"model_path": server.model_file("ears", transcript=TRANSCRIPT)})
    page.wait(lambda: page.visible("audio-tools"), 10, "the audio buttons once a transcription model is loaded")

    page.el("audio-file").send_keys(str(tone_wav(server.workdir / "tone.wav")))
    page.wait(lambda: page.js("return document.getElementById('input').value") == TRANSCRIPT, 10,
              lambda: f"the transcript in the message box ({page.el('audio-status').text!r})")

    # The microphone (Chromium's fake device): recorded in JavaScript, sent as a WAV file.
    page.el("input").clear()
    page.el("record").click()
    page.wait(lambda: float(page.js("return document.getElementById('audio-status').dataset.seconds || 0")) >= 1.0, 10,
              lambda: f"a second of recording ({page.el('audio-status').text!r})")
    page.el("record").click()
    page.wait(lambda: page.js("return document.getElementById('input').value") == TRANSCRIPT, 10,
              lambda: f"the recording's transcript ({page.el('audio-status').text!r})")


@needs_whisper
@LLAMA_TIMEOUT
def test_speech_from_the_microphone_is_transcribed_by_whisper(tmp_path):
    """The real thing: espeak-ng speaks into Chromium's fake microphone, the page records and
    encodes it, and Whisper tiny.en writes it into the message box."""
    speech = tmp_path / "speech.wav"
    import subprocess
    subprocess.run(["espeak-ng", "-w", str(speech), "The quick brown fox jumps over the lazy dog."], check=True,
                   capture_output=True)
    server = conftest.start_server((REFERENCE_PLUGIN, WHISPER_PLUGIN), prefix="patchbay-web-whisper-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--mute-audio",
                     "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                     f"--use-file-for-fake-audio-capture={speech}", f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        status, body = server.post("/api/inference/load", {"model_path": WHISPER_MODEL, "alias": "whisper"}, timeout=120)
        assert status == 200, body
        # What the page reads: a transcription model, not a chat model.
        assert set(body["capabilities"]) >= {"transcription"} and "chat" not in body["capabilities"]
        listed = {m["id"]: m for m in server.get("/v1/models")[1]["data"]}["whisper"]
        status = {m["model"]: m for m in server.get("/api/inference/status")[1]["models"]}["whisper"]
        assert listed["capabilities"] == status["capabilities"] == body["capabilities"]
        page = Page(driver)
        page.open(server.base)
        page.wait(lambda: page.visible("audio-tools"), 10, "the audio buttons")
        assert "whisper" not in page.model_options(), "a transcription model is not offered for chat"
        page.el("record").click()
        page.wait(lambda: float(page.js("return document.getElementById('audio-status').dataset.seconds || 0")) >= 3.5, 15,
                  "the sentence to be recorded")
        page.el("record").click()
        text = page.wait(lambda: page.js("return document.getElementById('input').value"), 60,
                         lambda: f"the transcript ({page.el('audio-status').text!r})")
        words = set(re.findall(r"[a-z]+", text.lower()))
        assert len(words & {"quick", "brown", "fox", "jumps", "over", "lazy", "dog"}) >= 5, text
    finally:
        driver.quit()
        stop_and_clean_up(server)


# ─── A phone-sized window ─────────────────────────────────────────────────────────────

def test_a_phone_sized_window(server, page):
    server.post("/api/inference/load", {"model_path": server.model_file(
        "pocket", reply="Short answers fit on a **phone** too, with `code` and a long unbroken word: "
                        "supercalifragilisticexpialidocious-supercalifragilisticexpialidocious.", token_delay_ms=5)})
    page.emulate(PHONE)
    page.open(server.base)
    page.wait_model_listed("pocket")
    geometry = """
        const box = (id) => { const r = document.getElementById(id).getBoundingClientRect();
                              return {left: r.left, right: r.right, top: r.top, bottom: r.bottom, width: r.width}; };
        return {viewport: window.innerWidth, height: window.innerHeight,
                scroll: document.documentElement.scrollWidth,
                sidebar: box('sidebar'), input: box('input'), send: box('send'), menu: box('open-sidebar'),
                select: box('model-select'), messages: box('messages')};"""
    layout = page.js(geometry)
    assert layout["viewport"] == 390 and layout["scroll"] <= 390, layout
    assert layout["sidebar"]["right"] <= 0, "the sidebar is tucked away on a phone"
    for part in ("input", "send", "menu", "select"):
        assert 0 <= layout[part]["left"] and layout[part]["right"] <= 390, (part, layout)
        assert 0 <= layout[part]["top"] and layout[part]["bottom"] <= layout["height"], (part, layout)
    assert layout["input"]["width"] > 200, layout

    page.send("Does this fit?")
    answer = page.wait_answer(lambda a: a["state"] == "done")
    assert "phone" in answer["text"]
    layout = page.js(geometry)
    assert layout["scroll"] <= 390, f"the answer made the page scroll sideways: {layout}"
    page.shot("web-page-phone.png")

    page.el("open-sidebar").click()
    page.wait(lambda: page.js(geometry)["sidebar"]["left"] >= 0, 5, "the menu to slide in")
    sidebar = page.js(geometry)["sidebar"]
    assert sidebar["right"] <= 390 and page.visible("load-path") and page.visible("new-chat"), sidebar
    page.wait(lambda: page.js(geometry)["sidebar"]["left"] == 0, 5, "the menu to settle")
    page.shot("web-page-phone-menu.png")
    page.driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    page.wait(lambda: page.js(geometry)["sidebar"]["right"] <= 0, 5, "Escape to close the menu")


# ─── The real SmolLM2 through llama-server ────────────────────────────────────────────

@needs_llama
@LLAMA_TIMEOUT
def test_smollm2_answers_through_the_page(page):
    server = conftest.start_server((REFERENCE_PLUGIN, LLAMA_PLUGIN), prefix="patchbay-web-llama-")
    try:
        page.open(server.base)
        samples = page.watch_load(SMOLLM2, timeout=120)
        assert samples[-1]["state"] == "ready" and samples[-1]["value"] == 100, samples[-3:]
        model = Path(SMOLLM2).stem
        page.wait_model_listed(model)
        page.driver.find_element(By.CSS_SELECTOR, "#settings > summary").click()
        page.type_into("system-prompt", "You are a helpful assistant.")  # as test_llama_server's CAPITAL
        page.type_into("temperature", "0")
        page.type_into("max-tokens", "64")
        page.send("What is the capital of France?")
        answer = page.wait_answer(lambda a: a["state"] in ("done", "error", "stopped"), 120)
        assert answer["state"] == "done" and "Paris" in answer["text"], answer
        assert 0 < int(answer["stats"]["tokens"]) <= 64 and float(answer["stats"]["tps"]) > 0, answer["stats"]
        assert int(answer["stats"]["ttft"]) > 0
        page.driver.find_element(By.CSS_SELECTOR, "#settings > summary").click()  # closes the settings

        # Code comes back as a code block (how this model writes it is its own business).
        page.send("Write a Python function that adds two numbers.")
        page.wait_answer(lambda a: a["state"] == "done", 120)
        page.js("document.getElementById('sidebar').scrollTop = 0")
        page.shot("web-page-smollm2.png")
    finally:
        page.driver.get("about:blank")
        stop_and_clean_up(server)

