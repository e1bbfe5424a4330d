"""Mutable simulator state: counters, per-model rate windows, fault rules, samples, latency."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import time
import uuid
from collections import deque
from random import Random
from typing import Any

from .config import FaultRule, SimulatorConfig

_WORDS = (
    "amber basil cedar delta ember fable garnet harbor indigo juniper kettle lantern meadow "
    "nectar orbit pebble quartz river saffron timber umber velvet willow xenon yarrow zephyr "
    "anchor breeze canyon dune echo falcon glacier hollow island jasper kelp lagoon marble "
    "nimbus oasis prairie quill ridge summit tundra upland valley walnut yonder zenith acorn"
).split()
COUNTER_KEYS = ("requests", "samples", "prompt_tokens", "completion_tokens",
                "rate_limited", "faults")
MAX_REQUEST_TIMES = 10_000


class State:
    """One server's state; fault rules are copies, so counting them down leaves config alone."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config, self.rng, self.sample_counter = config, Random(config.rng_seed), 0
        self.nonce = uuid.uuid4().hex[:8] if config.rng_seed is None else str(config.rng_seed)
        self.faults = [dataclasses.replace(f) if isinstance(f, FaultRule)
                       else FaultRule.from_dict(f) for f in config.faults]
        self.models_seen: dict[str, None] = dict.fromkeys(config.models or [])
        self.closing, self.started, self.in_flight = asyncio.Event(), int(time.time()), 0
        self.reset()

    def reset(self) -> None:
        """Zero counters, request times and rate windows (fault rules are kept)."""
        self.counters: dict[str, dict[str, int]] = {}
        self.request_times: dict[str, deque[float]] = {}
        self.windows: dict[str, deque[float]] = {}
        self.invalid_requests, self.max_in_flight = 0, self.in_flight

    def model_counters(self, model: str) -> dict[str, int]:
        """The counters of ``model`` (registering it for ``/v1/models`` on first use)."""
        self.models_seen.setdefault(model)
        return self.counters.setdefault(model, dict.fromkeys(COUNTER_KEYS, 0))

    def record_time(self, model: str, wall: float) -> None:
        """Remember when a request for ``model`` arrived (the last MAX_REQUEST_TIMES)."""
        self.request_times.setdefault(model, deque(maxlen=MAX_REQUEST_TIMES)).append(wall)

    def admit(self, model: str, now: float) -> float | None:
        """Sliding-window-log limiter: None if admitted, else seconds until a slot frees."""
        cfg = self.config
        if cfg.rate_limit is None:
            return None
        win = self.windows.setdefault(model, deque())
        while win and win[0] <= now - cfg.rate_window:
            win.popleft()
        if len(win) >= cfg.rate_limit:
            return win[0] + cfg.rate_window - now
        win.append(now)
        return None

    def take_fault(self, model: str) -> FaultRule | None:
        """Return (consuming one count of) the first rule matching ``model``."""
        for rule in self.faults:
            if rule.model is None or rule.model == model:
                if rule.count is not None:
                    rule.count -= 1
                    if rule.count <= 0:
                        self.faults.remove(rule)
                return rule
        return None

    def draw_latency(self) -> float:
        """Seconds to sleep per request, from the configured distribution."""
        cfg = self.config
        if cfg.latency_dist == "uniform":
            return self.rng.uniform(cfg.latency_low, cfg.latency_high)
        if cfg.latency_dist == "lognormal" and cfg.latency > 0:
            return self.rng.lognormvariate(math.log(cfg.latency), cfg.latency_sigma)
        return cfg.latency

    async def sleep(self, seconds: float) -> None:
        """Sleep, waking early when the server shuts down."""
        if seconds > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.closing.wait(), seconds)

    def sample(self, model: str, req: dict[str, Any], index: int) -> str:
        """One fake completion: 8-hex tag + words; its length is drawn from the hash."""
        cfg = self.config
        if req.get("seed") is not None:
            salt = f"seed={req['seed']}/{index}"
        else:
            self.sample_counter += 1
            salt = f"{self.nonce}#{self.sample_counter}"
        key = json.dumps([model, req["messages"], req.get("temperature"), req.get("top_p"), salt],
                         sort_keys=True)
        block = hashlib.sha256(key.encode()).digest()
        n_words = cfg.min_words + block[0] % (cfg.max_words - cfg.min_words + 1)
        words = [block[:4].hex()]
        while len(words) < n_words:
            block = hashlib.sha256(block).digest()
            words.extend(_WORDS[b % len(_WORDS)] for b in block[: n_words - len(words)])
        return " ".join(words)

    def counters_json(self) -> dict[str, Any]:
        """The ``GET /admin/counters`` body."""
        models = {m: {**c, "request_times": list(self.request_times.get(m, ()))}
                  for m, c in self.counters.items()}
        total = {k: sum(c[k] for c in self.counters.values()) for k in COUNTER_KEYS}
        return {"models": models, "total": total, "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight, "invalid_requests": self.invalid_requests}
