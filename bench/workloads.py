"""Workloads shared by both drivers: standard library only, so the original's venv runs
them too. Each side supplies ``ask(prompt, n, namespace, request_id) -> Answer``.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

WORDS = ("answer thought step value check branch search reason count plan result idea state "
         "move goal test left right sum product path option guess proof case").split()


@dataclass
class Answer:
    texts: list[str]
    cached: list[bool]
    duplicated: list[bool]
    indices: list[int] | None = None  # ours only: the sample index of each text


Prompt = str | list[dict[str, str]]  # a completion prompt or chat messages
Ask = Callable[[Prompt, int, str, str], Awaitable[Answer]]


def _dropin_call(model: str, prompt: Prompt, n: int, namespace: str,
                 request_id: str) -> dict[str, Any]:
    return {"model": model, "messages": prompt, "n": n, "temperature": 0.7, **CHAT_PARAMS,
            "namespace": namespace, "request_id": request_id, "metadata": True}


def _dropin_answer(result: Any) -> Answer:
    completion, meta = result
    return Answer([c.message.content for c in completion.choices], list(meta.cached),
                  list(meta.duplicated))


def dropin_asker(create: Callable[..., Awaitable[Any]], model: str) -> Ask:
    """An ``Ask`` through a drop-in client's ``chat.completions.create`` (ours or the
    original's: the same call, with ``namespace``, ``request_id`` and ``metadata``): the
    chat workload's fields, as ``hit_path`` sends them."""
    async def ask(prompt: Prompt, n: int, namespace: str, request_id: str) -> Answer:
        return _dropin_answer(await create(**_dropin_call(model, prompt, n, namespace,
                                                          request_id)))
    return ask


async def dropin_phases(create: Callable[..., Awaitable[Any]], spec: dict[str, Any]
                        ) -> dict[str, Any]:
    """``bench.dropin``'s async phases through a drop-in client's ``create`` (warming the
    cache first if the spec says so), as a driver's result."""
    ask = dropin_asker(create, spec["model"])
    if spec.get("warm", True):
        await warm(ask, spec["prompts"], workload=spec["workload"])
    return {"phases": {ph["name"]: await hit_phase(ask, ph, spec) for ph in spec["phases"]}}


def sync_phase(create: Callable[..., Any], spec: dict[str, Any]) -> dict[str, Any]:
    """``bench.dropin``'s sync phase (``sync_sequential``, after an unmeasured warm-up of
    0.3 s), as a driver's result."""
    sync_sequential(create, spec["model"], duration=0.3, prompts=spec["prompts"],
                    tag="sync-warmup")
    return {"phases": {"sync": sync_sequential(create, spec["model"], duration=spec["duration"],
                                               prompts=spec["prompts"],
                                               watch=spec.get("watch"))}}


def sync_sequential(create: Callable[..., Any], model: str, *, duration: float, prompts: int,
                    watch: dict[str, int] | None = None, tag: str = "sync") -> dict[str, Any]:
    """Cache hits through a sync drop-in client, one call after another with no event
    loop running, as a notebook cell or a script makes them: ``closed_loop`` with one
    caller (the same requests, namespaces and result), on the chat workload."""
    meter = _Meter(watch)
    i = 0
    while time.perf_counter() < meter.start + duration:
        t0 = time.perf_counter()
        a = _dropin_answer(create(**_dropin_call(model, chat_prompt(i % prompts), 1,
                                                 f"{tag}-{i // prompts}", f"{tag}/{i:08d}")))
        meter.add(t0, a)
        i += 1
    return meter.result()


def words(text: str) -> int:
    """Tokens, as the simulators count them: whitespace-separated words."""
    return len(str(text).split())


_PROCESS_SALT = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
_counter = itertools.count()


def sim_text(prompt: str) -> str:
    """A fake completion: a unique 8-hex tag plus 4-8 words (like ``SimModel``'s)."""
    seed = hashlib.blake2b(f"{prompt}|{_PROCESS_SALT}|{next(_counter)}".encode(),
                           digest_size=8).digest()
    return " ".join([seed.hex()[:8], *(WORDS[b % len(WORDS)] for b in seed[: 4 + seed[0] % 5])])


def hit_prompt(i: int) -> str:
    return (f"Hit-path prompt {i}: solve the puzzle, think step by step, and explain every "
            f"step briefly before giving the final answer.")


def chat_prompt(i: int) -> list[dict[str, str]]:
    """A chat request as a tree-of-thought run sends it: system prompt + few-shot user
    turn, ~1.5 kB (the original hashes it in ~0.4-0.5 ms, the cost the issue quoted)."""
    return [{"role": "system", "content": _SYSTEM},
            {"role": "user", "content": _PROPOSE + f"Input: {PUZZLES[i % len(PUZZLES)]} "
                                                   f"(instance {i}). Possible next steps:"}]


# The decoding fields a chat request carries besides its messages and temperature.
CHAT_PARAMS: dict[str, Any] = {"max_tokens": 256, "top_p": 0.95, "stop": ["\nInput:"]}
HIT_WORKLOADS: dict[str, Callable[[int], Prompt]] = {"short": hit_prompt, "chat": chat_prompt}


# --- closed-loop callers (hit path, scaling) ------------------------------------------


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process, from /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def machine_idle() -> tuple[int, int]:
    """(idle ticks, all ticks) of the machine's CPUs so far (/proc/stat, Linux; idle
    includes iowait), (0, 0) where it cannot be read."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return ticks[3] + ticks[4], sum(ticks)


def migrations(pid: int) -> int:
    """How often the kernel has moved a process from one CPU to another (Linux)."""
    try:
        with open(f"/proc/{pid}/sched") as f:
            for line in f:
                if line.startswith("se.nr_migrations"):
                    return int(line.split(":")[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


async def closed_loop(ask: Ask, *, callers: int, duration: float, max_requests: int,
                      prompts: int, tag: str, start_at: float | None = None,
                      watch: dict[str, int] | None = None,
                      workload: str = "short", salt: str = "") -> dict[str, Any]:
    """``callers`` coroutines each send one request at a time until ``duration`` s or
    ``max_requests`` in total. Request ``i`` is prompt ``i % prompts`` in namespace
    ``tag-(i // prompts)``: every request is a cross-namespace reuse of sample 0, a hit.
    ``watch``: processes (name -> pid) whose CPU seconds over the loop are reported,
    this one included as ``client``. ``workload``: a key of ``HIT_WORKLOADS``.
    ``salt``: prepended to every (completion) prompt, so a salt never used before and
    ``prompts`` ≥ the requests sent make every request a miss."""
    base = HIT_WORKLOADS[workload]
    prompt_of = (lambda i: f"[{salt}] {base(i)}") if salt else base
    if start_at is not None:
        await asyncio.sleep(max(0.0, start_at - time.time()))
    meter = _Meter(watch)
    counter = itertools.count()
    end = meter.start + duration

    async def caller(c: int) -> None:
        while True:
            i = next(counter)
            if i >= max_requests or time.perf_counter() >= end:
                return
            t0 = time.perf_counter()
            meter.add(t0, await ask(prompt_of(i % prompts), 1, f"{tag}-{i // prompts}",
                                    f"{tag}/{i:08d}"))

    await asyncio.gather(*(caller(c) for c in range(callers)))
    return meter.result()


class _Meter:
    """Latencies, misses and the CPU seconds of ``watch`` (name -> pid; this process is
    ``client``) over a measured loop, as ``closed_loop`` reports them."""

    def __init__(self, watch: dict[str, int] | None) -> None:
        self.watch = {"client": os.getpid(), **(watch or {})}
        self.cpu0 = {k: proc_cpu(p) for k, p in self.watch.items()}
        self.moved0 = {k: migrations(p) for k, p in self.watch.items()}
        self.idle0 = machine_idle()
        self.latencies: list[float] = []
        self.misses = 0
        self.start = time.perf_counter()

    def add(self, sent_at: float, answer: Answer) -> None:
        self.latencies.append((time.perf_counter() - sent_at) * 1000)
        self.misses += not all(answer.cached)

    def result(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.start
        cpu = {k: proc_cpu(p) - self.cpu0[k] for k, p in self.watch.items()}
        moved = {k: migrations(p) - self.moved0[k] for k, p in self.watch.items()}
        idle, ticks = (b - a for a, b in zip(self.idle0, machine_idle()))
        return {"latencies_ms": self.latencies, "wall": wall, "count": len(self.latencies),
                "misses": self.misses, "throughput": len(self.latencies) / wall if wall else 0.0,
                "cpu": cpu, "migrations": moved, "machine_idle": idle / ticks if ticks else None}


async def hit_phase(ask: Ask, phase: dict[str, Any], spec: dict[str, Any],
                    on_measure: Callable[[], None] | None = None) -> dict[str, Any]:
    """One ``hit_path`` phase: an optional unmeasured warm-up, then the measured loop
    (``on_measure`` is called between the two)."""
    common = {"callers": phase["callers"], "max_requests": phase["max_requests"],
              "prompts": spec["prompts"], "workload": spec.get("workload", "short")}
    if phase.get("warmup", 0):
        await closed_loop(ask, duration=phase["warmup"], tag=f"{phase['name']}-warmup",
                          **common)
    if on_measure:
        on_measure()
    return await closed_loop(ask, duration=phase["duration"], tag=phase["name"],
                             start_at=spec.get("start_at"), watch=spec.get("watch"), **common)


async def warm(ask: Ask, prompts: int, concurrency: int = 64, workload: str = "short") -> None:
    """Generate sample 0 of every hit prompt of ``workload``."""
    prompt_of = HIT_WORKLOADS[workload]
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await ask(prompt_of(i), 1, "warm", f"warm/{i:06d}")

    await asyncio.gather(*(one(i) for i in range(prompts)))


# --- a burst of misses ----------------------------------------------------------------


async def burst(ask: Ask, count: int, tag: str) -> dict[str, Any]:
    """``count`` simultaneous requests for distinct, never seen prompts."""
    t0 = time.perf_counter()
    done_at: list[float] = []

    async def one(i: int) -> Answer:
        a = await ask(f"Backlog prompt {tag}/{i}: think step by step.", 1, "burst",
                      f"{tag}/{i:05d}")
        done_at.append(time.perf_counter() - t0)
        return a

    answers = await asyncio.gather(*(one(i) for i in range(count)))
    wall = time.perf_counter() - t0
    return {"wall": wall, "misses": sum(not any(a.cached) for a in answers),
            "first_reply": min(done_at), "median_reply": sorted(done_at)[len(done_at) // 2]}


# --- one client process of the multi-process study --------------------------------------


def mp_prompt(scenario: str, i: int) -> str:
    return f"Shared prompt {scenario}/{i}: propose the next step of the search."


async def mp_client(ask: Ask, *, scenario: str, prompts: int, n: int, namespace: str,
                    seed: int, concurrency: int, start_at: float) -> list[dict[str, Any]]:
    """Every prompt once, in a per-process random order, ``concurrency`` at a time."""
    order = list(range(prompts))
    random.Random(seed).shuffle(order)
    await asyncio.sleep(max(0.0, start_at - time.time()))
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> dict[str, Any]:
        async with sem:
            a = await ask(mp_prompt(scenario, i), n, namespace, f"p{seed}/{i:04d}")
        return {"prompt": i, "texts": a.texts, "indices": a.indices, "cached": a.cached}

    return list(await asyncio.gather(*(one(i) for i in order)))


# --- the savings study: Game of 24, several methods sharing one cache --------------------

PUZZLES = ["4 4 6 8", "1 2 3 4", "2 3 5 12", "1 1 4 6", "3 3 8 8", "1 5 5 5", "2 7 7 10",
           "4 6 6 9", "1 3 4 6", "5 5 9 9", "2 2 2 9", "3 4 7 8", "1 6 8 9", "2 4 4 10",
           "1 1 11 11", "3 3 7 7", "1 4 5 6", "2 5 5 10", "6 6 6 6", "1 2 7 7"]

_SYSTEM = ("You are a careful assistant that solves arithmetic puzzles. Reason one step at a "
           "time, use each number exactly once, show every intermediate result, and never "
           "skip a step. Answer in the format of the examples.")
_PROPOSE = ("Use numbers and basic arithmetic operations (+ - * /) to obtain 24. In each step "
            "you may only use two of the remaining numbers. Example: Input: 2 8 8 14. Possible "
            "next steps: 2 + 8 = 10 (left: 8 10 14); 8 / 2 = 4 (left: 4 8 14); 14 + 2 = 16 "
            "(left: 8 8 16); 2 * 8 = 16 (left: 8 14 16); 8 - 2 = 6 (left: 6 8 14); 14 - 8 = 6 "
            "(left: 2 6 8); 14 / 2 = 7 (left: 7 8 8); 14 - 2 = 12 (left: 8 8 12). ") * 3
_VALUE = ("Evaluate if given numbers can reach 24 (sure/likely/impossible). 10 14: 10 + 14 = "
          "24. sure. 11 12: 11 + 12 = 23, 12 - 11 = 1, 11 * 12 = 132, 11 / 12 = 0.91. "
          "impossible. 4 4 10: 4 + 4 + 10 = 18, 4 * 10 - 4 = 36, (10 - 4) * 4 = 24. sure. ") * 3
_COT = ("Use numbers and basic arithmetic operations (+ - * /) to obtain 24. Each step, you "
        "are only allowed to choose two of the remaining numbers to obtain a new number. "
        "Input: 4 4 6 8. Steps: 4 + 8 = 12 (left: 4 6 12); 6 - 4 = 2 (left: 2 12); 2 * 12 = "
        "24 (left: 24). Answer: (6 - 4) * (4 + 8) = 24. ") * 4

PROPOSALS, VOTES, DEPTH = 5, 3, 3
BEST_OF_N, SC_N = 8, 16


def _h(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big")


def _vote(text: str) -> float:
    return (20.0, 1.0, 0.001)[_h(text) % 3]  # sure / likely / impossible, as in ToT


@dataclass
class Tally:
    requests: int = 0
    samples: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    flagged_new: int = 0  # samples neither cached nor duplicated, by the response flags
    log: list[dict[str, Any]] = field(default_factory=list)

    def add(self, prompt: str, a: Answer) -> None:
        self.requests += 1
        self.samples += len(a.texts)
        self.prompt_tokens += words(prompt)  # billed once per call, as n samples share it
        self.completion_tokens += sum(words(t) for t in a.texts)
        self.flagged_new += sum(not c and not d for c, d in zip(a.cached, a.duplicated))


async def _tot(ask: Ask, tally: Tally, puzzle: str, ns: str, breadth: int) -> None:
    frontier = [""]
    for depth in range(DEPTH):
        proposals = await asyncio.gather(*(
            ask(_PROPOSE + f"Input: {puzzle}. Steps so far:{state or ' none'}. Possible next "
                "steps:", PROPOSALS, ns, f"{puzzle}/{depth}/p/{i:02d}")
            for i, state in enumerate(frontier)))
        children: list[str] = []
        for state, a in zip(frontier, proposals):
            tally.add(_PROPOSE + f"Input: {puzzle}. Steps so far:{state or ' none'}. Possible "
                      "next steps:", a)
            for text in a.texts:
                child = f"{state} | {' '.join(text.split()[1:3])}"
                if child not in children:
                    children.append(child)
        value_prompts = [_VALUE + f"Input: {puzzle}. State:{c}. Evaluate:" for c in children]
        votes = await asyncio.gather(*(ask(p, VOTES, ns, f"{puzzle}/{depth}/v/{i:03d}")
                                       for i, p in enumerate(value_prompts)))
        scored = []
        for child, p, a in zip(children, value_prompts, votes):
            tally.add(p, a)
            scored.append((-sum(_vote(t) for t in a.texts), child))
        frontier = [c for _, c in sorted(scored)[:breadth]]


async def _best_of_n(ask: Ask, tally: Tally, puzzle: str, ns: str) -> None:
    cot = _COT + f"Input: {puzzle}. Steps:"
    a = await ask(cot, BEST_OF_N, ns, f"{puzzle}/cot")
    tally.add(cot, a)
    prompts = [_VALUE + f"Input: {puzzle}. Solution: {t}. Evaluate:" for t in a.texts]
    scores = await asyncio.gather(*(ask(p, 1, ns, f"{puzzle}/score/{i:02d}")
                                    for i, p in enumerate(prompts)))
    for p, s in zip(prompts, scores):
        tally.add(p, s)


async def _self_consistency(ask: Ask, tally: Tally, puzzle: str, ns: str) -> None:
    cot = _COT + f"Input: {puzzle}. Steps:"
    a = await ask(cot, SC_N, ns, f"{puzzle}/cot")
    tally.add(cot, a)
    _ = max(set(_h(t) % 7 for t in a.texts), key=[_h(t) % 7 for t in a.texts].count)  # vote


METHODS: dict[str, tuple[str, Callable[..., Awaitable[None]]]] = {
    "tot-bfs-b3": ("ToT BFS, breadth 3 (5 proposals, 3 value votes, depth 3)",
                   lambda ask, t, p, ns: _tot(ask, t, p, ns, 3)),
    "tot-bfs-b1": ("ToT BFS, breadth 1 (ablation)", lambda ask, t, p, ns: _tot(ask, t, p, ns, 1)),
    "best-of-8": (f"best-of-{BEST_OF_N} (CoT samples + 1 value score each)", _best_of_n),
    "self-consistency-16": (f"self-consistency, {SC_N} CoT samples, majority vote",
                            _self_consistency),
}


async def savings(ask: Ask, puzzles: int, snapshot: Callable[[], Awaitable[dict[str, float]]]
                  ) -> list[dict[str, Any]]:
    """Each method in its own namespace, one after another, puzzles concurrently.

    ``snapshot()`` returns the side's own generation counters (samples, prompt_tokens,
    completion_tokens actually generated by the model); per method the delta is kept.
    """
    rows = []
    for name, (_, method) in METHODS.items():
        tally = Tally()
        before = await snapshot()
        t0 = time.perf_counter()
        await asyncio.gather(*(method(ask, tally, p, name) for p in PUZZLES[:puzzles]))
        seconds = time.perf_counter() - t0
        after = await snapshot()
        rows.append({"method": name, "seconds": seconds, "requests": tally.requests,
                     "samples": tally.samples, "prompt_tokens": tally.prompt_tokens,
                     "completion_tokens": tally.completion_tokens,
                     "flagged_new": tally.flagged_new,
                     "generated": {k: after[k] - before.get(k, 0) for k in after}})
    return rows
