"""``import producer`` stays light: no worker code, no ONNX Runtime, no Celery."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("workers", "onnxruntime", "celery")

PROBE = """
import json, sys
import producer
from producer import client, wire, errors, jobs
print(json.dumps(sorted(sys.modules)))
"""


def test_importing_producer_pulls_in_no_worker_modules() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    modules = json.loads(out.stdout.strip().splitlines()[-1])
    assert "producer.client" in modules  # the probe really imported the package
    leaked = [m for m in modules if m.split(".")[0].startswith(FORBIDDEN)]
    assert leaked == [], f"import producer imported {leaked}"
