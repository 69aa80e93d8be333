"""One retry/backoff policy for every sink.

Sinks only say whether a failure is retriable (``SinkError.retriable``); this
policy decides how long to wait and when to give up. Full jitter exponential
backoff: the n-th delay is uniform in ``[0, min(max, initial * 2**n)]``, so a
fleet of shippers that lost the same receiver does not reconnect in lockstep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``max_retries`` of -1 means retry forever."""

    initial_s: float = 0.2
    max_s: float = 30.0
    max_retries: int = -1

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        cap = min(self.max_s, self.initial_s * (2 ** min(attempt - 1, 30)))
        r = (rng or random).random()
        # Never retry instantly: at least a tenth of the step.
        return max(cap * r, cap / 10)

    def gives_up(self, attempt: int) -> bool:
        """True when retry number ``attempt`` would exceed the limit."""
        return self.max_retries >= 0 and attempt > self.max_retries
