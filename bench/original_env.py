"""Create the benchmark virtualenvs (idempotent).

* ``bench/.venv-original``: the original single-process CacheSaver, ``cachesaver==0.0.6``
  (with ``diskcache``), driven by ``bench/_original.py`` in a subprocess.
* ``bench/.venv-tools``: ``matplotlib`` (plots) and ``py-spy`` (profiles of the worker
  and client processes); neither is a dependency of the project.

Usage: ``python bench/original_env.py [--force]``. Our side runs in ``/work/main/.venv``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(os.environ.get("BENCH_HOME") or Path(__file__).resolve().parent)
ROOT = BENCH.parent
ORIGINAL = BENCH / ".venv-original"
TOOLS = BENCH / ".venv-tools"
ORIGINAL_PACKAGES = ["cachesaver==0.0.6"]
TOOLS_PACKAGES = ["matplotlib", "py-spy"]


def _base_python() -> str:
    """A plain interpreter to build venvs from (the project's venv python works too)."""
    ours = ROOT / ".venv" / "bin" / "python"
    return str(ours) if ours.exists() else sys.executable


def _make(venv: Path, packages: list[str], probe: str, force: bool) -> None:
    python = venv / "bin" / "python"
    if not force and python.exists():
        ok = subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0
        if ok:
            print(f"{venv.relative_to(ROOT)}: ready")
            return
    if venv.exists():
        shutil.rmtree(venv)
    print(f"{venv.relative_to(ROOT)}: creating, pip install {' '.join(packages)}", flush=True)
    subprocess.run([_base_python(), "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    *packages], check=True)
    subprocess.run([str(python), "-c", probe], check=True)


def ensure(force: bool = False) -> None:
    _make(ORIGINAL, ORIGINAL_PACKAGES,
          "from cachesaver.pipelines import OnlineAPI; import diskcache", force)
    _make(TOOLS, TOOLS_PACKAGES, "import matplotlib; import shutil, sys; "
          "sys.exit(0 if (__import__('pathlib').Path(sys.prefix) / 'bin' / 'py-spy').exists()"
          " else 1)", force)


if __name__ == "__main__":
    ensure(force="--force" in sys.argv[1:])
