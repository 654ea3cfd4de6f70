"""The server's inter-token histogram (metrics.py's _ManyHistogram, a request's gaps in one call): the
same exposition as prometheus_client's Histogram fed the same values one at a time."""

import random

import pytest

pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, Histogram, generate_latest  # noqa: E402

from edgellm.server.metrics import _ITL_BUCKETS, _ManyHistogram  # noqa: E402


def test_many_histogram_exposes_what_prometheus_histogram_does():
    rng = random.Random(0)
    values = [rng.choice(_ITL_BUCKETS) for _ in range(50)] + [rng.expovariate(300) for _ in range(400)] + [9.0]
    reference_registry, registry = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("gap_seconds", "gaps", buckets=_ITL_BUCKETS, registry=reference_registry)
    for value in values:
        reference.observe(value)
    ours = _ManyHistogram("gap_seconds", "gaps", _ITL_BUCKETS)
    registry.register(ours)
    ours.observe_many(values[:100])
    ours.observe_many(iter(values[100:]))
    expected = [line for line in generate_latest(reference_registry).decode().splitlines() if "_created" not in line]
    assert generate_latest(registry).decode().splitlines() == expected
