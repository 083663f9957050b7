"""Code the followups services, the CLI and the tests share: schemas, settings, storage, topology, timers."""
