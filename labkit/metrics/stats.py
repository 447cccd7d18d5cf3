"""What one request's decoding measured: tokens, times, drafts and verdicts (GenerationStats)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    stop_reason: str  # "eos", "max_new_tokens", "context" (the model's context ran out) or "cancelled" (on_tokens said stop)
    ttft_s: float  # prefill + first token
    total_s: float
    token_latencies_ms: list[float] = field(default_factory=list)  # per step after the first token, spread over its tokens
    peak_memory_bytes: int = 0
    memory_kind: str = ""
    # speculative decoding (empty for plain decoding)
    drafter: str = ""
    policy: str = ""
    accepted_lengths: list[int] = field(default_factory=list)  # per target step: draft tokens that stood
    draft_tokens: list[list[int]] = field(default_factory=list)  # per target step: the proposals themselves
    k_trace: list[int] = field(default_factory=list)  # per speculative step: the K the controller asked for
    tree_steps: list[tuple[int, list[int], list[int]]] = field(default_factory=list)  # per token-tree step: (its index
    # among the steps, the draft's parents, the accepted path as draft indices): the speedup model's tree form, tree views
    controller: str = ""
    lossless: bool = True  # False when a lossy acceptance policy decided
    draft_s: float = 0.0
    verify_s: float = 0.0  # target forwards after the prefill (verify or plain decode)
    phases: dict[str, Any] | None = None  # per-phase host and device seconds (detailed metrics only)

    @property
    def tok_per_s(self) -> float:
        """New tokens over the whole request, prefill included: what a user waits for."""
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def decode_tok_per_s(self) -> float:
        decode_s = self.total_s - self.ttft_s
        return (self.new_tokens - 1) / decode_s if self.new_tokens > 1 and decode_s > 0 else 0.0

    @property
    def mean_token_latency_ms(self) -> float:
        lat = self.token_latencies_ms
        return sum(lat) / len(lat) if lat else 0.0

    @property
    def drafted_lengths(self) -> list[int]:
        """Per target step: how many draft tokens were proposed."""
        return [len(d) for d in self.draft_tokens]

    @property
    def target_steps(self) -> int:
        return len(self.accepted_lengths)

    @property
    def acceptance_rate(self) -> float:
        drafted = sum(self.drafted_lengths)
        return sum(self.accepted_lengths) / drafted if drafted else 0.0

    @property
    def tau(self) -> float:
        """Mean tokens per target forward after the prefill (1.0 for plain decoding)."""
        steps = self.target_steps
        return (self.new_tokens - 1) / steps if steps else 1.0

    @property
    def other_s(self) -> float:
        """Bookkeeping: everything after the first token that is neither drafting nor the target."""
        return max(0.0, self.total_s - self.ttft_s - self.draft_s - self.verify_s)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(tok_per_s=self.tok_per_s, decode_tok_per_s=self.decode_tok_per_s, mean_token_latency_ms=self.mean_token_latency_ms,
                   acceptance_rate=self.acceptance_rate, tau=self.tau, other_s=self.other_s, target_steps=self.target_steps,
                   drafted_lengths=self.drafted_lengths)
        return out

    def report(self) -> list[str]:
        """The lines `labkit generate` prints under the text: speed, latency, memory, speculation, phases."""
        lines = [f"  throughput      {self.tok_per_s:.1f} tok/s (decode only {self.decode_tok_per_s:.1f} tok/s)",
                 f"  time to first   {self.ttft_s * 1e3:.1f} ms ({self.prompt_tokens} prompt tokens)",
                 f"  per token       {self.mean_token_latency_ms:.2f} ms",
                 f"  peak memory     {self.peak_memory_bytes / 2**20:.1f} MiB ({self.memory_kind})"]
        if self.drafter:
            k = max(self.k_trace, default=0)
            lines.append(f"  speculation     {self.drafter}, K={k}, {self.policy}: acceptance {self.acceptance_rate:.0%}, "
                         f"{self.tau:.2f} tokens per target step, draft {self.draft_s:.2f} s / target {self.verify_s:.2f} s / other {self.other_s:.2f} s")
        if self.phases:
            lines.append("  phases          " + "host ms".rjust(10) + ("device ms".rjust(11) if self.phases["device_s"] else "") + "  calls")
            for name, host in self.phases["host_s"].items():
                dev = self.phases["device_s"].get(name)
                lines.append(f"    {name:<14}{host * 1e3:>10.2f}" + (f"{dev * 1e3:>11.2f}" if dev is not None else "") + f"  {self.phases['count'][name]:>5}")
        return lines
