"""The scripts in examples/ run as their docstrings say, and print what they claim."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, subprocess_env

EXAMPLES = {
    "dropin_openai.py": ["method-b, cached: [True, True, True]",
                         "method-a again, cached: [False, False, False]"],
    "pipeline.py": ["cached [False, False]", "other namespace, cached: [True, True]"],
}


def test_every_example_is_run_here():
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs(name, redis_url, keys, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name)],
                          env=subprocess_env(redis_url, CACHESAVER_PREFIX=keys.prefix),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for line in EXAMPLES[name]:
        assert line in done.stdout, done.stdout
