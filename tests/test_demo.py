"""The demo data: streamed into the store in batches, oldest first, whatever its size."""

from __future__ import annotations

from server import search
from server.demo import demo_batches, seed_demo
from server.store.sqlite import SqliteStore


class RecordingStore(SqliteStore):
    """A real SQLite store that remembers the size of every bulk write it was given."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.batches: list[tuple[int, int, int]] = []

    async def import_conversations(self, conversations, messages):
        first = min(c.last_activity for c in conversations)
        self.batches.append((len(conversations), len(messages), first))
        await super().import_conversations(conversations, messages)


async def test_seeding_streams_batches_oldest_first_into_an_empty_store(tmp_path):
    store = RecordingStore(str(tmp_path / "demo.db"))
    await store.start()
    try:
        assert await seed_demo(store, 2_500, batch=1_000) == 2_500
        assert [n for n, _, _ in store.batches] == [1_000, 1_000, 500]
        starts = [first for _, _, first in store.batches]
        assert starts == sorted(starts), "batches follow time"
        assert await store.count(None) == 2_500
        # Messages were stored in the order they happened: search lists the newest first.
        hits = await store.search_messages(search.parse("invoice"), None, 50)
        times = [h.message.at for h in hits]
        assert len(hits) == 50 and times == sorted(times, reverse=True)
        # A store that holds anything is left alone.
        assert await seed_demo(store, 10) == 0
    finally:
        await store.close()


def test_the_same_demo_whatever_the_batch_size():
    one = [c for cs, _ in demo_batches(300, batch=300, now=10**13) for c in cs]
    many = [c for cs, _ in demo_batches(300, batch=7, now=10**13) for c in cs]
    assert one == many
    assert [c.last_activity for c in one] == sorted(c.last_activity for c in one)
