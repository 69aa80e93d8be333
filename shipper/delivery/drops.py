"""The one way delivery counts records it will never deliver (buffer and sender alike)."""

from __future__ import annotations

import logging

from shipper.metrics import Metrics

log = logging.getLogger("shipper.delivery")


def count_dropped(metrics: Metrics, sink: str, records: int, reason: str) -> None:
    """Count ``records`` in ``shipper_records_dropped_total{reason}`` and log it (WARNING)."""
    metrics.inc("shipper_records_dropped_total", reason, n=records)
    log.warning("records dropped",
                extra={"fields": {"reason": reason, "records": records, "sink": sink}})
