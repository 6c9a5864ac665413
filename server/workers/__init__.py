"""Long-running background work: the snapshot warmer and AI replies."""
