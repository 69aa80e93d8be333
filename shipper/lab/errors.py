"""The lab's one exception, outside the runtime's tree (:mod:`shipper.errors`).

The lab is a test and demo tool, not part of the record path: a :class:`LabError`
never reaches a place where the shipper's own errors are handled, and the CLI's
``demo`` maps it to a message and exit status 2.
"""

from __future__ import annotations


class LabError(Exception):
    """The lab could not be built, lacks a host tool, or an operation in it failed."""
