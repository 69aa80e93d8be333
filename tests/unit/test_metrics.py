"""Tests for shipper.metrics: the metric catalogue and its Prometheus exposition."""

from __future__ import annotations

import re
import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text

from shipper.metrics import _BUCKETS, DEFS, Metrics


@pytest.fixture
def reg() -> CollectorRegistry:
    """A fresh registry."""
    return CollectorRegistry()


@pytest.fixture
def m(reg: CollectorRegistry) -> Metrics:
    """Metrics registered on the fresh registry."""
    return Metrics(reg)


class TestCatalogue:
    @pytest.mark.parametrize("name", sorted(DEFS))
    def test_names_follow_convention(self, name: str) -> None:
        """Every metric is shipper_<lowercase words>; counters end in _total, others do not."""
        d = DEFS[name]
        assert d.name == name
        assert re.fullmatch(r"shipper_[a-z_]+", name)
        assert d.kind in ("counter", "gauge", "histogram")
        if d.kind == "counter":
            assert name.endswith("_total")
        else:
            assert not name.endswith("_total")
        if d.kind == "histogram":
            assert name.endswith("_seconds")

    @pytest.mark.parametrize("name", sorted(DEFS))
    def test_help_and_labels(self, name: str) -> None:
        """Every metric has help text and lowercase label names."""
        d = DEFS[name]
        assert d.help.strip()
        for label in d.labels:
            assert re.fullmatch(r"[a-z_]+", label)
        assert len(set(d.labels)) == len(d.labels)

    def test_drop_counters_carry_a_reason(self) -> None:
        """Every drop/filter counter has a reason label."""
        for name in ("shipper_records_dropped_total", "shipper_events_filtered_total",
                     "shipper_decode_errors_total"):
            assert "reason" in DEFS[name].labels

    def test_family_names_unique_after_total_suffix(self) -> None:
        """No counter's family name (name without _total) equals another metric's name."""
        families = [n.removesuffix("_total") if d.kind == "counter" else n
                    for n, d in DEFS.items()]
        assert sorted(n for n in set(families) if families.count(n) > 1) == []


class TestValues:
    def test_unlabelled_metrics_start_at_zero(self, m: Metrics, reg: CollectorRegistry) -> None:
        """Unlabelled counters and gauges are exported as 0 before any event."""
        assert reg.get_sample_value("shipper_overruns_total") == 0.0
        assert reg.get_sample_value("shipper_queue_batches") == 0.0
        assert m.value("shipper_overruns_total") == 0.0

    def test_counter_with_labels(self, m: Metrics, reg: CollectorRegistry) -> None:
        """inc adds per label set; values are read back from the registry."""
        m.inc("shipper_events_total", "new")
        m.inc("shipper_events_total", "new")
        m.inc("shipper_events_total", "destroy", n=5)
        assert reg.get_sample_value("shipper_events_total", {"type": "new"}) == 2.0
        assert reg.get_sample_value("shipper_events_total", {"type": "destroy"}) == 5.0
        assert reg.get_sample_value("shipper_events_total", {"type": "update"}) is None
        assert m.value("shipper_events_total", "new") == 2.0
        assert m.total("shipper_events_total") == 7.0

    def test_counter_with_two_labels(self, m: Metrics, reg: CollectorRegistry) -> None:
        """Label values map to label names in declaration order."""
        m.inc("shipper_errors_total", "sink", "OSError")
        assert reg.get_sample_value(
            "shipper_errors_total", {"stage": "sink", "error": "OSError"}) == 1.0

    def test_gauge_set(self, m: Metrics, reg: CollectorRegistry) -> None:
        """set replaces a gauge's value."""
        m.set("shipper_pods_live", 10)
        m.set("shipper_pods_live", 4)
        m.set("shipper_conntrack_sysctl", 1, "events")
        assert reg.get_sample_value("shipper_pods_live") == 4.0
        assert reg.get_sample_value("shipper_conntrack_sysctl", {"name": "events"}) == 1.0

    def test_value_of_untouched_metric(self, m: Metrics) -> None:
        """value() of a label set never touched, or an unknown name, is 0."""
        assert m.value("shipper_events_total", "never") == 0.0
        assert m.value("shipper_no_such_metric") == 0.0

    def test_counter_exposed_as_counter(self, m: Metrics, reg: CollectorRegistry) -> None:
        """Counters are exposed with TYPE counter and gauges with TYPE gauge."""
        m.inc("shipper_records_total", "new")
        text = generate_latest(reg).decode()
        fams = {f.name: f.type for f in parse_text(text)}
        assert fams["shipper_records"] == "counter"
        assert fams["shipper_pods_live"] == "gauge"
        assert fams["shipper_batch_latency_seconds"] == "histogram"

    def test_no_registry_works(self) -> None:
        """Metrics without a registry still count (tests and tools)."""
        m = Metrics()
        m.inc("shipper_resyncs_total")
        assert m.value("shipper_resyncs_total") == 1.0

    def test_concurrent_increments_of_distinct_keys(self, m: Metrics) -> None:
        """Threads incrementing their own label sets lose no updates."""

        def work(label: str) -> None:
            for _ in range(5000):
                m.inc("shipper_records_shipped_total", label)

        threads = [threading.Thread(target=work, args=(f"s{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10.0)
        assert m.total("shipper_records_shipped_total") == 20000.0


class TestHistogram:
    def test_buckets_count_and_sum(self, m: Metrics, reg: CollectorRegistry) -> None:
        """Observations fill cumulative buckets, +Inf equals the count, sum adds up."""
        for v in (0.001, 0.02, 0.02, 0.7, 100.0):
            m.observe("shipper_batch_latency_seconds", v, "file")
        lab = {"sink": "file"}
        g = reg.get_sample_value
        assert g("shipper_batch_latency_seconds_count", lab) == 5.0
        assert g("shipper_batch_latency_seconds_sum", lab) == pytest.approx(100.741)
        assert g("shipper_batch_latency_seconds_bucket", {**lab, "le": "0.005"}) == 1.0
        assert g("shipper_batch_latency_seconds_bucket", {**lab, "le": "0.025"}) == 3.0
        assert g("shipper_batch_latency_seconds_bucket", {**lab, "le": "0.5"}) == 3.0
        assert g("shipper_batch_latency_seconds_bucket", {**lab, "le": "1.0"}) == 4.0
        assert g("shipper_batch_latency_seconds_bucket", {**lab, "le": "60.0"}) == 4.0
        assert g("shipper_batch_latency_seconds_bucket", {**lab, "le": "+Inf"}) == 5.0
        assert m.histogram_count("shipper_batch_latency_seconds", "file") == 5.0

    def test_bucket_upper_bound_inclusive(self, m: Metrics, reg: CollectorRegistry) -> None:
        """An observation equal to a bucket's bound falls in that bucket (le)."""
        m.observe("shipper_forward_ack_latency_seconds", 0.1, "a:1")
        assert reg.get_sample_value("shipper_forward_ack_latency_seconds_bucket",
                                    {"endpoint": "a:1", "le": "0.1"}) == 1.0
        assert reg.get_sample_value("shipper_forward_ack_latency_seconds_bucket",
                                    {"endpoint": "a:1", "le": "0.05"}) == 0.0

    def test_buckets_are_monotonic(self, m: Metrics, reg: CollectorRegistry) -> None:
        """Bucket counts never decrease with the bound."""
        for i in range(200):
            m.observe("shipper_batch_latency_seconds", i * 0.37 % 70, "stdout")
        counts = [reg.get_sample_value("shipper_batch_latency_seconds_bucket",
                                       {"sink": "stdout", "le": str(b)}) for b in _BUCKETS]
        counts.append(reg.get_sample_value("shipper_batch_latency_seconds_bucket",
                                           {"sink": "stdout", "le": "+Inf"}))
        # A missing bucket (None) is left out of the sorted side: the lengths then differ.
        assert counts == sorted(c for c in counts if c is not None)
        assert counts[-1] == 200.0

    def test_label_sets_are_separate(self, m: Metrics) -> None:
        """Each label set has its own histogram; an untouched one has count 0."""
        m.observe("shipper_batch_latency_seconds", 1.0, "file")
        assert m.histogram_count("shipper_batch_latency_seconds", "file") == 1.0
        assert m.histogram_count("shipper_batch_latency_seconds", "forward") == 0.0


class TestExposition:
    def test_text_format_parses(self, m: Metrics, reg: CollectorRegistry) -> None:
        """The Prometheus text exposition of every metric parses."""
        m.inc("shipper_events_total", "new")
        m.observe("shipper_batch_latency_seconds", 0.2, "file")
        names = {f.name for f in parse_text(generate_latest(reg).decode())}
        assert "shipper_events" in names
        assert "shipper_batch_latency_seconds" in names

    def test_openmetrics_format_parses(self, m: Metrics, reg: CollectorRegistry) -> None:
        """The OpenMetrics exposition (negotiated by Prometheus) parses."""
        m.set("shipper_spool_pending_batches", 2)
        m.inc("shipper_spool_batches_total", "spooled")
        list(parse_om(generate_openmetrics(reg).decode()))
