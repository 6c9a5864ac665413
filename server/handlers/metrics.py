"""GET /metrics: the Prometheus text format (or OpenMetrics, when the scraper asks)."""

from __future__ import annotations

from aiohttp import web

from server.handlers.errors import Handler
from server.metrics import Metrics


def metrics_handler(metrics: Metrics) -> Handler:
    """A handler serving `metrics` (on the main app, or on the metrics port's own app)."""

    async def handler(request: web.Request) -> web.Response:
        """Every metric as of now."""
        body, content_type = metrics.render(request.headers.get("Accept"))
        response = web.Response(body=body)
        # Set whole: the type carries version and charset parameters of its own.
        response.headers["Content-Type"] = content_type
        return response

    return handler
