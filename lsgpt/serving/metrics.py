"""Metrics: a served model's token-level metrics on Triton's metrics port, copied from its scheduler."""

from __future__ import annotations

import random
import threading

try:  # present inside the Python backend stub only
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - imported outside Triton (docs, linters)
    pb_utils = None


class Metrics:
    """Token-level metrics on Triton's metrics port (/metrics, Prometheus text), labelled model and version:
    lsgpt_prompt_tokens_total, lsgpt_generated_tokens_total, lsgpt_requests_total,
    lsgpt_cancelled_requests_total, lsgpt_decode_steps_total (counters; generated tokens / decode steps = the
    mean running batch),
    lsgpt_running_rows, lsgpt_queued_requests (gauges), lsgpt_time_to_first_token_seconds and
    lsgpt_inter_token_latency_seconds (histograms). A thread copies the scheduler's counters every PERIOD s.

    Each histogram observation is a synchronous round trip to the server process (the Python backend has no
    batched observe), so a publish observes at most MAX_OBSERVED values of each histogram, a uniform random
    sample of those since the last one when there are more (exact at low load; under load the quantiles and the
    mean _sum/_count stay unbiased, while _sum and _count are the sample's, not totals: the token count is
    lsgpt_generated_tokens_total)."""

    PERIOD = 0.5
    MAX_OBSERVED = 256
    TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
    ITL_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0]

    def __init__(self, model: str, version: str, scheduler):
        F = pb_utils.MetricFamily
        labels = {"model": model, "version": str(version)}
        self.scheduler = scheduler

        def family(name: str, what: str, kind, **kw):
            fam = F(name=name, description=what, kind=kind)
            self._families.append(fam)  # a family must outlive its metrics
            return fam.Metric(labels=labels, **kw)

        self._families: list = []
        self.prompt = family("lsgpt_prompt_tokens_total", "Prompt tokens prefilled", F.COUNTER)
        self.generated = family("lsgpt_generated_tokens_total", "Tokens generated", F.COUNTER)
        self.requests = family("lsgpt_requests_total", "Requests accepted by the scheduler", F.COUNTER)
        self.cancelled = family("lsgpt_cancelled_requests_total", "Requests cancelled (by the client, or a "
                                "failed row of the same request) before they finished", F.COUNTER)
        self.steps = family("lsgpt_decode_steps_total", "Decode steps of the running batch", F.COUNTER)
        self.running = family("lsgpt_running_rows", "Rows in the running decode batch", F.GAUGE)
        self.queued = family("lsgpt_queued_requests", "Requests waiting for a row", F.GAUGE)
        self.ttft = family("lsgpt_time_to_first_token_seconds", "Queue + prefill time to the first token",
                           F.HISTOGRAM, buckets=self.TTFT_BUCKETS)
        self.itl = family("lsgpt_inter_token_latency_seconds", "Time between a request's tokens", F.HISTOGRAM,
                          buckets=self.ITL_BUCKETS)
        self._rng = random.Random(0)
        self._seen = {"prompt_tokens": 0, "generated_tokens": 0, "requests": 0, "cancelled": 0, "steps": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lsgpt-metrics", daemon=True)
        self._thread.start()

    def publish(self) -> None:
        st = self.scheduler.stats
        for key, metric in (("prompt_tokens", self.prompt), ("generated_tokens", self.generated),
                            ("requests", self.requests), ("cancelled", self.cancelled),
                            ("steps", self.steps)):
            now = getattr(st, key)
            if now > self._seen[key]:
                metric.increment(now - self._seen[key])
                self._seen[key] = now
        self.running.set(self.scheduler.running)
        self.queued.set(self.scheduler.queued)
        for src, hist in ((st.ttft, self.ttft), (st.itl, self.itl)):
            got = [src.popleft() for _ in range(len(src))]
            if len(got) > self.MAX_OBSERVED:  # a uniform sample: the distribution stays unbiased
                got = self._rng.sample(got, self.MAX_OBSERVED)
            for x in got:
                hist.observe(x)

    def _run(self) -> None:
        from lsgpt.engine.scheduler import name_thread

        name_thread("lsgpt-metrics")
        while not self._stop.wait(self.PERIOD):
            try:
                self.publish()
            except Exception as e:  # noqa: BLE001 - metrics must never take the model down
                pb_utils.Logger.log_warn(f"lsgpt metrics: {e}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
