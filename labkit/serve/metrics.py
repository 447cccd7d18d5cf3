"""The server's Prometheus metrics (prometheus-client), named after vLLM's where they mean the same:
requests by outcome, prompt and generated tokens, time to first token, inter-token latency,
end-to-end latency, queue depth, and speculation's acceptance rate and tau."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class ServeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("labkit_requests", "Requests finished, by outcome", ["status"], registry=r)
        self.prompt_tokens = Counter("labkit_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("labkit_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("labkit_time_to_first_token_seconds", "Arrival to first token (queueing included)", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("labkit_inter_token_latency_seconds", "Between tokens (a step's time spread over its tokens)",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("labkit_e2e_request_latency_seconds", "Arrival to last token", buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("labkit_num_requests_waiting", "Requests waiting for the engine", registry=r)
        self.running = Gauge("labkit_num_requests_running", "Requests on the engine", registry=r)
        self.draft_tokens = Counter("labkit_spec_decode_num_draft_tokens", "Draft tokens proposed", registry=r)
        self.accepted_tokens = Counter("labkit_spec_decode_num_accepted_tokens", "Draft tokens accepted", registry=r)
        self.target_steps = Counter("labkit_spec_decode_num_target_steps", "Target forwards after the prefill, speculative requests", registry=r)
        self.spec_tokens = Counter("labkit_spec_decode_num_emitted_tokens", "Tokens after the first, speculative requests", registry=r)
        self.acceptance = Gauge("labkit_spec_decode_acceptance_rate", "Accepted over drafted tokens, since start", registry=r)
        self.tau = Gauge("labkit_spec_decode_tau", "Tokens per target forward, speculative requests since start", registry=r)
        self._sums = {"num_draft_tokens": 0, "num_accepted_tokens": 0, "num_target_steps": 0, "num_emitted_tokens": 0}  # the ratios' parts

    def observe_result(self, result: Any, e2e_s: float, status: str) -> None:
        """One finished request (a GenerationResult)."""
        s = result.stats
        self.requests.labels(status=status).inc()
        self.prompt_tokens.inc(s.prompt_tokens)
        self.generation_tokens.inc(s.new_tokens)
        self.e2e.observe(e2e_s)
        if not s.drafter:
            return
        add = {"num_draft_tokens": sum(s.drafted_lengths), "num_accepted_tokens": sum(s.accepted_lengths), "num_target_steps": s.target_steps,
               "num_emitted_tokens": max(0, s.new_tokens - 1)}
        for counter, key in ((self.draft_tokens, "num_draft_tokens"), (self.accepted_tokens, "num_accepted_tokens"),
                             (self.target_steps, "num_target_steps"), (self.spec_tokens, "num_emitted_tokens")):
            counter.inc(add[key])
            self._sums[key] += add[key]
        sums = self._sums
        if sums["num_draft_tokens"]:
            self.acceptance.set(sums["num_accepted_tokens"] / sums["num_draft_tokens"])
        if sums["num_target_steps"]:
            self.tau.set(sums["num_emitted_tokens"] / sums["num_target_steps"])

    def spec_totals(self) -> dict[str, float]:
        """Speculation's counters since start, as /metrics reports them (labkit_spec_decode_<name>_total)."""
        return {k: float(v) for k, v in self._sums.items()}

    def text(self) -> bytes:
        return generate_latest(self.registry)
