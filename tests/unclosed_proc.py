"""An in-process pipeline never closed, whose loop is stopped at any turn (as a nested
``asyncio.run`` under nest_asyncio, in a notebook, stops it) and then ended as
``asyncio.run()`` ends: every task cancelled once, and waited for. Prints what it saw
(for test_pipeline).

Usage: python -m tests.unclosed_proc PREFIX (the Redis server comes from REDIS_URL).

redis-py 5 wrote each command in a task of its own under ``asyncio.wait_for``, which
returns normally when its task is cancelled after that write ended and before it resumed:
the in-process cache worker's loop, cancelled then, ran on and the script never exited.
The loop is stopped at that turn when there is one (else after a few seconds).
"""

from __future__ import annotations

import asyncio
import os
import sys

from cachesaver_dist import OnlineAPI, Request, SimModel


def awaiting(task: asyncio.Task) -> list[str]:
    """The coroutines ``task`` is suspended in, outermost first."""
    names, coro = [], task.get_coro()
    while coro is not None and hasattr(coro, "cr_code"):
        names.append(coro.cr_code.co_name)
        coro = coro.cr_await
    return names


def one_turn(loop: asyncio.AbstractEventLoop) -> None:
    loop.call_soon(loop.stop)
    loop.run_forever()


def main(prefix: str) -> str:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    pipe = OnlineAPI(SimModel("unclosed"), cache=os.environ["REDIS_URL"], prefix=prefix)
    loop.run_until_complete(pipe.request(Request("p", 1, "0", "ns")))  # never closed
    worker = next(t for t in asyncio.all_tasks(loop)
                  if "CacheWorker.main" in repr(t.get_coro()))
    seen, deadline = "no write under wait_for seen", loop.time() + 3.0
    while loop.time() < deadline:
        writes = [t for t in asyncio.all_tasks(loop)
                  if "_send_packed_command" in repr(t.get_coro())]
        one_turn(loop)
        if "wait_for" in awaiting(worker) and writes and all(w.done() for w in writes):
            seen = "stopped as the cache worker's write ended"  # wait_for not resumed yet
            break
    tasks = asyncio.all_tasks(loop)  # what asyncio.run() does at its end
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()
    return seen


if __name__ == "__main__":
    print(main(sys.argv[1]), flush=True)
