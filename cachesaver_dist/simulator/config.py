"""Simulator settings (SimulatorConfig) and injected-failure rules (FaultRule)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

FaultKind = Literal["status", "timeout"]
LatencyDist = Literal["fixed", "uniform", "lognormal"]
LATENCY_DISTS: tuple[str, ...] = get_args(LatencyDist)


def is_int(v: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class FaultRule:
    """An injected failure: an HTTP error (``kind="status"``) or a hang (``kind="timeout"``).

    ``count=None`` fires until cleared; ``model=None`` matches any model. A timeout rule sleeps
    ``seconds`` (the client should give up first), then answers ``status`` (default 504).
    A 429 rule sends ``Retry-After: retry_after`` (default ``SimulatorConfig.fault_retry_after``).
    """

    kind: FaultKind = "status"
    status: int = 500
    count: int | None = None
    model: str | None = None
    seconds: float = 30.0
    retry_after: float | None = None
    message: str | None = None

    @classmethod
    def from_dict(cls, d: Any) -> FaultRule:
        """Build a rule from admin/config JSON; raises ValueError if invalid."""
        if not isinstance(d, dict):
            raise ValueError("each fault must be a JSON object")
        kind = d.get("kind") or "status"
        status, count, ra = d.get("status"), d.get("count"), d.get("retry_after")
        status = 504 if status is None and kind == "timeout" else status
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        problems = [
            (unknown, f"unknown field(s) {unknown}"),
            (kind not in get_args(FaultKind), "'kind' must be 'status' or 'timeout'"),
            (not is_int(status) or not 400 <= status <= 599,  # type: ignore[operator]
             "'status' must be an int 400..599"),
            (count is not None and (not is_int(count) or count < 1),
             "'count' must be >= 1/null"),
            (not isinstance(d.get("model"), (str, type(None))), "'model' must be a string or null"),
            (not is_num(d.get("seconds", 0)) or d.get("seconds", 0) < 0, "bad 'seconds'"),
            (ra is not None and (not is_num(ra) or ra < 0), "bad 'retry_after'"),
        ]
        for bad, msg in problems:
            if bad:
                raise ValueError(msg)
        return cls(**{**d, "kind": kind, "status": status})

    @classmethod
    def parse(cls, spec: str) -> FaultRule:
        """Parse ``STATUS[:COUNT[:MODEL]]`` or ``timeout:SECONDS[:COUNT[:MODEL]]``; COUNT ``*``
        or empty = until cleared. Examples: ``500:2``, ``429:*:my-model``, ``timeout:30:1``."""
        head, *rest = spec.split(":", 3 if spec.startswith("timeout") else 2)
        d: dict[str, Any] = {"kind": "timeout"} if head == "timeout" else {"status": int(head)}
        if head == "timeout" and rest:
            d["seconds"] = float(rest.pop(0))
        if rest:
            cnt = rest.pop(0)
            d["count"] = None if cnt in ("", "*") else int(cnt)
        if rest:
            d["model"] = rest[0] or None
        return cls.from_dict(d)


@dataclass
class SimulatorConfig:
    """Simulator settings. Latency: ``fixed`` sleeps ``latency``; ``uniform`` draws from
    [latency_low, latency_high]; ``lognormal`` has median ``latency`` and shape ``latency_sigma``;
    plus ``latency_per_token`` x completion tokens of the longest choice."""

    host: str = "127.0.0.1"
    port: int = 0
    latency: float = 0.0
    latency_dist: LatencyDist = "fixed"
    latency_low: float = 0.0
    latency_high: float = 0.0
    latency_sigma: float = 0.5
    latency_per_token: float = 0.0
    rate_limit: int | None = None
    rate_window: float = 60.0
    retry_after_integer: bool = False
    fault_retry_after: float = 1.0
    faults: list[FaultRule | dict[str, Any]] = field(default_factory=list)
    models: list[str] | None = None
    min_words: int = 3
    max_words: int = 12
    rng_seed: int | None = None
    shutdown_timeout: float = 2.0

    def validate(self) -> None:
        """Raise ValueError on inconsistent settings (fault dicts are checked by the server)."""
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError("need 1 <= min_words <= max_words")
        if self.rate_limit is not None and (self.rate_limit < 1 or self.rate_window <= 0):
            raise ValueError("rate_limit must be >= 1 and rate_window > 0")
        if self.latency_dist not in LATENCY_DISTS:
            raise ValueError(f"unknown latency_dist {self.latency_dist!r}")
