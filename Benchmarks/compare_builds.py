#!/usr/bin/env python3
"""Two builds of Patchbay side by side in one run: host_bench.py and llama_server_bench.py
against each, interleaved, so that a busy machine slows both alike.

Each round runs both benchmarks once per build, the build that goes first alternating from
round to round. It prints every figure per round, then the median of each build and the
ratio new/base (for a latency or a size, lower is better; for a rate, higher).

    git worktree add /tmp/base <rev> && (cd /tmp/base && swift build -c release)
    swift build -c release
    python3 Benchmarks/compare_builds.py /tmp/base/.build/release .build/release --rounds 3

Run it after scripts/test or scripts/run (llama_server_bench.py needs llama.cpp and the model
they fetch). The benchmarks' own arguments are kept small by default (--host-args,
--llama-args replace them).
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# What to read from each benchmark's output: a figure's name, its pattern, and whether more is better.
FIGURES = {
    "host_bench.py": [
        ("host chunks/s (32 streams)", r"throughput: ([\d,]+) chunks/s", True),
        ("host cancel p50 ms", r"cancel -> \[DONE\] at the client: p50 ([\d.]+) ms", False),
        ("host cancel p95 ms", r"cancel -> \[DONE\].*p95 ([\d.]+) ms", False),
        ("host idle RSS MiB", r"host RSS: idle ([\d.]+) MiB", False),
        ("host RSS after runs MiB", r"after the runs ([\d.]+) MiB", False),
    ],
    "llama_server_bench.py": [
        ("decode tokens/s ratio vs llama-server", r"tokens/s ratio Patchbay/direct: ([\d.]+)", True),
        ("added TTFT ms", r"added time to first token:\s+([+-][\d.]+) ms", False),
        ("4 streams tokens/s ratio", r" 4 concurrent streams, aggregate tokens/s ratio: ([\d.]+)", True),
        ("16 streams tokens/s ratio", r"16 concurrent streams, aggregate tokens/s ratio: ([\d.]+)", True),
        ("stop in decode p95 ms", r"during decode,  patchbay: p50 +[\d.]+ ms, p95 +([\d.]+) ms", False),
        ("stop in prefill p95 ms", r"during prefill, patchbay: p50 +[\d.]+ ms, p95 +([\d.]+) ms", False),
        ("cancel in prefill p95 ms", r"/api/inference/cancel: p50 +[\d.]+ ms, p95 +([\d.]+) ms", False),
    ],
}


def run_bench(script: str, build: Path, args: list[str]) -> dict[str, float]:
    env = {**os.environ, "PATCHBAY_BUILD_DIR": str(build)}
    out = subprocess.run([sys.executable, str(HERE / script), *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{script} failed against {build}:\n{out.stdout}\n{out.stderr}")
    figures = {}
    for name, pattern, _ in FIGURES[script]:
        match = re.search(pattern, out.stdout)
        if not match:
            sys.exit(f"{script}: no '{name}' in its output:\n{out.stdout}")
        figures[name] = float(match.group(1).replace(",", ""))
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="the build folder to compare against")
    parser.add_argument("new", type=Path, help="the build folder of the change")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--host-args", default="--streams 32 --tokens 5000 --cancel-rounds 200")
    parser.add_argument("--llama-args", default="--rounds 4 --cancels 6 --prompt-rounds 1 --skip-defaults")
    args = parser.parse_args()
    builds = {"base": args.base.resolve(), "new": args.new.resolve()}
    for label, build in builds.items():
        print(f"{label}: {build}")
    samples = {label: {} for label in builds}
    for round_index in range(args.rounds):
        order = list(builds) if round_index % 2 == 0 else list(reversed(builds))
        for label in order:
            for script, bench_args in (("host_bench.py", args.host_args), ("llama_server_bench.py", args.llama_args)):
                figures = run_bench(script, builds[label], bench_args.split())
                for name, value in figures.items():
                    samples[label].setdefault(name, []).append(value)
                print(f"round {round_index + 1} {label:4s} {script}: "
                      + ", ".join(f"{name} {value:g}" for name, value in figures.items()), flush=True)
    print(f"\nmedians of {args.rounds} rounds:")
    print(f"  {'figure':42s} {'base':>10s} {'new':>10s} {'new/base':>9s}")
    for script in FIGURES:
        for name, _, higher_is_better in FIGURES[script]:
            base, new = (statistics.median(samples[label][name]) for label in ("base", "new"))
            ratio = f"{new / base:9.3f}" if base else f"{'-':>9s}"
            better = "higher is better" if higher_is_better else "lower is better"
            print(f"  {name:42s} {base:10.2f} {new:10.2f} {ratio}   ({better})")


if __name__ == "__main__":
    main()
