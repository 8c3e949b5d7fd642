"""Check that a built wheel installs on clusters: one abi3 wheel for CPython ≥ 3.10 whose
platform tags are all manylinux_2_N with N ≤ 28 (glibc 2.28, RHEL 8 and its rebuilds).

Reads both the file name and the WHEEL metadata inside the archive.
Usage: python .ci/check_wheel.py DIST_DIR
"""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

MAX_GLIBC = (2, 28)
PYTHON_ABI = "cp310-abi3"


def platform_problems(platform: str) -> list[str]:
    problems = []
    for tag in platform.split("."):
        m = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64|manylinux(?:2014|2010|1)_x86_64", tag)
        if m is None:
            problems.append(f"platform tag {tag!r} is not manylinux x86_64")
        elif m.group(1) is not None and (int(m.group(1)), int(m.group(2))) > MAX_GLIBC:
            problems.append(f"platform tag {tag!r} needs glibc newer than 2.28")
    return problems


def main(dist: Path) -> int:
    wheels = sorted(dist.glob("keyfuse-*.whl"))
    if len(wheels) != 1:
        print(f"expected one keyfuse wheel in {dist}, found {[w.name for w in wheels]}")
        return 1
    wheel = wheels[0]
    # name-version-python-abi-platform.whl
    _, _, python, abi, platform = wheel.name[: -len(".whl")].split("-")
    problems = [] if f"{python}-{abi}" == PYTHON_ABI else [f"{python}-{abi} is not {PYTHON_ABI}"]
    problems += platform_problems(platform)
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/WHEEL"))
        tags = [
            ln.split(":", 1)[1].strip()
            for ln in z.read(meta).decode().splitlines()
            if ln.startswith("Tag:")
        ]
    if not tags:
        problems.append("the WHEEL metadata lists no tag")
    for tag in tags:
        t_python, t_abi, t_platform = tag.split("-")
        if f"{t_python}-{t_abi}" != PYTHON_ABI:
            problems.append(f"WHEEL tag {tag} is not {PYTHON_ABI}")
        problems += [f"WHEEL tag {tag}: {p}" for p in platform_problems(t_platform)]
    for p in problems:
        print(f"{wheel.name}: {p}")
    if not problems:
        print(f"{wheel.name}: abi3, manylinux ≤ 2.28 ({', '.join(tags)})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
