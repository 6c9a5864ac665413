"""Reading /metrics as Prometheus does: prometheus-client's own parser of the text format."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


class Scrape:
    """The samples of one scrape, by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def __call__(self, name: str, **labels: str) -> float | None:
        """The value of the sample with exactly these labels (None when there is none)."""
        return self.samples.get((name, frozenset(labels.items())))

    def names(self) -> set[str]:
        """Every sample name."""
        return {name for name, _ in self.samples}


async def scrape(client) -> Scrape:
    """GET /metrics (with the API token the test client sends) and parse it."""
    resp = await client.get("/metrics")
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return Scrape(await resp.text())
