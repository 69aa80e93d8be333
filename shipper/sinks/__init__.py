"""Outputs. ``build_sink`` is the only place that maps ``sink.type`` to a class."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shipper.sinks.base import Batch, Sink

if TYPE_CHECKING:
    from shipper.config import Config
    from shipper.metrics import Metrics

__all__ = ["Batch", "Sink", "build_sink"]


def build_sink(cfg: Config, metrics: Metrics) -> Sink:
    """Construct the configured sink; raises SinkError/ConfigError with a clear message."""
    kind = cfg.sink.type
    if kind == "stdout":
        from shipper.sinks.stdout import StdoutSink

        return StdoutSink()
    if kind == "file":
        from shipper.sinks.file import FileSink

        f = cfg.sink.file
        return FileSink(f.path, max_bytes=f.max_bytes, keep=f.keep, fsync=f.fsync)
    if kind == "forward":
        from shipper.sinks.forward import ForwardSink  # type: ignore[import-not-found,unused-ignore]

        return ForwardSink(cfg.sink.forward, metrics)  # type: ignore[no-any-return,unused-ignore]
    if kind == "syslog":
        from shipper.sinks.syslog import SyslogSink

        return SyslogSink(cfg.sink.syslog, metrics)
    raise ValueError(f"unknown sink type {kind!r}")
