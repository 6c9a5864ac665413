"""Stopping gracefully: refuse new work at once, end the streams, let running jobs finish.

On SIGTERM or SIGINT (server/serve.py) the app first stops accepting: `/readyz` answers
503 so load balancers take it out of rotation, every other new request gets a 503 that
says to try again (WhatsApp redelivers a webhook that did not get its 200), and every SSE
stream ends (browsers reconnect, to another instance behind a load balancer). Then the
background jobs get a bounded time to finish; what is still running after it is cut.
Only then are the listening sockets, the store listener and the stores closed.
"""

from __future__ import annotations

import contextlib
import time

import structlog
from aiohttp import web

from server import keys

log = structlog.get_logger(__name__)


class Shutdown:
    """Whether the app is on its way out (set once, by the first stop signal)."""

    __slots__ = ("stopping",)

    def __init__(self) -> None:
        self.stopping = False


def stop_accepting(app: web.Application) -> None:
    """Readiness 503, new requests refused, every SSE stream ended; idempotent."""
    shutdown = app[keys.SHUTDOWN]
    if shutdown.stopping:
        return
    shutdown.stopping = True
    hub = app[keys.HUB]
    clients = hub.clients
    hub.close()
    streams = app[keys.STREAMS]
    for stream in list(streams):
        with contextlib.suppress(RuntimeError):
            stream.stop_streaming()
    inbox = app.get(keys.INBOX)
    if inbox is not None:
        inbox.close()  # statuses still waiting for their message give up at once
    log.info("server.stopping", sse_clients=clients)


async def drain(app: web.Application, within_s: float) -> None:
    """Stop accepting, then give running background jobs `within_s` seconds to finish.

    What is still running at the deadline is cancelled, and its task stays pending in the
    store (its lease given up, so another instance or the next start resumes it); so does
    work a finishing job leaves behind (the send of an AI reply it just stored).
    """
    stop_accepting(app)
    outbox = app.get(keys.OUTBOX)
    if outbox is None:
        return
    lanes = outbox.lanes.all()
    running = sum(len(lane) for lane in lanes)
    started = time.monotonic()
    await outbox.close(within_s)
    elapsed = time.monotonic() - started
    log.info(
        "jobs.drained",
        running_at_stop=running,
        timed_out=running > 0 and elapsed >= within_s,
        duration_s=round(elapsed, 3),
    )


async def cut_jobs(app: web.Application) -> None:
    """Cancel every running background job now (a second stop signal); their tasks stay
    pending in the store."""
    outbox = app.get(keys.OUTBOX)
    if outbox is not None:
        log.warning("jobs.cut", running=sum(len(lane) for lane in outbox.lanes.all()))
        await outbox.close(0)
