"""What the followups services, CLI and tests share: schemas, settings, storage, timers."""
