"""Local OpenAI-compatible LLM simulator (``POST /v1/chat/completions``) for tests and benches.

Samples are fake but distinct: ``<8-hex tag> word word ...`` from a SHA-256 of (model, messages,
temperature, top_p, salt); the salt is a per-server nonce (``rng_seed`` if set) plus a sample
counter, or (``seed``, choice index) when the request has a ``seed`` (then it is reproducible).
Tokens ~= whitespace-separated words, for prompt and completion alike.

Rate limit: per-model *sliding window log* (at most ``rate_limit`` admitted requests in any
``rate_window`` s; rejected ones take no slot); a 429 has ``Retry-After`` (fractional seconds
like ``"0.25"``, or a ceil'd integer with ``retry_after_integer``) and ``retry-after-ms``.
Checks run in order: body (400) -> rate limit (429) -> fault rules (a faulted request did take a
rate slot) -> latency sleep -> reply. Admin (server root): ``GET /admin/counters``,
``POST /admin/reset``, ``GET|POST|DELETE /admin/faults``, ``GET /health``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import signal
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from random import Random
from typing import Any, Literal

from aiohttp import web

logger = logging.getLogger("cachesaver_dist.simulator")

_WORDS = (
    "amber basil cedar delta ember fable garnet harbor indigo juniper kettle lantern meadow "
    "nectar orbit pebble quartz river saffron timber umber velvet willow xenon yarrow zephyr "
    "anchor breeze canyon dune echo falcon glacier hollow island jasper kelp lagoon marble "
    "nimbus oasis prairie quill ridge summit tundra upland valley walnut yonder zenith acorn"
).split()
COUNTER_KEYS = ("requests", "samples", "prompt_tokens", "completion_tokens",
                "rate_limited", "faults")
MAX_REQUEST_TIMES = 10_000
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                404: "invalid_request_error", 429: "requests"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class FaultRule:
    """An injected failure: an HTTP error (``kind="status"``) or a hang (``kind="timeout"``).

    ``count=None`` fires until cleared; ``model=None`` matches any model. A timeout rule sleeps
    ``seconds`` (the client should give up first), then answers ``status`` (default 504).
    A 429 rule sends ``Retry-After: retry_after`` (default ``SimulatorConfig.fault_retry_after``).
    """

    kind: Literal["status", "timeout"] = "status"
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
            (kind not in ("status", "timeout"), "'kind' must be 'status' or 'timeout'"),
            (not _is_int(status) or not 400 <= status <= 599, "'status' must be an int 400..599"),
            (count is not None and (not _is_int(count) or count < 1), "'count' must be >= 1/null"),
            (not isinstance(d.get("model"), (str, type(None))), "'model' must be a string or null"),
            (not _is_num(d.get("seconds", 0)) or d.get("seconds", 0) < 0, "bad 'seconds'"),
            (ra is not None and (not _is_num(ra) or ra < 0), "bad 'retry_after'"),
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
    latency_dist: Literal["fixed", "uniform", "lognormal"] = "fixed"
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


class _Invalid(Exception):
    def __init__(self, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


def _error(status: int, message: str, code: str | None, param: str | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    """An OpenAI-style error response."""
    etype = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": etype, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _retry_headers(seconds: float, integer: bool) -> dict[str, str]:
    seconds = max(seconds, 0.001)
    value = str(math.ceil(seconds)) if integer else f"{seconds:.3f}".rstrip("0").rstrip(".")
    return {"Retry-After": value, "retry-after-ms": str(math.ceil(seconds * 1000))}


def _validate(body: Any) -> dict[str, Any]:
    """Check a chat-completions body; return normalised params or raise _Invalid."""
    if not isinstance(body, dict):
        raise _Invalid("Request body must be a JSON object.", "invalid_body")
    model, msgs = body.get("model"), body.get("messages")
    if not isinstance(model, str) or not model.strip():
        code = "missing_model" if model is None else "invalid_model"
        raise _Invalid("'model' is required and must be a non-empty string.", code, "model")
    ok = isinstance(msgs, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in msgs)
    if not ok or not msgs:
        code = "missing_messages" if msgs is None else "invalid_messages"
        raise _Invalid("'messages' is required and must be a non-empty array of "
                       "{'role': str, 'content': ...} objects.", code, "messages")
    n = 1 if body.get("n") is None else body["n"]
    if not _is_int(n) or not 1 <= n <= 128:
        raise _Invalid(f"'n' must be an integer between 1 and 128, got {n!r}.", "invalid_n", "n")
    for name, ok, lo, hi in (("max_tokens", _is_int, 1, math.inf), ("temperature", _is_num, 0, 2),
                             ("top_p", _is_num, 0, 1), ("seed", _is_int, -math.inf, math.inf)):
        v = body.get(name)
        if v is not None and (not ok(v) or not lo <= v <= hi):
            raise _Invalid(f"'{name}' must be a number in [{lo}, {hi}], got {v!r}.",
                           f"invalid_{name}", name)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _Invalid("'stop' must be a string or an array of strings.", "invalid_stop", "stop")
    if body.get("stream"):
        raise _Invalid("stream=true is not supported by the simulator.", "unsupported", "stream")
    return {**body, "n": n, "stop": [s for s in stops if s]}


def _count_words(messages: list[dict[str, Any]]) -> int:
    """Prompt tokens ~= whitespace words of string contents and ``text`` parts."""
    total = 0
    for m in messages:
        c = m.get("content")
        for p in [c] if isinstance(c, str) else c if isinstance(c, list) else []:
            text = p if isinstance(p, str) else p.get("text") if isinstance(p, dict) else None
            total += len(text.split()) if isinstance(text, str) else 0
    return total


def _finish(text: str, stops: list[str], max_tokens: int | None) -> tuple[str, str]:
    """Cut at the earliest stop string, then truncate to max_tokens words ("length")."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    text = text[: min(cuts)].rstrip() if cuts else text
    words = text.split()
    if max_tokens is not None and len(words) > max_tokens:
        return " ".join(words[:max_tokens]), "length"
    return text, "stop"


class _State:
    """Mutable server state: counters, rate windows, fault rules."""

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
        cfg, temp = self.config, req.get("temperature")
        if req.get("seed") is not None:
            salt = f"seed={req['seed']}/{index}"
        else:
            self.sample_counter += 1
            salt = f"{self.nonce}#{self.sample_counter}"
        key = json.dumps([model, req["messages"], temp, req.get("top_p"), salt], sort_keys=True)
        block = hashlib.sha256(key.encode()).digest()
        n_words = cfg.min_words + block[0] % (cfg.max_words - cfg.min_words + 1)
        words = [block[:4].hex()]
        while len(words) < n_words:
            block = hashlib.sha256(block).digest()
            words.extend(_WORDS[b % len(_WORDS)] for b in block[: n_words - len(words)])
        return " ".join(words)

    def counters_json(self) -> dict[str, Any]:
        models = {m: {**c, "request_times": list(self.request_times.get(m, ()))}
                  for m, c in self.counters.items()}
        total = {k: sum(c[k] for c in self.counters.values()) for k in COUNTER_KEYS}
        return {"models": models, "total": total, "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight, "invalid_requests": self.invalid_requests}


STATE = web.AppKey("simulator_state", _State)


async def _chat(request: web.Request) -> web.Response:
    st = request.app[STATE]
    st.in_flight += 1
    st.max_in_flight = max(st.max_in_flight, st.in_flight)
    try:
        return await _chat_inner(st, request)
    finally:
        st.in_flight -= 1


async def _chat_inner(st: _State, request: web.Request) -> web.Response:
    cfg = st.config
    try:
        req = _validate(await request.json())
    except (ValueError, UnicodeDecodeError, _Invalid) as e:
        st.invalid_requests += 1
        if isinstance(e, _Invalid):
            return _error(400, e.message, e.code, e.param)
        return _error(400, "Could not parse the request body as JSON.", "invalid_json")
    model = req["model"]
    st.models_seen.setdefault(model)
    c = st.counters.setdefault(model, dict.fromkeys(COUNTER_KEYS, 0))
    wall, wait = time.time(), st.admit(model, time.monotonic())
    if wait is not None:
        c["rate_limited"] += 1
        msg = f"Rate limit reached for {model}: {cfg.rate_limit} requests per {cfg.rate_window}s."
        return _error(429, msg, "rate_limit_exceeded",
                      headers=_retry_headers(wait, cfg.retry_after_integer))
    rule = st.take_fault(model)
    if rule is not None:
        c["faults"] += 1
        logger.debug("injecting fault %s for model %s", rule, model)
        if rule.kind == "timeout":
            await st.sleep(rule.seconds)
            return _error(rule.status, rule.message or "Simulated upstream timeout.", "timeout")
        ra = cfg.fault_retry_after if rule.retry_after is None else rule.retry_after
        headers = _retry_headers(ra, cfg.retry_after_integer) if rule.status == 429 else None
        return _error(rule.status, rule.message or f"Simulated fault (HTTP {rule.status}).",
                      "simulated_fault", headers=headers)
    prompt_tokens, choices, lengths = _count_words(req["messages"]), [], []
    for i in range(req["n"]):
        text, reason = _finish(st.sample(model, req, i), req["stop"], req.get("max_tokens"))
        lengths.append(len(text.split()))
        choices.append({"index": i, "message": {"role": "assistant", "content": text},
                        "logprobs": None, "finish_reason": reason})
    await st.sleep(st.draw_latency() + cfg.latency_per_token * max(lengths))
    for key, value in (("requests", 1), ("samples", len(choices)),
                       ("prompt_tokens", prompt_tokens), ("completion_tokens", sum(lengths))):
        c[key] += value
    st.request_times.setdefault(model, deque(maxlen=MAX_REQUEST_TIMES)).append(wall)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": sum(lengths),
             "total_tokens": prompt_tokens + sum(lengths)}
    return web.json_response({
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
        "created": int(wall), "model": model, "system_fingerprint": "cachesaver-simulator",
        "choices": choices, "usage": usage})


async def _admin(request: web.Request) -> web.Response:
    """``/v1/models``, ``/health`` and ``/admin/{counters,reset,faults}``."""
    st, path, method = request.app[STATE], request.path, request.method
    if path == "/v1/models":
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "created": st.started, "owned_by": "simulator"}
            for m in st.models_seen]})
    if path == "/health":
        return web.json_response({"status": "ok"})
    if path == "/admin/counters":
        return web.json_response(st.counters_json())
    if path == "/admin/reset":
        st.reset()
        return web.json_response({"ok": True})
    if method == "DELETE":
        st.faults.clear()
    elif method == "POST":
        try:
            body = await request.json()
            if not isinstance(body, dict) or not isinstance(body.get("faults"), list):
                raise ValueError('body must be {"faults": [...], "append": false}')
            rules = [FaultRule.from_dict(f) for f in body["faults"]]
        except ValueError as e:
            return _error(400, f"Invalid faults: {e}", "invalid_faults", "faults")
        st.faults = [*st.faults, *rules] if body.get("append") else rules
        logger.info("fault rules now: %s", st.faults)
    return web.json_response({"faults": [dataclasses.asdict(f) for f in st.faults]})


def build_app(config: SimulatorConfig | None = None) -> web.Application:
    """Create the aiohttp application (routes: see the module docstring)."""
    cfg = config or SimulatorConfig()
    if not 1 <= cfg.min_words <= cfg.max_words:
        raise ValueError("need 1 <= min_words <= max_words")
    if cfg.rate_limit is not None and (cfg.rate_limit < 1 or cfg.rate_window <= 0):
        raise ValueError("rate_limit must be >= 1 and rate_window > 0")
    if cfg.latency_dist not in ("fixed", "uniform", "lognormal"):
        raise ValueError(f"unknown latency_dist {cfg.latency_dist!r}")
    app = web.Application()
    app[STATE] = _State(cfg)

    async def on_shutdown(app: web.Application) -> None:
        app[STATE].closing.set()

    app.on_shutdown.append(on_shutdown)
    app.router.add_post("/v1/chat/completions", _chat)
    for path in ("/v1/models", "/health", "/admin/counters"):
        app.router.add_get(path, _admin)
    app.router.add_post("/admin/reset", _admin)
    for method in ("GET", "POST", "DELETE"):
        app.router.add_route(method, "/admin/faults", _admin)
    return app


@contextlib.asynccontextmanager
async def running_simulator(config: SimulatorConfig | None = None) -> AsyncIterator[str]:
    """Serve in the current event loop; yield ``http://HOST:PORT/v1``.

    That is the ``base_url`` for OpenAI-style clients (they POST ``{url}/chat/completions``).
    together>=2 appends ``/v1/chat/completions`` itself: give it ``together_base_url(url)``
    (= ``url.removesuffix("/v1")``). Admin endpoints live under ``root_url(url)``.
    """
    cfg = config or SimulatorConfig()
    runner = web.AppRunner(build_app(cfg), access_log=None, handler_cancellation=True,
                           shutdown_timeout=cfg.shutdown_timeout)
    await runner.setup()
    try:
        await web.TCPSite(runner, cfg.host, cfg.port).start()
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        url = f"http://{host}:{runner.addresses[0][1]}/v1"
        logger.info("LLM simulator listening on %s", url)
        yield url
    finally:
        await runner.cleanup()


def root_url(url: str) -> str:
    """Server root (where ``/admin/...`` lives) for a URL yielded by running_simulator."""
    return url.removesuffix("/").removesuffix("/v1")


def together_base_url(url: str) -> str:
    """``base_url`` for ``together.(Async)Together``: 1.x wants ``.../v1``, >=2 the root."""
    try:
        import together

        major = int(str(together.__version__).split(".")[0])
    except (ImportError, ValueError, AttributeError):
        major = 2
    return url if major < 2 else root_url(url)


async def _serve(config: SimulatorConfig) -> None:
    stop, loop = asyncio.Event(), asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running_simulator(config) as url:
        print(f"LLM simulator listening on {url}", flush=True)
        await stop.wait()
    logger.info("LLM simulator stopped")


def serve(config: SimulatorConfig) -> None:
    """Run until SIGINT/SIGTERM; prints ``LLM simulator listening on URL`` on startup."""
    asyncio.run(_serve(config))


_FLAGS: list[tuple[str, dict[str, Any], str]] = [
    ("--host", {"default": "127.0.0.1"}, "interface to bind"),
    ("--port", {"type": int, "default": 8000}, "TCP port; 0 picks a free one"),
    ("--latency", {"type": float, "default": 0.0},
     "seconds per request (fixed), or the median for --latency-dist lognormal"),
    ("--latency-dist", {"choices": ["fixed", "uniform", "lognormal"], "default": "fixed"},
     "latency distribution"),
    ("--latency-low", {"type": float, "default": 0.0}, "uniform latency lower bound, seconds"),
    ("--latency-high", {"type": float, "default": 0.0}, "uniform latency upper bound, seconds"),
    ("--latency-sigma", {"type": float, "default": 0.5}, "lognormal latency sigma"),
    ("--latency-per-token", {"type": float, "default": 0.0},
     "extra seconds per completion token of the longest choice"),
    ("--rate-limit", {"type": int, "default": None},
     "max requests per --rate-window per model (sliding window; default unlimited)"),
    ("--rate-window", {"type": float, "default": 60.0}, "rate-limit window, seconds"),
    ("--retry-after-integer", {"action": "store_true"},
     "send Retry-After as a ceil'd integer instead of fractional seconds"),
    ("--fault", {"action": "append", "type": FaultRule.parse, "default": [], "metavar": "SPEC",
                 "dest": "faults"},
     "fault rule (repeatable): STATUS[:COUNT[:MODEL]] or timeout:SECONDS[:COUNT[:MODEL]]; "
     "COUNT '*' = until cleared; e.g. 500:2, 429:*:my-model, timeout:30:1"),
    ("--fault-retry-after", {"type": float, "default": 1.0},
     "Retry-After seconds sent by injected 429 faults"),
    ("--model", {"action": "append", "dest": "models", "metavar": "NAME"},
     "model listed by /v1/models before it is first used (repeatable)"),
    ("--min-words", {"type": int, "default": 3}, "min words (= tokens) per sample"),
    ("--max-words", {"type": int, "default": 12}, "max words (= tokens) per sample"),
    ("--rng-seed", {"type": int, "default": None},
     "seed for latency draws and sample texts (default: random per server start)"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulator`` sub-command flags (defaults are shown in --help)."""
    for flag, kwargs, text in _FLAGS:
        default = kwargs.get("default")
        shown = f" (default {default})" if default not in (None, [], False) else ""
        parser.add_argument(flag, help=text + shown, **kwargs)


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """Translate parsed ``add_arguments`` flags into a SimulatorConfig."""
    names = {f.name for f in dataclasses.fields(SimulatorConfig)}
    return SimulatorConfig(**{k: v for k, v in vars(args).items() if k in names})


def main_from_args(args: argparse.Namespace) -> None:
    """CLI entry point: build the config from ``args`` and serve until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    serve(config_from_args(args))
