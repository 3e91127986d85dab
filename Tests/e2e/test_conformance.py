"""`patchbay plugin check`: the conformance checker, against every plugin Patchbay ships and
against deliberately broken plugins.

- The shipped plugins (reference, llama-server and libllama with SmolLM2, whisper with Whisper
  tiny.en) pass every clause that applies to them; what does not apply says why.
- Each plugin in Tests/conformance/broken/ (the minimal plugin of Tests/conformance with one
  rule broken) fails exactly the clause it breaks, and nothing else; the minimal plugin itself
  passes.
- A sanitizer build is checked with its runtime preloaded into the workers: the reference
  plugin under AddressSanitizer passes, a heap overflow only AddressSanitizer can see fails the
  clause that triggers it, and the minimal plugin under ThreadSanitizer passes.
"""
import json
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import (BINARY, LIBLLAMA_PLUGIN, LLAMA_PLUGIN, LLAMA_SERVER, REFERENCE_PLUGIN, ROOT, SMOLLM2, WHISPER_MODEL,
                      WHISPER_PLUGIN, needs_libllama, needs_llama, needs_whisper)

CONFORMANCE = ROOT / "Tests" / "conformance"
BROKEN = CONFORMANCE / "broken"
HEADER = ROOT / "Sources" / "CPatchbayABI" / "include"
SUPPORT = ROOT / "Plugins" / "PluginSupport"

# Each broken fixture, the one clause that must fail, and words its reason must carry.
FIXTURES = {
    "two_terminal_events": ("terminal-event[chat]", "a second terminal event"),
    "no_terminal_after_cancel": ("terminal-event[chat]", "run_execute returned without a terminal event"),
    "exported_engine_symbol": ("exports", "minimal_engine_decode"),
    "reads_host_past_size": ("struct-bounds", "pb_host_api (struct_size 24): read byte 0 after its end"),
    "reads_sink_past_size": ("struct-bounds", "pb_event_sink (struct_size 40)"),
    "blocking_cancel": ("cancel-returns-promptly", "run_cancel took 2."),
    "unterminated_error": ("error-buffers", "not NUL-terminated"),
}


def check(plugin, *args, timeout=240, env=None):
    """Runs `patchbay plugin check --json`; returns (exit status, {clause: result}, report)."""
    result = subprocess.run([str(BINARY), "plugin", "check", str(plugin), "--json", *map(str, args)],
                            capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert result.stdout.strip(), f"no report (exit {result.returncode}):\n{result.stderr[-3000:]}"
    report = json.loads(result.stdout)
    clauses = {c["clause"]: c for c in report["clauses"]}
    return result.returncode, clauses, report


def failures(clauses):
    return {name: c["detail"] for name, c in clauses.items() if c["verdict"] == "fail"}


def not_applicable(clauses):
    return {name: c["detail"] for name, c in clauses.items() if c["verdict"] == "na"}


def assert_passes(status, clauses, allowed_na=()):
    """Nothing failed, the exit status says so, and only the expected clauses were not applicable."""
    assert not failures(clauses), json.dumps(failures(clauses), indent=1, ensure_ascii=False)
    assert status == 0
    assert set(not_applicable(clauses)) == set(allowed_na), json.dumps(not_applicable(clauses), indent=1, ensure_ascii=False)


def build(source: Path, out: Path, *flags) -> Path:
    """A plugin as a third party builds one: one shared library, only pb_plugin_entry visible."""
    support = sorted(str(p) for p in SUPPORT.glob("*.c"))
    result = subprocess.run(["cc", "-std=gnu11", "-w", "-shared", "-fPIC", "-fvisibility=hidden", *flags, f"-I{HEADER}",
                             f"-I{SUPPORT / 'include'}", "-o", str(out), str(source), *support, "-lpthread", "-lm"],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"cannot build {source}:\n{result.stderr}"
    return out


@pytest.fixture(scope="module")
def workdir():
    path = Path(tempfile.mkdtemp(prefix="patchbay-conformance-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def minimal_model(workdir):
    path = workdir / "model.min"
    path.write_text("a model of the minimal plugin\n")
    return path


# ─── The reference plugin ─────────────────────────────────────────────────────────────

def test_reference_plugin_passes_every_clause():
    status, clauses, report = check(REFERENCE_PLUGIN, "--time-scale", 2)
    # Its transcriptions have no prompt processing to cancel in; it is a batching engine.
    assert_passes(status, clauses, allowed_na={"cancel-during-prefill[transcription]", "blocking-sink"})
    assert report["plugin"].startswith("'reference' 1.1.0, ABI 1.1; kinds: chat, completion, transcription; batching")
    for kind in ("chat", "completion", "transcription"):
        for base in ("run", "cancel-before-execute", "cancel-after-first-event", "cancel-after-end", "cancel-concurrent",
                     "destroy-without-execute", "concurrent-runs", "terminal-event"):
            assert f"{base}[{kind}]" in clauses
    # The clauses that matter most did real work, and say so.
    assert "backlog_limit 4" in clauses["batching-sink"]["detail"]
    assert "transcription runs with sinks of 40 and 24 bytes and their byte inputs" in clauses["struct-bounds"]["detail"]
    assert "multi-byte characters" in clauses["utf8-text"]["detail"] and "(no multi-byte" not in clauses["utf8-text"]["detail"]
    assert "progress events" in clauses["cancel-during-prefill[chat]"]["detail"]
    assert "5 cycles" in clauses["load-unload-cycles"]["detail"]


@pytest.mark.parametrize("source, includes", [
    (ROOT / "Tests" / "compat" / "abi-1.0" / "reference_plugin_1_0.c", ROOT / "Tests" / "compat" / "abi-1.0"),
    (ROOT / "Tests" / "compat" / "reference_cut_to_1_0.c", HEADER),
], ids=["frozen-1.0", "cut-to-1.0"])
def test_abi_1_0_plugins_pass(workdir, source, includes):
    """A plugin built for ABI 1.0 is judged by 1.0's rules. The cut one ends its table and every
    event at a guard page: had the checker read past a 1.0 size, its worker would have died."""
    plugin = build(source, workdir / f"lib{source.stem}.so", f"-I{includes}")
    status, clauses, report = check(plugin, "--time-scale", 2)
    # No probe, no shutdown, no PB_FLAG_BATCHING in a 1.0 table.
    assert_passes(status, clauses, allowed_na={"probe", "shutdown", "batching-sink"})
    assert ", ABI 1.0;" in report["plugin"]


def test_text_output_has_one_line_per_clause_and_a_summary():
    result = subprocess.run([str(BINARY), "plugin", "check", str(REFERENCE_PLUGIN), "--only", "exports,table,probe"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    verdicts = [line for line in lines if line.split(" ", 1)[0] in ("PASS", "FAIL", "N/A")]
    assert [line.split()[1] for line in verdicts] == ["exports", "table", "probe"], result.stdout
    assert all(line.startswith("PASS  ") for line in verdicts), result.stdout
    assert lines[-1].startswith("3 passed, 0 failed, 0 not applicable"), result.stdout


def test_usage_errors_are_not_verdicts(workdir):
    result = subprocess.run([str(BINARY), "plugin", "check", str(workdir / "missing.so")], capture_output=True, text=True, timeout=60)
    assert result.returncode not in (0, 1) and "no such file" in result.stderr, (result.returncode, result.stderr)


# ─── The minimal plugin and its broken copies ─────────────────────────────────────────

def test_minimal_plugin_passes(workdir, minimal_model):
    plugin = build(CONFORMANCE / "minimal_plugin.c", workdir / "libminimal.so")
    status, clauses, _ = check(plugin, "--model", minimal_model, "--time-scale", 2)
    assert_passes(status, clauses, allowed_na={"batching-sink"})


@pytest.fixture(scope="module")
def broken_reports(workdir, minimal_model):
    """Every broken fixture built and checked, all at once (the checks mostly wait)."""
    def run(name):
        plugin = build(BROKEN / f"{name}.c", workdir / f"lib{name}.so")
        return check(plugin, "--model", minimal_model, "--time-scale", 2, timeout=280)
    with ThreadPoolExecutor(4) as pool:
        futures = {name: pool.submit(run, name) for name in FIXTURES}
        return {name: future.result() for name, future in futures.items()}


def test_every_broken_fixture_is_tested():
    assert {p.stem for p in BROKEN.glob("*.c")} == set(FIXTURES) | {"heap_overflow"}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_broken_plugin_fails_exactly_the_clause_it_breaks(broken_reports, name):
    clause, words = FIXTURES[name]
    status, clauses, _ = broken_reports[name]
    failed = failures(clauses)
    assert set(failed) == {clause}, json.dumps(failed, indent=1, ensure_ascii=False)
    assert words in failed[clause], failed[clause]
    assert status == 1
    # The rest of the contract was still checked (a crash in one clause does not end the check).
    assert set(not_applicable(clauses)) == {"batching-sink"}, not_applicable(clauses)


# ─── Sanitizer builds ─────────────────────────────────────────────────────────────────

def sanitized(source: Path, out: Path, kind: str) -> Path:
    return build(source, out, "-g", "-O1", "-fno-omit-frame-pointer", f"-fsanitize={kind}")


@pytest.mark.timeout(180)
def test_reference_plugin_under_address_sanitizer(workdir):
    plugin = sanitized(ROOT / "Tests" / "ScriptedPlugin" / "reference_plugin.c", workdir / "libreference-asan.so", "address")
    status, clauses, report = check(plugin, "--time-scale", 3)
    assert report["preloaded"] and report["preloaded"][0].startswith("libasan.so"), report["preloaded"]
    assert_passes(status, clauses, allowed_na={"cancel-during-prefill[transcription]", "blocking-sink"})


@pytest.mark.timeout(180)
def test_address_sanitizer_catches_what_no_clause_can(workdir, minimal_model):
    plain = build(BROKEN / "heap_overflow.c", workdir / "libheap_overflow.so")
    status, clauses, _ = check(plain, "--model", minimal_model, "--time-scale", 2)
    assert_passes(status, clauses, allowed_na={"batching-sink"})  # invisible without the sanitizer
    plugin = sanitized(BROKEN / "heap_overflow.c", workdir / "libheap_overflow-asan.so", "address")
    status, clauses, _ = check(plugin, "--model", minimal_model, "--time-scale", 3)
    failed = failures(clauses)
    assert set(failed) == {"error-buffers"}, json.dumps(failed, indent=1)
    assert "AddressSanitizer: heap-buffer-overflow" in failed["error-buffers"] and "min_run_create" in failed["error-buffers"]
    assert status == 1


@pytest.mark.timeout(180)
def test_minimal_plugin_under_thread_sanitizer(workdir, minimal_model):
    plugin = sanitized(CONFORMANCE / "minimal_plugin.c", workdir / "libminimal-tsan.so", "thread")
    status, clauses, report = check(plugin, "--model", minimal_model, "--time-scale", 3)
    assert report["preloaded"] and report["preloaded"][0].startswith("libtsan.so"), report["preloaded"]
    assert_passes(status, clauses, allowed_na={"batching-sink"})


def test_sanitizer_script_builds_and_checks(workdir, minimal_model):
    result = subprocess.run([str(CONFORMANCE / "check_sanitized.sh"), "address", str(CONFORMANCE / "minimal_plugin.c"),
                             "--model", str(minimal_model), "--only", "load,run,error-buffers"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PATCHBAY": str(BINARY)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "preloaded into the workers: libasan.so" in result.stdout, result.stdout
    assert "4 passed, 0 failed" in result.stdout, result.stdout  # exports is always judged


# ─── The engines Patchbay ships ───────────────────────────────────────────────────────

@needs_llama
@pytest.mark.timeout(400)
def test_llama_server_plugin_passes():
    status, clauses, report = check(LLAMA_PLUGIN, "--model", SMOLLM2, "--time-scale", 3, timeout=380,
                                    env={"PATCHBAY_LLAMA_SERVER": LLAMA_SERVER})
    # One llama-server transfer per run, on the host's thread: not a batching engine.
    assert_passes(status, clauses, allowed_na={"batching-sink"})
    assert report["plugin"].startswith("'llama-server'")
    assert "no child process left" in clauses["unload-after-runs"]["detail"]
    assert "while on_event was held" in clauses["blocking-sink"]["detail"]


@needs_libllama
@pytest.mark.timeout(400)
def test_libllama_plugin_passes():
    status, clauses, report = check(LIBLLAMA_PLUGIN, "--model", SMOLLM2, "--time-scale", 3, timeout=380)
    assert_passes(status, clauses, allowed_na={"blocking-sink"})  # a batching engine
    assert report["plugin"].startswith("'libllama'") and report["plugin"].endswith("batching")
    assert "0 past the limit" in clauses["batching-sink"]["detail"]


@needs_whisper
@pytest.mark.timeout(400)
def test_whisper_plugin_passes(workdir):
    speech = workdir / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(speech), "The quick brown fox jumps over the lazy dog."], check=True, capture_output=True)
    status, clauses, report = check(WHISPER_PLUGIN, "--model", WHISPER_MODEL, "--audio", speech, "--time-scale", 3, timeout=380)
    # One host thread per run; no shutdown (optional); it declines a 1.0 host, which passes.
    assert_passes(status, clauses, allowed_na={"batching-sink", "shutdown"})
    assert "declines a host of ABI 1.0" in clauses["host-1.0"]["detail"]
    assert "segments" in clauses["run[transcription]"]["detail"] and " 0 segments" not in clauses["run[transcription]"]["detail"]
