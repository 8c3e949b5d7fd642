"""Running the reference tools for the side-by-side benchmarks (``--peers DIR``).

The peers are built outside the repository from their public sources with
``../shared/tools/build-peers``; none of their code enters keyfuse.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path


def run_process(cmd: list[str], cwd: Path | str) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MB) of one child process.

    Run under GNU ``time``: a child forked from this (large) Python process would report
    this process's resident memory as its own peak, since Linux keeps the high-water mark
    across ``exec``; ``time`` forks it from a small process instead.
    """
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    if gnu_time is None:
        raise SystemExit("--peers needs GNU time (Debian package 'time') to measure peak memory")
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        proc = subprocess.run(
            [gnu_time, "-f", "%e %U %S %M", "-o", report.name, *cmd],
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr[-500:]}")
        wall, user, system, rss_kb = report.read().split()[-4:]
    return float(wall), float(user) + float(system), float(rss_kb) / 1024


def find_peer(peers: Path, name: str) -> Path | None:
    """The first executable called `name` under the build folder."""
    for p in sorted(peers.rglob(name)):
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None
