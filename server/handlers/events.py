"""GET /api/live-chat/events: the SSE stream every open dashboard listens to."""

from __future__ import annotations

import asyncio
import time
from http import HTTPStatus
from typing import Any, Final

import structlog
from aiohttp import hdrs, web
from aiohttp_sse import EventSourceResponse, sse_response

from server import keys
from server.handlers.errors import json_error
from server.hub import RETRY_MS

log = structlog.get_logger(__name__)

# Proxies and browsers must neither cache nor buffer the stream.
SSE_HEADERS: Final = {
    "Cache-Control": "no-cache, no-store, must-revalidate",
    "Pragma": "no-cache",
    "X-Accel-Buffering": "no",
}
# A comment line this often keeps idle proxies and load balancers from closing the stream.
HEARTBEAT_S: Final = 15.0
# On shutdown a healthy stream ends within milliseconds; one still writing after this is
# stuck on a client that does not read, and its socket is closed.
SHUTDOWN_GRACE_S: Final = 1.0
# Our ids are about 20 characters; a longer Last-Event-ID is logged cut to this.
LOGGED_ID_CHARS: Final = 64


class EventStream(EventSourceResponse):
    """aiohttp-sse's response, with our caching headers winning over its defaults."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # aiohttp-sse sets `Cache-Control: no-cache` after copying the headers it is given,
        # which would let a proxy keep a copy of the stream; ours go on last.
        self.headers.update(SSE_HEADERS)


async def events(request: web.Request) -> web.StreamResponse:
    """Stream events: replay what the client missed, then everything new, until it leaves."""
    started = time.perf_counter()
    hub = request.app[keys.HUB]
    accounts = request.app[keys.ACCOUNTS]
    principal = request[keys.PRINCIPAL]
    last_event_id = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    transport = request.transport
    if transport is None or transport.is_closing():
        raise web.HTTPBadRequest(reason="the client has gone")
    refusal = accounts.stream_refusal(principal)
    if refusal is not None:
        log.warning("sse.refused", reason=refusal, clients=hub.clients)
        return json_error(
            HTTPStatus.TOO_MANY_REQUESTS,
            "too_many_streams",
            refusal,
            headers={"Retry-After": str(RETRY_MS // 1000)},
        )

    async with sse_response(
        request,
        ping_interval=HEARTBEAT_S,
        # Heartbeats end their lines as our frames do (aiohttp-sse's default is CRLF), so
        # the stream has one line ending.
        sep="\n",
        response_cls=EventStream,
    ) as resp:
        chunked = resp.headers.get(hdrs.TRANSFER_ENCODING, "").lower() == "chunked"
        client, backlog = hub.connect(last_event_id, transport, chunked=chunked)
        # Ended at once when the sign-in loses its access (signed out, agent disabled).
        accounts.add_stream(principal, client)
        streams = request.app[keys.STREAMS]
        streams.add(resp)
        loop = asyncio.get_running_loop()

        def gone(_: object) -> None:
            # The heartbeat failed (the client left) or shutdown stopped the stream.
            hub.drop(client, "shutdown" if hub.closed else "client_gone")
            client.done.set()

        watcher = asyncio.ensure_future(resp.wait())
        watcher.add_done_callback(gone)
        try:
            current = hub.last_event_id.encode()
            if backlog is None:
                preamble = [b"retry: %d\n\n" % RETRY_MS]
                preamble.append(b"id: %s\nevent: resync\ndata: {}\n\n" % current)
            elif not backlog:
                # Nothing to replay: name the newest id anyway, so a page that sees no event
                # before its connection drops still resumes from here instead of guessing.
                preamble = [b"retry: %d\nid: %s\n\n" % (RETRY_MS, current)]
            else:
                preamble = [b"retry: %d\n\n" % RETRY_MS, *(e.frame for e in backlog)]
            # Through aiohttp: this first write also sends the headers. From here on the hub
            # writes whole chunks straight to the transport.
            await resp.write(b"".join(preamble))
            hub.go_live(client)
            log.info(
                "sse.connected",
                client_id=client.id,
                clients=hub.clients,
                # The header is the client's to choose: log a bounded slice of it.
                last_event_id=last_event_id[:LOGGED_ID_CHARS] if last_event_id else None,
                replayed=0 if backlog is None else len(backlog),
                resync=backlog is None,
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
            )
            await client.done.wait()
        except ConnectionResetError:
            if client.reason == "closed":
                client.reason = "client_gone"
        except asyncio.CancelledError:
            # A server run with handler_cancellation (aiohttp's test server, some workers)
            # cancels the handler when the client disconnects, or when shutdown times out.
            if client.reason == "closed":
                client.reason = "shutdown" if hub.closed else "client_gone"
            raise
        finally:
            watcher.remove_done_callback(gone)
            watcher.cancel()
            hub.disconnect(client)
            accounts.remove_stream(principal, client)
            streams.discard(resp)
            if hub.closed:
                # Ending the stream writes its last chunk; a client that does not read
                # would hold the server's stop for its whole timeout. Close it instead.
                loop.call_later(SHUTDOWN_GRACE_S, transport.abort)
            log.info(
                "sse.disconnected",
                client_id=client.id,
                clients=hub.clients,
                reason=client.reason,
                connected_s=round(time.monotonic() - client.connected_at, 3),
            )
    return resp
