"""``import cachesaver_dist`` stays light: the public names load on first use (issue #11).

Each check runs in a fresh interpreter, where nothing is imported yet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

HEAVY = ("arq", "redis", "workers", "msgpack", "asyncio")

REPORT_LOADED = f"""
import json, sys
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))))
"""


def _run(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("statement", [
    "import cachesaver_dist",
    # the data types and errors need no transport either
    "from cachesaver_dist import Batch, CacheSaverError, Metadata, Request, Response",
])
def test_import_loads_no_heavy_module(statement: str) -> None:
    loaded = json.loads(_run(statement + REPORT_LOADED))
    assert loaded == [], f"{statement!r} imported {loaded}: import them where they are used"


def test_the_check_sees_an_eager_import() -> None:
    loaded = json.loads(_run("import cachesaver_dist\nimport cachesaver_dist.pipelines"
                             + REPORT_LOADED))
    assert {"arq", "redis", "asyncio"} <= set(loaded)


def test_every_public_name_resolves() -> None:
    out = json.loads(_run("""
import importlib, json
import cachesaver_dist as c
names = {n: getattr(c, n) for n in c.__all__}
star = {}
exec("from cachesaver_dist import *", star)
print(json.dumps({
    "all": sorted(c.__all__), "sources": sorted(c._SOURCES),
    "same": sorted(n for n, v in names.items() if v is getattr(
        importlib.import_module("cachesaver_dist." + c._SOURCES[n]), n)),
    "star": sorted(set(star) - {"__builtins__"}),
    "dir": sorted(set(c.__all__) - set(dir(c))),
    "version": c.__version__,
}))
"""))
    assert out["all"] == out["sources"]  # each name knows the module that defines it
    assert out["same"] == out["all"] == out["star"]
    assert out["dir"] == []
    assert out["version"]


def test_unknown_name_is_an_attribute_error() -> None:
    import cachesaver_dist

    with pytest.raises(AttributeError, match="no attribute 'OnlineApi'"):
        cachesaver_dist.OnlineApi  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(ImportError):
        exec("from cachesaver_dist import OnlineApi", {})
