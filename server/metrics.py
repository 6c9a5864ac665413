"""Prometheus metrics: counters kept as things happen, state read when /metrics is scraped.

Each app has its own registry (tests run several apps in one process). Every name starts
with `livechat_`. What changes on every request or event is a prometheus-client counter or
histogram; what is state (clients connected, conversations held, the listener) is read from
its owner by a collector at scrape time, so it costs nothing in between.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from server.hub import Hub
    from server.inbox import Sender, SendResult
    from server.models import Message
    from server.snapshot import Snapshot
    from server.workers.warmer import Warmer

# HTTP latency buckets: a list page takes well under a millisecond, a webhook a few ms on
# SQLite and tens on Firestore; anything past 10 s is a stream or a stuck request.
HTTP_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
)
# AI jobs and sends wait on a remote model or the Graph API: from 50 ms to the AI timeout
# (20 s) times its retries.
REMOTE_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
# Methods the router serves; anything else a client invents is counted as "other", so a
# scanner cannot grow the number of series.
METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED: Final = "unmatched"


class Metrics:
    """The app's registry and the counters its parts update."""

    def __init__(self) -> None:
        # The `_created` series double the output and no dashboard here reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "livechat_http_requests",
            "HTTP requests answered, by route and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "livechat_http_request_duration_seconds",
            "Time to answer an HTTP request (for the events stream: how long it stayed open)",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.webhook_messages = Counter(
            "livechat_webhook_messages",
            "Messages in accepted WhatsApp webhook deliveries: received (new) or duplicate",
            ["outcome"],
            registry=r,
        )
        self.webhook_refused = Counter(
            "livechat_webhook_refused",
            "WhatsApp webhook deliveries refused, nothing stored: bad_signature or malformed",
            ["reason"],
            registry=r,
        )
        self.ai_jobs = Counter(
            "livechat_ai_jobs",
            "AI reply jobs by outcome",
            ["outcome"],
            registry=r,
        )
        self.ai_duration = Histogram(
            "livechat_ai_job_duration_seconds",
            "Time from the start of an AI reply job to its end",
            ["outcome"],
            buckets=REMOTE_BUCKETS,
            registry=r,
        )
        self.sends = Counter(
            "livechat_whatsapp_sends",
            "Replies sent through the WhatsApp Cloud API, by outcome",
            ["outcome"],
            registry=r,
        )
        self.send_duration = Histogram(
            "livechat_whatsapp_send_duration_seconds",
            "Time of one call to the WhatsApp Cloud API",
            buckets=REMOTE_BUCKETS,
            registry=r,
        )
        ProcessCollector(namespace="livechat", registry=r)
        # Label children by their labels. labels() costs about 1.5 µs a call (a lock and a
        # tuple); a dict hit 0.1 µs, and a request needs two of them.
        self._request_children: dict[tuple[str, str, int], Counter] = {}
        self._duration_children: dict[tuple[str, str], Histogram] = {}

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency."""
        if method not in METHODS:
            method = "other"
        key = (method, route, status)
        counter = self._request_children.get(key)
        if counter is None:
            counter = self._request_children[key] = self.http_requests.labels(
                method, route, str(status)
            )
        counter.inc()
        histogram = self._duration_children.get(key[:2])
        if histogram is None:
            histogram = self._duration_children[key[:2]] = self.http_duration.labels(method, route)
        histogram.observe(seconds)

    def ai_job(self, outcome: str, seconds: float) -> None:
        """Count one finished AI reply job."""
        self.ai_jobs.labels(outcome).inc()
        self.ai_duration.labels(outcome).observe(seconds)

    def watch(self, state: State) -> None:
        """Read the app's live state at every scrape."""
        self.registry.register(state)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """Every metric, and its content type: the Prometheus text format, or OpenMetrics
        when the scraper's Accept header asks for it."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


class State(Collector):
    """Gauges and counters that are the current state of the app's parts."""

    def __init__(
        self,
        hub: Hub,
        snapshot: Snapshot,
        warmer: Callable[[], Warmer | None],
        jobs: Callable[[], dict[str, tuple[int, int]]],
    ) -> None:
        self.hub = hub
        self.snapshot = snapshot
        self.warmer = warmer
        self.jobs = jobs

    def describe(self) -> Iterable[Metric]:
        """Nothing to describe in advance (the registry then collects at registration)."""
        return []

    def collect(self) -> Iterable[Metric]:
        """The current values."""
        yield GaugeMetricFamily(
            "livechat_sse_clients", "Dashboards connected to the events stream", self.hub.clients
        )
        broadcast = CounterMetricFamily(
            "livechat_events_broadcast", "Events published to the SSE clients", labels=["type"]
        )
        for name, count in sorted(self.hub.broadcasts.items()):
            broadcast.add_metric([name], count)
        yield broadcast
        snapshot = self.snapshot
        yield GaugeMetricFamily(
            "livechat_snapshot_conversations", "Conversations held in memory", len(snapshot)
        )
        yield GaugeMetricFamily(
            "livechat_snapshot_ready", "1 once the first load is done", int(snapshot.ready)
        )
        yield GaugeMetricFamily(
            "livechat_snapshot_fresh",
            "1 while the snapshot follows the store; 0 while served stale in an outage",
            int(snapshot.ready and snapshot.fresh),
        )
        warmer = self.warmer()
        if warmer is not None and warmer.changed_at is not None:
            yield GaugeMetricFamily(
                "livechat_snapshot_last_change_age_seconds",
                "Seconds since the snapshot last changed (a load or a change from the feed)",
                time.monotonic() - warmer.changed_at,
            )
        if warmer is not None:
            listener = warmer.listener
            yield GaugeMetricFamily(
                "livechat_listener_up",
                "1 while the store's change feed is followed (Firestore: the listener streams)",
                int(listener.up if listener is not None else warmer.loaded.is_set()),
            )
            yield CounterMetricFamily(
                "livechat_listener_restarts",
                "Times the listener was started again: it died or went silent, or the store "
                "was lost",
                listener.restarts + listener.replacements if listener is not None else 0,
            )
            yield CounterMetricFamily(
                "livechat_listener_outages",
                "Times the listener stopped or the store could not be reached",
                listener.outages if listener is not None else 0,
            )
        active = GaugeMetricFamily(
            "livechat_jobs_active", "Background jobs running, by lane", labels=["lane"]
        )
        pending = GaugeMetricFamily(
            "livechat_jobs_pending",
            "Background jobs waiting in memory for room in their lane",
            labels=["lane"],
        )
        for lane, (running, waiting) in sorted(self.jobs().items()):
            active.add_metric([lane], running)
            pending.add_metric([lane], waiting)
        yield active
        yield pending


class CountingSender:
    """A Sender that counts each send's outcome and time."""

    def __init__(self, sender: Sender, metrics: Metrics) -> None:
        self.sender = sender
        self.metrics = metrics

    async def send_text(self, to: str, text: str) -> SendResult:
        """Send through the wrapped sender; count its outcome (`sent`, `failed`, `not_sent`),
        `error` when it raised, `cancelled` when shutdown cut it."""
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await self.sender.send_text(to, text)
            outcome = result.status
            return result
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self.metrics.sends.labels(outcome).inc()
            self.metrics.send_duration.observe(time.perf_counter() - started)

    async def send_message(
        self, to: str, message: Message, *, number: str | None, media_id: str | None = None
    ) -> SendResult:
        """Send a reply of any kind through the wrapped sender; counted like send_text."""
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await self.sender.send_message(to, message, number=number, media_id=media_id)
            outcome = result.status
            return result
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self.metrics.sends.labels(outcome).inc()
            self.metrics.send_duration.observe(time.perf_counter() - started)

    async def upload_media(
        self, data: bytes, mime_type: str, filename: str | None, *, number: str | None
    ) -> str:
        """Upload through the wrapped sender (part of a send: counted with its outcome)."""
        return await self.sender.upload_media(data, mime_type, filename, number=number)

    async def mark_read(
        self, wa_message_id: str, *, number: str | None, typing: bool = False
    ) -> bool:
        """Read receipts and typing go through uncounted: they are not sends."""
        return await self.sender.mark_read(wa_message_id, number=number, typing=typing)
