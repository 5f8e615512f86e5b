#!/usr/bin/env python3
"""Set up .venv and run a project task: ``python3 dev.py demo|test|lint|bench [args...]``.

Needs only Python >= 3.10: it creates the virtual environment and installs the project
with its CPU and dev extras the first time (and again whenever pyproject.toml changes).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"


def ensure_venv() -> None:
    stamp = VENV / ".inferq-installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if PY.exists() and stamp.exists() and stamp.read_text() == want:
        return
    if not PY.exists():
        print("creating .venv ...", flush=True)
        venv.create(VENV, with_pip=True)
    pip = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    print("installing inferq[cpu,dev] into .venv ...", flush=True)
    subprocess.run([*pip, "-U", "pip"], check=True)
    subprocess.run([*pip, "-e", ".[cpu,dev]"], check=True, cwd=ROOT)
    stamp.write_text(want)


def main(argv: list[str]) -> int:
    task, rest = (argv[0], argv[1:]) if argv else ("", [])
    commands = {
        "demo": [[str(VENV / "bin" / "inferq"), "demo", *rest]],
        "test": [[str(PY), "-m", "pytest", *rest]],
        "lint": [[str(PY), "-m", "ruff", "check", "."], [str(PY), "-m", "mypy"]],
        "bench": [[str(VENV / "bin" / "inferq"), "bench", *rest]],
    }
    if task not in commands:
        print(__doc__)
        return 2
    ensure_venv()
    for command in commands[task]:
        code = subprocess.run(command, cwd=ROOT).returncode
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
