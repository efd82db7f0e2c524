"""Prometheus metrics (bounded labels only) and the recent-request window behind /dashboard.

The request, latency, token and guardrail metrics carry `version`: "stable", or "canary" for requests a
task's canary served, so the two compare side by side."""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import asdict, dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from guardrails import outcomes

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
OUTPUT_LENGTH_BUCKETS = ((16, "1-16"), (64, "17-64"), (256, "65-256"), (10**9, "257+"))


def length_bucket(tokens: int) -> str:
    return next(label for bound, label in OUTPUT_LENGTH_BUCKETS if tokens <= bound)


@dataclass
class RequestRecord:
    t: float
    task: str
    status: int
    finish_reason: str
    prompt_tokens: int
    output_tokens: int
    e2e_s: float
    ttft_s: float | None
    guardrail: str = outcomes.PASSED  # one of guardrails.outcomes.OUTCOMES, as the audit record's outcome
    blocked_by: str | None = None  # the scanner that blocked
    stage: str | None = None  # dialogue stage the compliance decision used
    fallback: str | None = None  # "<stage>/<variant>" when a fallback went out (or would have, in monitor)
    compliance_score: float | None = None  # nearest-script cosine score
    guard_ms: float | None = None  # input scanning + output compliance time
    version: str = "stable"  # the task's stable adapter or its canary (serving/registry.py)


class ServeMetrics:
    def __init__(self, window: int = 2000):
        # Own registry per app, so several apps (tests) can live in one process; /metrics
        # concatenates it with the default registry, where vLLM puts its vllm:* metrics.
        self.registry = registry = CollectorRegistry()
        def hist(name, doc, buckets, labels=("task", "version")):
            return Histogram(name, doc, labels, buckets=buckets, registry=registry)

        self.e2e = hist("guardtune_request_latency_seconds", "End-to-end request latency", LATENCY_BUCKETS)
        self.ttft = hist("guardtune_time_to_first_token_seconds", "Time to first token", LATENCY_BUCKETS)
        self.tpot = hist("guardtune_time_per_output_token_seconds", "Decode time per output token after the first",
                         (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28))
        self.prompt_tokens = hist("guardtune_prompt_tokens", "Prompt tokens per request", TOKEN_BUCKETS)
        self.output_tokens = hist("guardtune_output_tokens", "Output tokens per request", TOKEN_BUCKETS)
        self.by_length = hist("guardtune_latency_by_output_length_seconds", "E2E latency by output-length bucket",
                              LATENCY_BUCKETS, labels=("task", "output_bucket", "version"))
        self.requests = Counter("guardtune_requests_total", "Requests by status, finish reason, guardrail outcome "
                                "and version (stable or canary)", ("task", "status", "finish_reason", "guardrail",
                                                                  "version"), registry=registry)
        self.engine_requests = Counter("guardtune_engine_requests_total", "Requests handed to the engine", ("task",),
                                       registry=registry)
        self.blocks = Counter("guardtune_guardrail_blocks_total", "Inputs blocked, by scanner",
                              ("task", "scanner", "version"), registry=registry)
        self.redactions = Counter("guardtune_guardrail_redactions_total", "Requests whose input had PII redacted",
                                  ("task",), registry=registry)
        self.fallbacks = Counter("guardtune_guardrail_fallbacks_total", "Fallback replies by stage and variant",
                                 ("task", "stage", "variant", "version"), registry=registry)
        self.compliance_score = hist("guardtune_compliance_score", "Nearest approved-script cosine score",
                                     (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
        self.guard_latency = hist("guardtune_guardrail_latency_seconds", "Input scanning plus output compliance time",
                                  (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
        self.queue_depth = Gauge("guardtune_queue_depth", "Requests waiting for a generation slot", registry=registry)
        self.running = Gauge("guardtune_requests_running", "Requests generating now", registry=registry)
        self.swaps = Counter("guardtune_adapter_swaps_total", "Adapter loads and swaps per task", ("task",),
                             registry=registry)
        self._recent: collections.deque[RequestRecord] = collections.deque(maxlen=window)
        self._lock = threading.Lock()

    def observe(self, rec: RequestRecord) -> None:
        t, v = rec.task, rec.version
        self.requests.labels(t, str(rec.status), rec.finish_reason, rec.guardrail, v).inc()
        if rec.status == 200 and rec.guardrail != outcomes.BLOCKED:  # a blocked request never ran the model
            self.e2e.labels(t, v).observe(rec.e2e_s)
            self.prompt_tokens.labels(t, v).observe(rec.prompt_tokens)
            self.output_tokens.labels(t, v).observe(rec.output_tokens)
            self.by_length.labels(t, length_bucket(rec.output_tokens), v).observe(rec.e2e_s)
            if rec.ttft_s is not None:
                self.ttft.labels(t, v).observe(rec.ttft_s)
                if rec.output_tokens > 1:
                    self.tpot.labels(t, v).observe((rec.e2e_s - rec.ttft_s) / (rec.output_tokens - 1))
        if rec.blocked_by:
            self.blocks.labels(t, rec.blocked_by, v).inc()
        if rec.fallback:
            stage, _, variant = rec.fallback.rpartition("/")
            self.fallbacks.labels(t, stage, variant, v).inc()
        if rec.compliance_score is not None:
            self.compliance_score.labels(t, v).observe(rec.compliance_score)
        if rec.guard_ms is not None:
            self.guard_latency.labels(t, v).observe(rec.guard_ms / 1000)
        with self._lock:
            self._recent.append(rec)

    def recent(self, since: float = 0.0) -> list[dict]:
        with self._lock:
            return [asdict(r) for r in self._recent if r.t >= since]


def now() -> float:
    return time.time()
