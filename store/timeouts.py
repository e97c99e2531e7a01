"""How long tide waits on a remote store: each request has a timeout, and a request that times out, cannot
connect or gets a server error (5xx, 429) is tried again a bounded number of times within a time budget.
Then it fails with one line naming the URL, what the server did and the fix (`RemoteError`), instead of a
bare TimeoutError after minutes or an HTTP 500 traceback.

s3:// and gs:// go through obstore, which retries by itself: tide sets its timeouts and retry budget
(`obstore_budget`). http(s):// goes through fsspec's aiohttp session, which neither retries nor, by default,
gives up before 5 minutes: tide gives the session a timeout and a retrying middleware (`http_budget`).
--storage-options' own `client_options` / `retry_config` (obstore) take precedence over tide's.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

TIMEOUT_S = 30.0
"""One request's limit: an object store's whole request; over http, connecting and each read of the answer
(a slow answer that keeps arriving is not cut)."""
RETRIES = 3
"""Tries after the first."""
RETRY_BUDGET_S = 60.0
"""No retry starts later than this after the first try, so a dead or hung server ends a command within
about RETRY_BUDGET_S + TIMEOUT_S."""
FIRST_BACKOFF_S = 0.1
"""The wait before the first retry; it doubles before each next one."""


class RemoteError(ValueError):
    """A remote store that kept failing a request: the message names the URL, what happened and the fix."""


def obstore_budget(options: dict[str, Any]) -> dict[str, Any]:
    """obstore keyword arguments with tide's timeouts and retry budget, unless `options` sets its own."""
    client = {"timeout": f"{TIMEOUT_S:g}s", "connect_timeout": f"{min(TIMEOUT_S, 10.0):g}s"}
    retry = {
        "max_retries": RETRIES,
        "retry_timeout": timedelta(seconds=RETRY_BUDGET_S),
        "backoff": {"init_backoff": timedelta(seconds=FIRST_BACKOFF_S)},
    }
    return {
        **options,
        "client_options": {**client, **(options.get("client_options") or {})},
        "retry_config": {**retry, **(options.get("retry_config") or {})},
    }


def http_budget(options: dict[str, Any]) -> dict[str, Any]:
    """fsspec HTTP storage options whose aiohttp session times out and retries (`_retry`)."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=TIMEOUT_S, sock_read=TIMEOUT_S)
    client = {"timeout": timeout, "middlewares": (_retry,), **(options.get("client_kwargs") or {})}
    return {**options, "client_kwargs": client}


async def _retry(request: Any, handler: Any) -> Any:
    """aiohttp client middleware: the request again after a timeout, a failed connection or a 5xx/429 answer,
    within RETRIES and RETRY_BUDGET_S; then RemoteError. The body is read here, so that a server that stalls
    in the middle of an answer is retried like one that never starts it."""
    import aiohttp

    start, tries = time.monotonic(), 0
    while True:
        tries += 1
        try:
            response = await handler(request)
            if response.status < 500 and response.status != 429:
                await response.read()
                return response
            problem = f"answered HTTP {response.status} ({response.reason})"
            response.release()
        except (TimeoutError, aiohttp.ClientConnectionError) as e:  # aiohttp's timeouts are both
            is_timeout = isinstance(e, TimeoutError)
            problem = (
                f"did not answer within {TIMEOUT_S:g} s" if is_timeout else f"could not be reached ({e})"
            )
        elapsed = time.monotonic() - start
        if tries > RETRIES or elapsed > RETRY_BUDGET_S:
            raise RemoteError(
                f"{request.url}: the server {problem}, {tries} times in {elapsed:.1f} s; tide stopped trying. "
                "Check that the server is up and serves the store, then run the command again"
            )
        await asyncio.sleep(FIRST_BACKOFF_S * 2 ** (tries - 1))
