"""The gateway's Prometheus metrics (its own registry, so several gateways can coexist)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "tpmlab_gateway_request_seconds", "Time from a plan's arrival to its answer",
            ["model", "outcome"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
        self.queue_depth = Gauge("tpmlab_gateway_queue_depth", "Requests waiting for the engine",
                                 ["model"], registry=r)
        self.units = Counter("tpmlab_gateway_service_units", "Service units charged",
                             ["model"], registry=r)
        self.uncharged = Counter(
            "tpmlab_gateway_uncharged_units",
            "Service units requests used beyond their hold (the hold is the cap)",
            ["model"], registry=r)
        self.cost_scale = Gauge(
            "tpmlab_gateway_cost_scale",
            "The cost model now, as a fraction of its calibrated fit (learned from solo runs)",
            ["model"], registry=r)
        self.requests = Counter("tpmlab_gateway_requests", "Requests answered, by outcome",
                                ["model", "outcome"], registry=r)
        self.batch_size = Histogram("tpmlab_gateway_batch_size", "Requests per forward pass",
                                    ["model"], registry=r, buckets=(1, 2, 4, 8, 16, 32, 64))
        self.weight_restores = Counter(
            "tpmlab_gateway_weight_restores",
            "Requests that changed a deployed weight while running: failed, weights restored",
            ["model"], registry=r)
        self.validation_bugs = Counter(
            "tpmlab_gateway_validation_crashes",
            "Plans whose validation raised something other than a plan error (refused, 400)",
            registry=r)
        self.refused = Counter("tpmlab_gateway_refused", "Requests refused before running",
                               ["reason"], registry=r)
