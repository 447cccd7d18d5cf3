"""The generate loop's steps (labkit/steps.py): chosen from what the parts declare, and each
kind of step checked on its own against plain greedy decoding."""

import torch

from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.generate import generate
from labkit.metrics.phases import PhaseTimer
from labkit.metrics.stats import GenerationStats
from labkit.models.tiny import tiny_hf_model
from labkit.specdec.controllers import FixedK
from labkit.specdec.draft import Draft, Drafter
from labkit.specdec.policies import GreedyMatch, RejectionSampling
from labkit.steps import DeviceSpeculation, HostSpeculation, PlainGreedy, PlainSampled, Request, choose_step

PROMPT = [3, 9, 4, 7, 1, 8]


def _engine() -> Engine:
    return Engine.from_hf(tiny_hf_model("llama", seed=4), "cpu", "float32")


def _request(engine: Engine, budget: int, config: GenerationConfig | None = None) -> Request:
    """A request after its prefill and first (greedy) token, as generate leaves it."""
    config = config or GenerationConfig(max_new_tokens=budget, stop_at_eos=False)
    engine.ensure_capacity(len(PROMPT) + budget)
    first = int(engine.prefill(torch.tensor([PROMPT])).argmax(-1))
    eos_mask = torch.zeros(engine.args.vocab_size, dtype=torch.bool)
    stats = GenerationStats(prompt_tokens=len(PROMPT), new_tokens=0, stop_reason="", ttft_s=0.0, total_s=0.0)
    return Request(engine, config, None, PhaseTimer(engine.device, False), set(), eos_mask, False, budget, len(PROMPT), stats,
                   tokens=[first], context=PROMPT + [first])


class Oracle(Drafter):
    """Proposes the plain greedy continuation (known in advance), wrong from position `wrong_at`."""

    name = "oracle"

    def __init__(self, want: list[int], wrong_at: int = 99) -> None:
        self.want, self.wrong_at = want, wrong_at

    def propose(self, context, k, config, generator):
        done = len(context) - len(PROMPT)
        draft = self.want[done : done + k]
        return Draft([t if done + i < self.wrong_at else (t + 1) % 64 for i, t in enumerate(draft)])


class Recorded(Drafter):
    """A drafter that declares device steps (and records what the loop asked of them)."""

    name = "recorded"
    chunk = 4

    def __init__(self, host: Drafter) -> None:
        self.host, self.device_steps, self.calls = host, self, []

    def propose(self, context, k, config, generator):
        return self.host.propose(context, k, config, generator)

    def run_steps(self, context, k, m, eos_mask, eos_until):
        self.calls.append((k, m))
        return [([], [t]) for t in self.host.propose(context, m, GenerationConfig(), None).tokens[:m]]


def test_choose_step_reads_declarations() -> None:
    engine, greedy, sampled = _engine(), GenerationConfig(), GenerationConfig(temperature=1.0)
    assert isinstance(choose_step(engine, greedy, False, None, None, None), PlainGreedy)
    assert isinstance(choose_step(engine, sampled, False, None, None, None), PlainSampled)
    host = Oracle([])
    step = choose_step(engine, greedy, False, host, GreedyMatch(), FixedK(3))
    assert isinstance(step, HostSpeculation) and step.fused
    assert not choose_step(engine, greedy, True, host, GreedyMatch(), FixedK(3)).fused  # phases timed apart
    assert not choose_step(engine, sampled, False, host, RejectionSampling(), FixedK(3)).fused
    device = Recorded(host)
    assert isinstance(choose_step(engine, greedy, False, device, GreedyMatch(), FixedK(3)), DeviceSpeculation)
    assert isinstance(choose_step(engine, greedy, True, device, GreedyMatch(), FixedK(3)), HostSpeculation)


def test_each_step_gives_plain_greedy_tokens() -> None:
    engine = _engine()
    want = generate(engine, PROMPT, GenerationConfig(max_new_tokens=20, stop_at_eos=False)).tokens
    for make in (lambda: PlainGreedy(4),
                 lambda: HostSpeculation(Oracle(want, wrong_at=7), GreedyMatch(), FixedK(3), PlainGreedy(1), fused=True),
                 lambda: HostSpeculation(Oracle(want, wrong_at=7), GreedyMatch(), FixedK(3), PlainGreedy(1), fused=False)):
        step, req = make(), _request(engine, 20)
        while req.remaining > 0:
            step(req)
        assert req.tokens == want and len(req.context) == len(PROMPT) + 20 and engine.length == len(req.context) - 1
    req = _request(engine, 20)
    HostSpeculation(Oracle(want, wrong_at=3), GreedyMatch(), FixedK(4), PlainGreedy(1), fused=True)(req)
    assert req.stats.accepted_lengths == [2] and req.tokens == want[:4]  # drafts 1, 2 stood; 3 was wrong: the target's token


def test_device_speculation_asks_for_chunks_and_books_them() -> None:
    engine = _engine()
    want = generate(engine, PROMPT, GenerationConfig(max_new_tokens=12, stop_at_eos=False)).tokens
    drafter = Recorded(Oracle(want))
    step = choose_step(engine, GenerationConfig(), False, drafter, GreedyMatch(), FixedK(2))
    req = _request(engine, 12)
    step(req)
    assert drafter.calls == [(2, 4)] and req.tokens == want[:5]  # chunk 4 (remaining 11 // 2 = 5): four 1-token steps
