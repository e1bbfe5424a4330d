"""The aiohttp server: routes, request handling order, and ways to run it.

``POST /v1/chat/completions`` checks run in order: body (400) -> rate limit (429) -> fault rules
(a faulted request did take a rate slot) -> latency sleep -> reply. Admin (server root):
``GET /admin/counters``, ``POST /admin/reset``, ``GET|POST|DELETE /admin/faults``,
``GET /health``; plus ``GET /v1/models``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import AsyncIterator

from aiohttp import web

from . import wire
from .config import FaultRule, SimulatorConfig
from .state import State

logger = logging.getLogger("cachesaver_dist.simulator")

STATE = web.AppKey("simulator_state", State)


async def _chat(request: web.Request) -> web.Response:
    st = request.app[STATE]
    st.in_flight += 1
    st.max_in_flight = max(st.max_in_flight, st.in_flight)
    try:
        return await _complete(st, request)
    finally:
        st.in_flight -= 1


async def _complete(st: State, request: web.Request) -> web.Response:
    cfg = st.config
    try:
        req = await wire.read_request(request)
    except wire.Invalid as e:
        st.invalid_requests += 1
        return wire.error(400, e.message, e.code, e.param)
    model = req["model"]
    c = st.model_counters(model)
    wall, wait = time.time(), st.admit(model, time.monotonic())
    if wait is not None:
        c["rate_limited"] += 1
        msg = f"Rate limit reached for {model}: {cfg.rate_limit} requests per {cfg.rate_window}s."
        return wire.error(429, msg, "rate_limit_exceeded",
                          headers=wire.retry_headers(wait, cfg.retry_after_integer))
    rule = st.take_fault(model)
    if rule is not None:
        c["faults"] += 1
        return await _fault(st, rule, model)
    prompt_tokens = wire.count_words(req["messages"])
    texts = [wire.finish(st.sample(model, req, i), req["stop"], req.get("max_tokens"))
             for i in range(req["n"])]
    lengths = [len(text.split()) for text, _ in texts]
    await st.sleep(st.draw_latency() + cfg.latency_per_token * max(lengths))
    c["requests"] += 1
    c["samples"] += len(texts)
    c["prompt_tokens"] += prompt_tokens
    c["completion_tokens"] += sum(lengths)
    st.record_time(model, wall)
    return wire.completion(model, wall, texts, prompt_tokens, sum(lengths))


async def _fault(st: State, rule: FaultRule, model: str) -> web.Response:
    """Apply an injected fault: hang then fail (timeout), or fail at once (status)."""
    logger.debug("injecting fault %s for model %s", rule, model)
    if rule.kind == "timeout":
        await st.sleep(rule.seconds)
        return wire.error(rule.status, rule.message or "Simulated upstream timeout.", "timeout")
    cfg = st.config
    ra = cfg.fault_retry_after if rule.retry_after is None else rule.retry_after
    headers = wire.retry_headers(ra, cfg.retry_after_integer) if rule.status == 429 else None
    return wire.error(rule.status, rule.message or f"Simulated fault (HTTP {rule.status}).",
                      "simulated_fault", headers=headers)


async def _models(request: web.Request) -> web.Response:
    st = request.app[STATE]
    return web.json_response({"object": "list", "data": [
        {"id": m, "object": "model", "created": st.started, "owned_by": "simulator"}
        for m in st.models_seen]})


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _counters(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].counters_json())


async def _reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return web.json_response({"ok": True})


async def _faults(request: web.Request) -> web.Response:
    """GET lists the fault rules, DELETE clears them, POST replaces (or appends to) them."""
    st = request.app[STATE]
    if request.method == "DELETE":
        st.faults.clear()
    elif request.method == "POST":
        try:
            body = await request.json()
            if not isinstance(body, dict) or not isinstance(body.get("faults"), list):
                raise ValueError('body must be {"faults": [...], "append": false}')
            rules = [FaultRule.from_dict(f) for f in body["faults"]]
        except ValueError as e:
            return wire.error(400, f"Invalid faults: {e}", "invalid_faults", "faults")
        st.faults = [*st.faults, *rules] if body.get("append") else rules
        logger.info("fault rules now: %s", st.faults)
    return web.json_response({"faults": [dataclasses.asdict(f) for f in st.faults]})


async def _on_shutdown(app: web.Application) -> None:
    app[STATE].closing.set()


def build_app(config: SimulatorConfig | None = None) -> web.Application:
    """Create the aiohttp application (routes: see the module docstring)."""
    cfg = config or SimulatorConfig()
    cfg.validate()
    app = web.Application()
    app[STATE] = State(cfg)
    app.on_shutdown.append(_on_shutdown)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/admin/counters", _counters)
    app.router.add_post("/admin/reset", _reset)
    for method in ("GET", "POST", "DELETE"):
        app.router.add_route(method, "/admin/faults", _faults)
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
