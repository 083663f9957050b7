from tests.e2e.conftest import bus, events, receiver, start_services  # noqa: F401  (shared fixtures)
