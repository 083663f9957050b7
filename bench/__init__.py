"""`make bench`: the system as in production, under load, measured end to end
(docs/performance.md)."""
