"""The exception tree. Foreign exceptions are mapped onto these at the module edge.

ShipperError
├── ConfigError        bad configuration (all problems reported at once)
├── SourceError        conntrack / netlink / namespace problems
│   └── DecodeError    a netlink message that cannot be decoded
├── DependencyError    a configured feature's library cannot be imported
├── EnrichError        pod inventory or Kubernetes API problems
└── SinkError          delivery failed; ``retriable`` says whether to try again
"""

from __future__ import annotations


class ShipperError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(ShipperError):
    """Invalid configuration. ``problems`` lists every problem found, each naming its key."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__(f"{source}: " + "; ".join(self.problems))


class SourceError(ShipperError):
    """The conntrack source cannot be opened or read."""


class DecodeError(SourceError):
    """A netlink message is malformed; the message is skipped and counted.

    ``msg_len`` is the length from a sane netlink header (so the reader can
    skip just this message), or None when even the header is unusable.
    """

    def __init__(self, message: str, msg_len: int | None = None) -> None:
        super().__init__(message)
        self.msg_len = msg_len


class DependencyError(ShipperError):
    """A configured feature needs a Python package that cannot be imported (start-up error)."""


class EnrichError(ShipperError):
    """Pod metadata could not be loaded (bad inventory file, bad API object)."""


class SinkError(ShipperError):
    """A sink failed to deliver a batch.

    ``retriable`` is the sink's verdict: True means the same batch may succeed
    later (connection refused, timeout, missing ack), False means it never will
    (the receiver rejected it as malformed, the file system is read-only).
    """

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable
