"""The local backend: instances in this process, on the JAX devices it sees (see backend.py for the interface).

    registry.py     the public operations, per-instance locking, the one commit path
    instance.py     an instance's record, its idempotency cache, request fingerprints
    capacity.py     devices, placement, quotas and budgets (reserve, resize, release)
    persistence.py  durability modes, writes, the flusher and evictor, start-up, snapshot and evicted files
    backend.py      the async facade: the Backend interface, worker threads, quick calls inline
"""
