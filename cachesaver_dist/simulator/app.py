"""The aiohttp server: routes, request handling order, and ways to run it.

``POST /v1/chat/completions`` (OpenAI format, ``wire``) and ``POST /v1/messages``
(Anthropic format, ``anthropic_wire``) check in order: body (400) -> rate limit (429) ->
fault rules (a faulted request did take a rate slot) -> latency sleep -> reply (JSON, or
server-sent events with ``stream: true``); errors are in each API's own format. Admin
(server root): ``GET /admin/counters``, ``POST /admin/reset``,
``GET|POST|DELETE /admin/faults``, ``GET /health``; plus ``GET /v1/models``.

Base URLs: the openai SDK (and OpenAI-compatible clients) take ``http://HOST:PORT/v1``;
the together (>= 2) and anthropic SDKs take the server root ``http://HOST:PORT`` (they
append ``/v1/...`` themselves). ``base_urls(url)`` gives each; ``serve`` prints them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

from aiohttp import web

from . import anthropic_wire, wire
from .config import FaultRule, SimulatorConfig
from .state import State

logger = logging.getLogger("cachesaver_dist.simulator")

STATE = web.AppKey("simulator_state", State)


class Dialect(NamedTuple):
    """One wire format: how a body is read, an error written, a reply built and streamed."""

    read: Callable[[web.Request], Awaitable[dict[str, Any]]]
    error: Callable[..., web.Response]
    reply: Callable[[State, str, float, dict[str, Any], int], tuple[dict[str, Any], list[int]]]
    events: Callable[[dict[str, Any], dict[str, Any]], list[tuple[str | None, Any]]]


def _chat_reply(st: State, model: str, wall: float, req: dict[str, Any], prompt_tokens: int
                ) -> tuple[dict[str, Any], list[int]]:
    texts = [wire.finish(st.sample(model, req, i), req["stop"], req["max_tokens"])
             for i in range(req["n"])]
    lengths = [len(text.split()) for text, _ in texts]
    choices = [wire.choice(i, text, reason, req) for i, (text, reason) in enumerate(texts)]
    return wire.completion(model, wall, choices, prompt_tokens, sum(lengths)), lengths


def _message_reply(st: State, model: str, wall: float, req: dict[str, Any], prompt_tokens: int
                   ) -> tuple[dict[str, Any], list[int]]:
    body = anthropic_wire.message(model, st.sample(model, req, 0), req, prompt_tokens)
    return body, [body["usage"]["output_tokens"]]


CHAT = Dialect(wire.read_request, wire.error, _chat_reply, wire.chunks)
MESSAGES = Dialect(anthropic_wire.read_request, anthropic_wire.error, _message_reply,
                   lambda body, req: anthropic_wire.events(body))


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _handle(request, CHAT)


async def _messages(request: web.Request) -> web.StreamResponse:
    return await _handle(request, MESSAGES)


async def _handle(request: web.Request, dialect: Dialect) -> web.StreamResponse:
    st = request.app[STATE]
    st.in_flight += 1
    st.max_in_flight = max(st.max_in_flight, st.in_flight)
    try:
        return await _complete(st, request, dialect)
    finally:
        st.in_flight -= 1


async def _complete(st: State, request: web.Request, d: Dialect) -> web.StreamResponse:
    cfg = st.config
    try:
        req = await d.read(request)
    except wire.Invalid as e:
        st.invalid_requests += 1
        return d.error(400, e.message, e.code, e.param)
    model = req["model"]
    c = st.model_counters(model)
    wall, wait = time.time(), st.admit(model, time.monotonic())
    if wait is not None:
        c["rate_limited"] += 1
        msg = f"Rate limit reached for {model}: {cfg.rate_limit} requests per {cfg.rate_window}s."
        return d.error(429, msg, "rate_limit_exceeded",
                       headers=wire.retry_headers(wait, cfg.retry_after_integer))
    rule = st.take_fault(model)
    if rule is not None:
        c["faults"] += 1
        return await _fault(st, rule, model, d)
    prompt_tokens = wire.count_words(req["messages"])
    body, lengths = d.reply(st, model, wall, req, prompt_tokens)
    await st.sleep(st.draw_latency() + cfg.latency_per_token * max(lengths))
    c["requests"] += 1
    c["samples"] += len(lengths)
    c["prompt_tokens"] += prompt_tokens
    c["completion_tokens"] += sum(lengths)
    st.record_time(model, wall)
    if req.get("stream"):
        return await _sse(request, d.events(body, req))
    return web.json_response(body)


async def _sse(request: web.Request, events: list[tuple[str | None, Any]]
               ) -> web.StreamResponse:
    """Send ``events`` as server-sent events (``event:`` lines only where named)."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    for name, data in events:
        head = f"event: {name}\n" if name else ""
        text = data if isinstance(data, str) else json.dumps(data)
        await resp.write(f"{head}data: {text}\n\n".encode())
    await resp.write_eof()
    return resp


async def _fault(st: State, rule: FaultRule, model: str, d: Dialect) -> web.Response:
    """Apply an injected fault: hang then fail (timeout), or fail at once (status)."""
    logger.debug("injecting fault %s for model %s", rule, model)
    if rule.kind == "timeout":
        await st.sleep(rule.seconds)
        return d.error(rule.status, rule.message or "Simulated upstream timeout.", "timeout")
    cfg = st.config
    ra = cfg.fault_retry_after if rule.retry_after is None else rule.retry_after
    headers = wire.retry_headers(ra, cfg.retry_after_integer) if rule.status == 429 else None
    return d.error(rule.status, rule.message or f"Simulated fault (HTTP {rule.status}).",
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
    app.router.add_post("/v1/messages", _messages)
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
    together>=2 and anthropic append ``/v1/...`` themselves: give them
    ``together_base_url(url)`` / ``anthropic_base_url(url)`` (the server root).
    Admin endpoints live under ``root_url(url)``.
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


def anthropic_base_url(url: str) -> str:
    """``base_url`` for ``anthropic.(Async)Anthropic``: the server root."""
    return root_url(url)


def base_urls(url: str) -> dict[str, str]:
    """The ``base_url`` each SDK takes, for a URL yielded by running_simulator."""
    return {"openai": url, "together": together_base_url(url),
            "anthropic": anthropic_base_url(url)}


async def _serve(config: SimulatorConfig) -> None:
    stop, loop = asyncio.Event(), asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running_simulator(config) as url:
        print(f"LLM simulator listening on {url}", flush=True)
        for sdk, base in base_urls(url).items():
            print(f"  {sdk} SDK: base_url={base}", flush=True)
        await stop.wait()
    logger.info("LLM simulator stopped")


def serve(config: SimulatorConfig) -> None:
    """Run until SIGINT/SIGTERM; prints ``LLM simulator listening on URL`` on startup, then
    one ``  <sdk> SDK: base_url=<url>`` line per SDK (openai, together, anthropic)."""
    asyncio.run(_serve(config))
