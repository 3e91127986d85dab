#!/usr/bin/env python3
"""Patchbay's whisper backend against whisper.cpp's own command-line tool: the real-time
factor (processing seconds / audio seconds, lower is faster) of transcribing the same WAV
file with the same model, the same thread count and the same decoding settings.

  patchbay:    the real `patchbay serve` (a private copy of the binary, with only the
               whisper plugin in its plugin dir, on 127.0.0.1), the model loaded once with
               n_parallel 1, n_threads N and beam_size B; each transcription is one POST
               /v1/audio/transcriptions (OpenAI's multipart form, built here by hand:
               model, language en, response_format json, temperature 0, the WAV as `file`).
               Its processing time is the client's wall time of that request: upload,
               multipart parsing, WAV decoding, whisper.cpp and the response.
  whisper-cli: one process per transcription, `whisper-cli -m MODEL -f WAV -t N -l en -bs B
               -bo 5 -tp 0.0 -fa`. Its wall time includes loading the model, which Patchbay
               does once at load time, so two figures are reported: its wall time, and its
               wall time minus the model load time it prints itself (whisper_print_timings
               "load time"). The ratio is computed against the latter, which still holds
               the start of the process, whisper_init_state and reading the WAV. Its own
               "total time" minus "load time" (whisper.cpp's in-process figure) is printed
               too, for reference.

Decoding settings, made to match. whisper-cli defaults to beam search (beam_size 5) with
best_of 5; the plugin decodes greedily unless loaded with beam_size > 1. By default both
sides decode greedily: the plugin with beam_size 0, whisper-cli with `-bs 1` (its strategy
is beam search only for a beam size > 1). `--beam-size 5` loads the plugin with beam_size 5
and passes `-bs 5` instead. Everything else is whisper.cpp's default on both sides and
stated explicitly for the CLI where it has a flag: best_of 5 (the candidates sampled when a
window falls back to a higher temperature), temperature 0 with fallback steps of 0.2,
entropy 2.4 / logprob -1.0 / no-speech 0.6 thresholds, timestamps on (the CLI's -nt would
change decoding), no_context, flash attention on, language en (an English-only model).
The settings are printed, with whisper-cli's own description of its run and the plugin's
load line from the server log.

Audio: espeak-ng speaks sentences (22,050 Hz), one after another with half a second of
silence between, taken in turn round a list of ten, each that still fits in the clip's
length, the rest of it silence; the clip is resampled here to 16 kHz mono 16-bit (a
polyphase windowed-sinc low-pass, pure Python, a few seconds for 30 s) and written once:
the same file goes to both sides. Clips of 10 s and 30 s by default (--seconds); one
30-second window of whisper.cpp holds a 30 s clip.

Per clip: one untimed warm-up transcription per side (its transcripts are printed, and
compared: the two sides should agree word for word), then --rounds rounds, each visiting
both sides, the first side alternating, so that a busy machine slows both alike. Reported
per side: the median and the minimum of the RTF, wall seconds, the CLI's load time, and
CPU seconds per transcription (the CLI's from its rusage, Patchbay's from the server's
/proc/<pid>/stat, 10 ms ticks); and the ratio RTF_cli / RTF_patchbay, as the median of the
per-round ratios (the headline, target >= 0.95: Patchbay at least 95% as fast as the CLI
minus its model load), of the medians and of the minima.

For Patchbay's side, the time of its HTTP path alone is printed too: the same form, naming
a model that is not loaded, is answered with an error only after the route has collected
the whole body and parsed the multipart form. Then the ratio with that time taken off
Patchbay's, an estimate of how the rest (WAV decoding, the plugin, the response) compares.

Each clip ends with how long it took and how many cores other processes used meanwhile. On
2 cores with 2 threads anything else running (a build, tests) wrecks single runs on either
side: ggml's OpenMP threads spin at their barriers, and a decoder step that takes 9 ms on
a quiet machine was seen taking 570 ms (a 10 s clip: 0.55 s, then 21 s). A clip with more
than ~0.1 cores of others is not to be trusted; the minima suffer least.

Run it after scripts/test (it builds whisper.cpp and whisper-cli, converts the model and
builds the whisper plugin into the Swift bin dir):

    python3 Benchmarks/whisper_bench.py                       # about 1-2 minutes on 2 cores
    python3 Benchmarks/whisper_bench.py --rounds 2 --seconds 10
    python3 Benchmarks/whisper_bench.py --build-dir .build/debug --threads 2 --beam-size 5

--build-dir defaults to .build/release when it holds patchbay and the whisper plugin, else
.build/debug. whisper-cli is $WHISPER_CPP_BIN/whisper-cli, else $PATCHBAY_WHISPER_CLI, else
the cached build; the model $WHISPER_MODEL, else $PATCHBAY_WHISPER_MODEL, else the cached
ggml-tiny.en.bin (scripts/lib/engines.sh: ensure_whisper_cpp, ensure_whisper_model).

It exits nonzero on a real failure (the server does not start or load the model, a
transcription fails or comes back empty, whisper-cli fails), not on a missed target nor on
transcripts that differ (those are flagged in the output).
"""
import argparse
import array
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import wave
from operator import mul
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402 - beside this script
from harness import CLOCK_TICKS as HZ, busy_ticks, default_path, interleaved, process_ticks  # noqa: E402 - beside this script

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "libPatchbayWhisperPlugin.so"
ALIAS = "whisper"
RATE = 16000           # what whisper.cpp wants (whisper-cli refuses anything else)
GAP = 0.5              # seconds of silence between sentences
BEST_OF = 5            # whisper.cpp's default, on both sides
TARGET = 0.95          # RTF_cli / RTF_patchbay
SIDES = ["cli", "patchbay"]
NAMES = {"cli": "whisper-cli", "patchbay": "patchbay"}
# Sentences espeak-ng speaks clearly enough for tiny.en (the first six are Tests/e2e/test_whisper.py's).
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please turn off the lights in the kitchen before you go to bed.",
    "Artificial intelligence is changing the way we write software.",
    "She bought a new bicycle and rode it to the library.",
    "The children played in the garden until it was dark.",
    "We will meet at the train station tomorrow morning.",
    "My brother plays the piano every evening after dinner.",
    "The museum opens at nine and closes at five.",
    "He forgot his umbrella and walked home in the rain.",
    "Our new office has a large window facing the river.",
]


class Failure(Exception):
    """A real failure: the run cannot go on (exit status 1)."""


# ─── Audio ──────────────────────────────────────────────────────────────────────────

def speak(text: str, workdir: Path) -> tuple[array.array, int]:
    """espeak-ng's speech of `text`: 16-bit samples and their rate (22,050 Hz)."""
    path = workdir / f"{uuid.uuid5(uuid.NAMESPACE_URL, text).hex}.wav"
    if not path.exists():
        done = subprocess.run(["espeak-ng", "-w", str(path), text], capture_output=True, text=True)
        if done.returncode != 0:
            raise Failure(f"espeak-ng failed ({done.returncode}): {done.stderr.strip()}")
    with wave.open(str(path)) as clip:
        if clip.getsampwidth() != 2 or clip.getnchannels() != 1:
            raise Failure(f"espeak-ng wrote {clip.getnchannels()} channels of {clip.getsampwidth()} bytes")
        samples = array.array("h", clip.readframes(clip.getnframes()))
        if sys.byteorder == "big":
            samples.byteswap()
        return samples, clip.getframerate()


def bessel_i0(x: float) -> float:
    """The modified Bessel function of the first kind, order 0 (for the Kaiser window)."""
    total = term = 1.0
    for k in range(1, 64):
        term *= (x / (2 * k)) ** 2
        total += term
        if term < 1e-15 * total:
            break
    return total


def resample(samples: array.array, src: int, dst: int, half_width: int = 64, rolloff: float = 0.97,
             beta: float = 8.0) -> array.array:
    """Band-limited resampling from `src` Hz to `dst` Hz: a polyphase windowed sinc (Kaiser
    window, beta 8; 2 * half_width input samples per output sample; the cutoff at `rolloff`
    of the lower Nyquist frequency; each phase's taps normalised to unity gain at DC).
    22,050 -> 16,000 Hz: flat to 7.5 kHz, about -80 dB from 8.3 kHz. (Whisper's mel bands
    reach 8 kHz, and tiny.en hears espeak-ng's fricatives worse when a gentler filter,
    half as long and cut off at 92%, takes away the top half kilohertz.)"""
    if src == dst:
        return array.array("h", samples)
    g = math.gcd(src, dst)
    up, down = dst // g, src // g             # output n sits at input position n * down / up
    fc = rolloff * 0.5 * min(src, dst) / src  # cutoff, in cycles per input sample
    norm = bessel_i0(beta)
    taps = []
    for phase in range(up):
        frac = phase / up
        row = []
        for k in range(-half_width + 1, half_width + 1):
            d = k - frac                      # distance from the output position, in input samples
            x = 2 * fc * d
            sinc = 1.0 if x == 0 else math.sin(math.pi * x) / (math.pi * x)
            r = d / half_width
            row.append(sinc * bessel_i0(beta * math.sqrt(max(0.0, 1.0 - r * r))) / norm)
        total = sum(row)
        taps.append([t / total for t in row])
    padded = [0.0] * half_width + [float(s) for s in samples] + [0.0] * (half_width + 1)
    n_out = (len(samples) * up + down - 1) // down
    out = array.array("h", bytes(2 * n_out))
    for n in range(n_out):
        i0, phase = divmod(n * down, up)
        # input samples i0-half_width+1 .. i0+half_width, shifted by the padding
        value = sum(map(mul, taps[phase], padded[i0 + 1:i0 + 1 + 2 * half_width]))
        out[n] = max(-32768, min(32767, int(round(value))))
    return out


def make_clip(seconds: float, workdir: Path) -> tuple[Path, float, int, float]:
    """A 16 kHz WAV of `seconds`: sentences with GAP seconds of silence between, taken in
    turn round the list, each that still fits (at least one), until a whole turn adds none;
    then silence to the length. Returns (path, its duration, sentences, seconds of speech)."""
    spoken, chosen, rate, i, misses = array.array("h"), 0, None, 0, 0
    while misses < len(SENTENCES):
        samples, rate_i = speak(SENTENCES[i % len(SENTENCES)], workdir)
        i += 1
        rate = rate or rate_i
        if rate_i != rate:
            raise Failure(f"espeak-ng changed its rate ({rate} then {rate_i} Hz)")
        gap = int(GAP * rate) if chosen else 0
        if chosen and (len(spoken) + gap + len(samples)) / rate > seconds:
            misses += 1
            continue
        misses = 0
        spoken.extend(array.array("h", bytes(2 * gap)))
        spoken.extend(samples)
        chosen += 1
    out = resample(spoken, rate, RATE)
    missing = int(round(seconds * RATE)) - len(out)
    if missing > 0:
        out.extend(array.array("h", bytes(2 * missing)))
    if sys.byteorder == "big":
        out.byteswap()
    path = workdir / f"clip-{seconds:g}s-16k.wav"
    with wave.open(str(path), "wb") as clip:
        clip.setnchannels(1)
        clip.setsampwidth(2)
        clip.setframerate(RATE)
        clip.writeframes(out.tobytes())
    return path, len(out) / RATE, chosen, len(spoken) / rate


# ─── The machine ────────────────────────────────────────────────────────────────────

def children_cpu() -> float:
    """CPU seconds of this process's finished children (each whisper-cli run, espeak-ng)."""
    t = os.times()
    return t.children_user + t.children_system


class Section:
    """Times a part of the run and says how many cores the rest of the machine used
    meanwhile (everything but this script, its finished children and the server)."""

    def __init__(self, server_pid: int):
        self.server_pid = server_pid
        self.start = time.perf_counter()
        self.machine = busy_ticks()
        self.mine = self.own()

    def own(self) -> float:
        t = os.times()
        return (t.user + t.system + t.children_user + t.children_system) * HZ + process_ticks(self.server_pid)

    def note(self) -> str:
        elapsed = time.perf_counter() - self.start
        others = (busy_ticks() - self.machine) - (self.own() - self.mine)
        cores = max(0.0, others) / HZ / elapsed if elapsed > 0 else 0.0
        return f"[{elapsed:.0f} s; other processes used {cores:.2f} cores meanwhile]"


# ─── The server ─────────────────────────────────────────────────────────────────────

class Server:
    """A private copy of `patchbay` and the whisper plugin (so a concurrent rebuild cannot
    swap them underneath the run), serving on 127.0.0.1 with its log, at info level, in the
    work folder."""

    def __init__(self, bin_dir: Path, workdir: Path):
        plugins = workdir / "plugins"
        plugins.mkdir()
        binary = workdir / "patchbay"
        shutil.copy2(bin_dir / "patchbay", binary)
        shutil.copy2(bin_dir / PLUGIN, plugins / PLUGIN)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log_path = workdir / "server.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(binary), "serve", "--host", "127.0.0.1", "--port", str(self.port),
                 "--plugin-dir", str(plugins), "--log-level", "info"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.process.pid
        deadline = time.time() + 60
        while True:
            if self.process.poll() is not None:
                raise Failure(f"patchbay exited at start ({self.process.returncode}):\n{self.log_tail()}")
            try:
                if self.request("GET", "/health", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise Failure(f"patchbay did not start within 60 s:\n{self.log_tail()}")
            time.sleep(0.05)

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                timeout: float = 600) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body, {"Content-Type": content_type} if content_type else {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def load(self, fields: dict) -> dict:
        status, body = self.request("POST", "/api/inference/load", json.dumps(fields).encode(), "application/json")
        try:
            answer = json.loads(body)
        except ValueError:
            answer = body.decode("utf-8", "replace")
        if status != 200:
            raise Failure(f"loading the model failed: {status} {answer}\n{self.log_tail()}")
        return answer

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def multipart(fields: dict, filename: str, data: bytes) -> tuple[bytes, str]:
    """OpenAI's transcription form: the text fields, then the audio as `file`."""
    boundary = uuid.uuid4().hex
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode()
             for name, value in fields.items()]
    parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
                 f"Content-Type: audio/wav\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


# ─── One transcription per side ─────────────────────────────────────────────────────

CLI_SEGMENT = re.compile(r"^\[\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}\]  (.*)$")
CLI_TIMING = re.compile(r"whisper_print_timings:\s+(load|total) time =\s+([0-9.]+) ms")
CLI_FALLBACKS = re.compile(r"whisper_print_timings:\s+fallbacks =\s+(\d+) p /\s+(\d+) h")
CLI_PROCESSING = re.compile(r"^\S+: processing '.*?' \((.*)$", re.M)


def run_cli(cli_args: list, timeout: float = 600) -> dict:
    """One whisper-cli process: its wall time, load and total times, CPU seconds, text."""
    cpu = children_cpu()
    start = time.perf_counter()
    try:
        done = subprocess.run(cli_args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Failure(f"whisper-cli did not finish within {timeout:.0f} s")
    wall = time.perf_counter() - start
    cpu = children_cpu() - cpu
    if done.returncode != 0:
        raise Failure(f"whisper-cli failed ({done.returncode}):\n{done.stderr[-3000:]}")
    timings = dict((name, float(ms) / 1000) for name, ms in CLI_TIMING.findall(done.stderr))
    if "load" not in timings or "total" not in timings:
        raise Failure(f"whisper-cli printed no load/total time:\n{done.stderr[-3000:]}")
    text = "".join(m.group(1) for m in map(CLI_SEGMENT.match, done.stdout.splitlines()) if m).strip()
    fallbacks = CLI_FALLBACKS.search(done.stderr)
    processing = CLI_PROCESSING.search(done.stderr)
    return {"wall": wall, "load": timings["load"], "total": timings["total"], "time": wall - timings["load"],
            "cpu": cpu, "text": text, "fallbacks": fallbacks.groups() if fallbacks else None,
            "processing": processing.group(1) if processing else None}


def run_patchbay(server: Server, body: bytes, content_type: str) -> dict:
    """One POST /v1/audio/transcriptions: its wall time, the server's CPU seconds, text."""
    ticks = process_ticks(server.pid)
    start = time.perf_counter()
    try:
        status, answer = server.request("POST", "/v1/audio/transcriptions", body, content_type)
    except OSError as error:
        raise Failure(f"the transcription request failed: {error!r}\n{server.log_tail()}")
    wall = time.perf_counter() - start
    cpu = (process_ticks(server.pid) - ticks) / HZ
    if status != 200:
        raise Failure(f"the transcription answered {status}: {answer[:2000]!r}\n{server.log_tail()}")
    try:
        text = json.loads(answer)["text"].strip()
    except (ValueError, KeyError, TypeError):
        raise Failure(f"the transcription answered no JSON text: {answer[:2000]!r}")
    return {"wall": wall, "time": wall, "cpu": cpu, "text": text}


def normalised(text: str) -> str:
    return " ".join(text.split())


def word_differences(a: str, b: str) -> int:
    """Word-level edit distance between two transcripts."""
    x, y = a.split(), b.split()
    row = list(range(len(y) + 1))
    for i, p in enumerate(x, 1):
        previous, row[0] = row[0], i
        for j, q in enumerate(y, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (p != q))
    return row[len(y)]


# ─── Main ───────────────────────────────────────────────────────────────────────────

def choose_build_dir(given: str | None) -> tuple[Path, str]:
    """--build-dir, else .build/release when it holds patchbay and the plugin, else .build/debug."""
    path, why, missing = harness.choose_build_dir(given, ["patchbay", PLUGIN], "patchbay and the whisper plugin")
    if missing:
        raise Failure(f"{path} lacks {', '.join(missing)} (scripts/lib/engines.sh: build_whisper_plugin <bin dir>)")
    return path, why


def find_cli(given: str | None) -> str:
    if given:
        return given
    if os.environ.get("WHISPER_CPP_BIN"):
        return str(Path(os.environ["WHISPER_CPP_BIN"]) / "whisper-cli")
    return default_path("PATCHBAY_WHISPER_CLI", "whisper.cpp/src-*/build/bin/whisper-cli")


def find_model(given: str | None) -> str:
    if given:
        return given
    if os.environ.get("WHISPER_MODEL"):
        return os.environ["WHISPER_MODEL"]
    return default_path("PATCHBAY_WHISPER_MODEL", "models/whisper-tiny.en-*/ggml-tiny.en.bin")


def seconds_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds separated by commas, got {text!r}")
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("clip lengths must be positive")
    return values


def med(values) -> float:
    return statistics.median(values) if values else float("nan")


def row(label: str, cli: list | None, patchbay: list | None, instead: str = "-", digits: int = 3):
    """One line of a clip's table: median (min) per side."""
    def cell(values):
        return f"{med(values):.{digits}f} ({min(values):.{digits}f})" if values else instead
    print(f"  {label:44s} {cell(cli):>17s}  {cell(patchbay):>17s}")


def bench_clip(server: Server, cli_base: list, seconds: float, workdir: Path, rounds: int) -> dict:
    """Warm-up, transcripts, then the interleaved rounds of one clip; prints its table."""
    path, duration, sentences, speech = make_clip(seconds, workdir)
    audio = path.read_bytes()
    form = {"model": ALIAS, "language": "en", "response_format": "json", "temperature": "0"}
    body, content_type = multipart(form, path.name, audio)
    cli_args = [*cli_base, "-f", str(path)]
    print(f"\n── clip of {duration:.2f} s ({sentences} sentences in the first {speech:.1f} s, {len(audio) / 1024:.0f} KiB at 16 kHz) ──")

    section = Section(server.pid)
    warm = {"cli": run_cli(cli_args), "patchbay": run_patchbay(server, body, content_type)}
    if warm["cli"]["processing"]:
        print(f"whisper-cli says: processing '{path.name}' ({warm['cli']['processing']}")
    for side in SIDES:
        if not warm[side]["text"]:
            raise Failure(f"{NAMES[side]} returned an empty transcript for the {duration:.1f} s clip")
        print(f"transcript, {NAMES[side]:11s}: {warm[side]['text']}")
    a, b = normalised(warm["cli"]["text"]), normalised(warm["patchbay"]["text"])
    agree = a == b
    if agree:
        print("transcripts: identical")
    else:
        print(f"transcripts: DIFFER ({word_differences(a, b)} word edits apart)")
    if warm["cli"]["fallbacks"]:
        print(f"whisper-cli temperature fallbacks: {warm['cli']['fallbacks'][0]} p / {warm['cli']['fallbacks'][1]} h")

    samples = {side: [None] * rounds for side in SIDES}
    changed = set()
    for r, side in interleaved(SIDES, rounds):
        result = run_cli(cli_args) if side == "cli" else run_patchbay(server, body, content_type)
        if not result["text"]:
            raise Failure(f"{NAMES[side]} returned an empty transcript in round {r + 1}")
        if normalised(result["text"]) != normalised(warm[side]["text"]):
            changed.add(side)
        samples[side][r] = result
        if all(samples[s][r] for s in SIDES):
            c, p = samples["cli"][r], samples["patchbay"][r]
            print(f"  round {r + 1}: whisper-cli {c['time']:6.3f} s (wall {c['wall']:6.3f}, load {c['load']:5.3f}), "
                  f"patchbay {p['time']:6.3f} s   RTF {c['time'] / duration:.4f} / {p['time'] / duration:.4f}  "
                  f"ratio {c['time'] / p['time']:.3f}")

    # Patchbay's HTTP path alone: the same form naming a model that is not loaded. The route
    # collects the whole body and parses the multipart form before it looks the model up.
    probe_body, probe_type = multipart({**form, "model": f"not-loaded-{uuid.uuid4().hex[:8]}"}, path.name, audio)
    http_path, probe_status = [], None
    for _ in range(max(3, rounds)):
        start = time.perf_counter()
        probe_status = server.request("POST", "/v1/audio/transcriptions", probe_body, probe_type)[0]
        http_path.append(time.perf_counter() - start)

    rtf = {side: [s["time"] / duration for s in samples[side]] for side in SIDES}
    cli_wall_rtf = [s["wall"] / duration for s in samples["cli"]]
    ratios = [c / p for c, p in zip(rtf["cli"], rtf["patchbay"])]
    wall_ratios = [c / p for c, p in zip(cli_wall_rtf, rtf["patchbay"])]
    c, p = samples["cli"], samples["patchbay"]
    print(f"\n  {f'{duration:.2f} s of audio; median (min) of {rounds} round' + 's' * (rounds > 1):44s} "
          f"{'whisper-cli':>17s}  {'patchbay':>17s}")
    row("wall seconds", [s["wall"] for s in c], [s["wall"] for s in p])
    row("model load (the CLI's own 'load time')", [s["load"] for s in c], None, "(loaded once)")
    row("processing seconds (CLI: wall - load)", [s["time"] for s in c], [s["time"] for s in p])
    row("CLI's own 'total time' - 'load time'", [s["total"] - s["load"] for s in c], None)
    row(f"HTTP path alone (a {probe_status} to the same form)", None, http_path)
    row("CPU seconds per transcription", [s["cpu"] for s in c], [s["cpu"] for s in p])
    row("RTF (processing / audio seconds)", rtf["cli"], rtf["patchbay"], digits=4)
    row("RTF with the CLI's whole wall time", cli_wall_rtf, None, digits=4)
    ratio = med(ratios)
    print(f"  RTF_cli / RTF_patchbay, CLI without its model load: median of per-round ratios {ratio:.3f}, "
          f"of medians {med(rtf['cli']) / med(rtf['patchbay']):.3f}, of minima {min(rtf['cli']) / min(rtf['patchbay']):.3f}"
          f"   (target >= {TARGET}: {'ok' if ratio >= TARGET else 'MISSED'})")
    print(f"  RTF_cli / RTF_patchbay with the CLI's whole wall time (model load included): {med(wall_ratios):.3f}")
    beyond_http = [max(1e-9, s["time"] - med(http_path)) for s in p]
    print(f"  RTF_cli / RTF_patchbay with Patchbay's HTTP path (its median) taken off, an estimate of the rest "
          f"(WAV decoding, the plugin, the response): {med([s['time'] / b for s, b in zip(c, beyond_http)]):.3f}")
    for side in sorted(changed):
        print(f"  (note: {NAMES[side]}'s transcript changed between runs)")
    print(f"  {section.note()}")
    return {"duration": duration, "ratio": ratio, "wall_ratio": med(wall_ratios), "agree": agree,
            "rtf": {side: med(rtf[side]) for side in SIDES}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-dir", help="the Swift bin dir with patchbay and the whisper plugin "
                                            "(default: .build/release when complete, else .build/debug)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per clip, each visiting both sides (5)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="n_threads on both sides (default: 2 or the CPU count, whichever is smaller)")
    parser.add_argument("--seconds", type=seconds_list, default=[10.0, 30.0],
                        help="clip lengths in seconds, separated by commas (10,30)")
    parser.add_argument("--beam-size", type=int, default=0,
                        help="0: greedy on both sides (default); 2 to 8: beam search of that size on both")
    parser.add_argument("--whisper-cli", help="the whisper-cli binary (default: $WHISPER_CPP_BIN/whisper-cli or the cache)")
    parser.add_argument("--model", help="the ggml model (default: $WHISPER_MODEL or the cached ggml-tiny.en.bin)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (clips, server log)")
    args = parser.parse_args()
    if args.rounds < 1 or args.threads < 1 or not (args.beam_size == 0 or 2 <= args.beam_size <= 8):
        parser.error("--rounds and --threads must be positive, --beam-size 0 or 2 to 8")
    sys.stdout.reconfigure(line_buffering=True)
    # A SIGTERM (a timeout) ends the run through `finally`, which stops the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    workdir = Path(tempfile.mkdtemp(prefix="patchbay-whisper-bench-"))
    server = None
    try:
        bin_dir, why = choose_build_dir(args.build_dir)
        cli, model = find_cli(args.whisper_cli), find_model(args.model)
        for name, path in (("whisper-cli", cli), ("model", model)):
            if not Path(path).exists():
                raise Failure(f"no {name} at {path}")
        if not shutil.which("espeak-ng"):
            raise Failure("espeak-ng is not installed")
        beam = args.beam_size
        decoding = f"beam search, beam_size {beam}" if beam > 1 else "greedy"
        cli_base = [cli, "-m", model, "-t", str(args.threads), "-l", "en", "-bs", str(beam if beam > 1 else 1),
                    "-bo", str(BEST_OF), "-tp", "0.0", "-fa"]
        load_fields = {"model_path": model, "alias": ALIAS, "n_parallel": 1, "n_threads": args.threads,
                       "beam_size": beam}
        print(f"build dir: {bin_dir} ({why})\nwhisper-cli: {cli}\nmodel: {model}\n"
              f"both sides: {args.threads} threads, {decoding}, best_of {BEST_OF} on fallback, temperature 0 "
              f"(+0.2 fallback steps), language en, timestamps on, no_context, flash attention on\n"
              f"  patchbay load: {json.dumps({k: v for k, v in load_fields.items() if k != 'model_path'})}\n"
              f"  whisper-cli:   {' '.join(Path(a).name if a in (cli, model) else a for a in cli_base)} -f CLIP\n"
              f"rounds {args.rounds}, clips {', '.join(f'{s:g} s' for s in args.seconds)}, {os.cpu_count()} CPUs, "
              f"load average at the start {os.getloadavg()[0]:.2f}")

        started = time.perf_counter()
        server = Server(bin_dir, workdir)
        answer = server.load(load_fields)
        if isinstance(answer, dict) and answer.get("backend") not in (None, "whisper"):
            raise Failure(f"the model loaded with backend {answer.get('backend')!r}, not whisper")
        loaded = re.search(r"loaded .*? decoding", server.log_text())
        print(f"patchbay log: {loaded.group(0) if loaded else '(no load line in the log)'}")

        results = [bench_clip(server, cli_base, seconds, workdir, args.rounds) for seconds in args.seconds]
        if not server.alive():
            raise Failure(f"patchbay exited during the run:\n{server.log_tail()}")

        print("\nsummary, RTF_cli / RTF_patchbay (median of per-round ratios; the CLI without its model load):")
        for r in results:
            print(f"  {r['duration']:6.2f} s: RTF whisper-cli {r['rtf']['cli']:.4f}, patchbay {r['rtf']['patchbay']:.4f}, "
                  f"ratio {r['ratio']:.3f} (target >= {TARGET}: {'ok' if r['ratio'] >= TARGET else 'MISSED'}); "
                  f"with the CLI's model load {r['wall_ratio']:.3f}; transcripts "
                  f"{'identical' if r['agree'] else 'DIFFER'}")
        print(f"took {time.perf_counter() - started:.0f} s")
        return 0
    except Failure as failure:
        print(f"\nFAILED: {failure}", file=sys.stderr)
        return 1
    finally:
        if server:
            server.stop()
        if args.keep:
            print(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
