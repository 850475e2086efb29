"""Time and peak memory of each stage of one `onnxlrf` command, as a user runs it.

    python scripts/stage_profile.py --out scripts/results/stages_minilm.json -- \\
        compress minilm --dynamic-batch --data stsb:../shared/data/stsb/sts-test.csv --calib 300 --val 300 \\
        --mode compact --seed 1 -o /tmp/out.onnx

Runs ``python -m onnxlrf.cli ARGS`` as a child process and samples its resident memory (VmRSS of
the child and its descendants, from /proc) every 50 ms. Without a terminal the CLI prints one line
per finished top-level step ("export ...: 3/3 step, 11.6 s"); each such line closes a stage, and
the stage's peak is the largest sample since the previous line. Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

STEP_LINE = re.compile(r"^(?P<stage>.+?): (?:\d+/\d+ \S+, )?(?P<seconds>\d+\.\d) s$")


def _tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and every descendant (0 once it has exited)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        total += int(match.group(1)) * 1024 if match else 0
        pending.extend(int(child) for child in children)
    return total


class _Sampler(threading.Thread):
    """Peak RSS of a process tree since the last :meth:`take`."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = self.overall = 0
        self.running = True
        self.lock = threading.Lock()

    def run(self) -> None:
        while self.running:
            rss = _tree_rss_bytes(self.pid)
            with self.lock:
                self.peak = max(self.peak, rss)
                self.overall = max(self.overall, rss)
            time.sleep(self.interval)

    def take(self) -> int:
        with self.lock:
            peak, self.peak = self.peak, 0
        return peak


def profile(args: list[str]) -> dict:
    """Run the CLI with ``args``; per stage its reported seconds and peak RSS, and the whole run's."""
    command = [sys.executable, "-m", "onnxlrf.cli", *args]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    sampler = _Sampler(child.pid)
    sampler.start()
    stdout: list[str] = []
    reader = threading.Thread(target=lambda: stdout.extend(child.stdout), daemon=True)
    reader.start()
    stages, log = [], []
    for line in child.stderr:
        line = line.rstrip("\n")
        log.append(line)
        print(line, file=sys.stderr, flush=True)
        step = STEP_LINE.match(line)
        if step:
            stages.append({"stage": step["stage"], "seconds": float(step["seconds"]),
                           "peak_rss_gib": sampler.take() / 2**30})
    returncode = child.wait()
    reader.join()
    sampler.running = False
    sampler.join()
    return {"command": " ".join(["onnxlrf", *args]), "returncode": returncode,
            "seconds": time.perf_counter() - start, "peak_rss_gib": sampler.overall / 2**30,
            "stages": stages, "stdout": "".join(stdout), "stderr_tail": log[-20:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="Write the profile as JSON here.")
    parser.add_argument("cli_args", nargs=argparse.REMAINDER, help="onnxlrf arguments, after --")
    args = parser.parse_args()
    cli_args = [a for a in args.cli_args if a != "--"] if args.cli_args[:1] == ["--"] else args.cli_args
    if not cli_args:
        parser.error("give the onnxlrf command after --")
    result = profile(cli_args)
    print(f"{'stage':60s} {'seconds':>9s} {'peak GiB':>9s}")
    for stage in result["stages"]:
        print(f"{stage['stage'][:60]:60s} {stage['seconds']:9.1f} {stage['peak_rss_gib']:9.2f}")
    print(f"{'whole run':60s} {result['seconds']:9.1f} {result['peak_rss_gib']:9.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result["returncode"]


if __name__ == "__main__":
    sys.exit(main())
