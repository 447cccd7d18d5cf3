"""Replay: a controller driven through a recorded acceptance oracle takes the steps generate takes."""

import pytest

from labkit.bench.replay import PromptOracle, record_oracle, replay, replay_suite
from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.errors import LabkitError
from labkit.generate import Speculation, generate
from labkit.models.tiny import tiny_hf_model
from labkit.specdec import ModelDrafter, make_drafter
from labkit.specdec.controllers import CostAware, FixedK

PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7], [40, 41, 42, 43, 44, 45, 46, 47, 48, 40, 41]]
CFG = GenerationConfig(max_new_tokens=30, stop_at_eos=False)


@pytest.fixture(scope="module")
def target() -> Engine:
    return Engine.from_hf(tiny_hf_model("llama", seed=5), "cpu", "float32")


def test_fixed_k_replay_takes_the_steps_generate_takes(target: Engine) -> None:
    self_draft = Engine.from_hf(tiny_hf_model("llama", seed=5), "cpu", "float32")
    drafters = [make_drafter("ngram", target), ModelDrafter(self_draft, 96, name="self"), make_drafter("truncated", target, layers=1)]
    table = {k: 0.01 + 0.002 * k for k in range(7)}
    seen_partial = False
    for drafter in drafters:
        for prompt in PROMPTS:
            oracle = record_oracle(target, drafter, "p", "c", prompt, 6, CFG)
            assert oracle.new_tokens == 30 and all(0 <= s <= o <= 6 for s, o in zip(oracle.standing, oracle.offered, strict=True))
            for k in (1, 3, 6):
                real = generate(target, prompt, CFG, Speculation(drafter, k)).stats
                want = [a for a, d in zip(real.accepted_lengths, real.drafted_lengths, strict=True) if d > 0]
                got = replay(oracle, FixedK(k), table)
                assert got["accepted_lengths"] == want and got["k_trace"] == real.k_trace, (drafter.name, prompt, k)
                seen_partial |= any(0 < a < k for a in want)
    assert seen_partial  # the truncated draft is partly right: the test saw partial acceptance, not only all or nothing


def test_replay_costs_a_forced_oracle_by_hand() -> None:
    oracle = PromptOracle("p", "c", new_tokens=9, prefill_s=0.5, step_s=0.01, offered=[0] + [4] * 8, standing=[0, 4, 0, 0, 0, 0, 0, 0, 0],
                          draft_s_per_token=0.001)
    table = {0: 0.01, 1: 0.012, 2: 0.015, 3: 0.02, 4: 0.03}
    got = replay(oracle, FixedK(2), table)
    # i=1: 2 drafted, both stand -> i=4; i=4,5,6: 2 drafted, none stands; i=7: room for 1; i=8: no room, a plain step
    assert got["k_trace"] == [2, 2, 2, 2, 1] and got["accepted_lengths"] == [2, 0, 0, 0, 0]
    assert got["seconds"] == pytest.approx(0.5 + 4 * (0.015 + 0.002) + (0.012 + 0.001) + 0.01)
    slower = replay(PromptOracle(**{**oracle.__dict__, "step_s": 0.02}), FixedK(2), table)  # a longer context: every width x2
    assert slower["seconds"] - 0.5 == pytest.approx(2 * (got["seconds"] - 0.5) - 9 * 0.001)


def test_cost_aware_replay_stays_in_range_and_drafts_long_when_all_stands() -> None:
    n = 60
    everything = PromptOracle("all", "copy", n, 0.1, 0.01, [6] * n, [6] * n, 0.0)
    nothing = PromptOracle("none", "chat", n, 0.1, 0.01, [6] * n, [0] * n, 0.0)
    table = {k: 0.01 * (1 + 0.1 * k) for k in range(7)}
    result = replay_suite([everything, nothing], {"fixed-1": lambda: FixedK(1), "fixed-6": lambda: FixedK(6),
                                                  "cost-6": lambda: CostAware(6)}, table)
    rows = {(r["controller"], r["prompt_id"]): r for r in result["rows"]}
    assert all(1 <= k <= 6 for r in result["rows"] for k in r["k_trace"])
    assert rows[("cost-6", "all")]["k_trace"].count(6) >= len(rows[("cost-6", "all")]["k_trace"]) - 2
    assert set(rows[("cost-6", "none")]["k_trace"][3:]) == {1}
    by_cat = {r["category"]: r for r in result["per_category"]}
    assert by_cat["copy"]["best_fixed"] == "fixed-6" and by_cat["chat"]["best_fixed"] == "fixed-1"
    assert by_cat["copy"]["ratio_to_best_fixed"]["cost-6"] > 0.9 and by_cat["chat"]["ratio_to_best_fixed"]["cost-6"] > 0.9


def test_replay_refuses_what_it_cannot_replay(target: Engine) -> None:
    with pytest.raises(LabkitError, match="greedy decoding"):
        record_oracle(target, make_drafter("ngram", target), "p", "c", PROMPTS[0], 4, GenerationConfig(temperature=0.7))
    with pytest.raises(LabkitError, match="depends only on the context"):
        record_oracle(target, make_drafter("layerskip", target, layers=1), "p", "c", PROMPTS[0], 4, CFG)
    with pytest.raises(LabkitError, match="passes"):
        replay_suite([], {}, {0: 1.0}, passes=0)
