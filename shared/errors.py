"""The one error hierarchy of followups.

FollowupsError
 ├── RetryLater   transient: the handler tries again, then the message goes back to the
 │                broker (raised when the broker refuses or does not confirm a publish)
 ├── Rejected     permanent: copied to the dead-letter queue with a reason, never retried
 │    └── InvalidMessage   the message itself is malformed (size, JSON, schema, routing key)
 ├── ConfigurationError    a setting is unusable; the process does not start
 ├── TemplateError         a template can't be rendered (the scheduler rejects it with rule
 │                         `template`; at send time the follow-up fails)
 └── InvalidPhone          a number can't receive an SMS (the follow-up fails)

Which failures are transient, how long each retry pauses and when it stops: shared/retry_policy.py.
"""

from __future__ import annotations


class FollowupsError(Exception):
    """Base of every error followups raises on purpose."""


class RetryLater(FollowupsError):
    """A dependency is unavailable right now; the same message may succeed later."""


class Rejected(FollowupsError):
    """The message can never succeed; it goes to the dead-letter queue with `rule` as the reason."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(f"{rule}: {detail}")
        self.rule = rule
        self.detail = detail


class InvalidMessage(Rejected):
    """The message failed validation at the edge."""


class ConfigurationError(FollowupsError):
    """A setting is unusable; the process must not start with it."""


class TemplateError(FollowupsError, ValueError):
    """The template can't be rendered: bad syntax, an unknown placeholder or a missing source."""


class InvalidPhone(FollowupsError, ValueError):
    """The number can't receive an SMS; the reason never contains the number itself."""
