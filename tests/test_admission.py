"""When waiting requests join a busy batch (batch/admission.py): a few together while a queue
waits, never held longer than `hold` steps, never held without a queue or without running rows, and
every request's tokens its batch-1 tokens whatever the grouping."""

import pytest

from labkit.batch.admission import Admission, AdmissionGate
from labkit.batch.engine import BatchConfig, BatchEngine
from labkit.batch.scheduler import ContinuousBatcher
from labkit.config import GenerationConfig
from labkit.errors import LabkitError
from labkit.generate import generate
from labkit.specdec.drafters import NgramDrafter
from tests.test_batch import engine_for, prompts


def test_the_gate_holds_a_lone_joiner_only_while_a_queue_waits_and_at_most_hold_steps() -> None:
    gate = AdmissionGate(16, Admission(hold=8))  # a group of 4 (a quarter of the slots)
    assert gate.group == 4 and AdmissionGate(7).group == 1 and AdmissionGate(8).group == 2
    assert gate.joining(waiting=10, free=4, running=12, step=0) == 4  # a group can join
    assert gate.joining(waiting=1, free=1, running=15, step=0) == 1  # no queue: nothing to wait for
    assert gate.joining(waiting=10, free=1, running=15, step=0, at=8) == 1  # a hold that would end before `at`
    assert gate.joining(waiting=10, free=2, running=14, step=0) == 0  # a queue, fewer than a group: held
    gate.record(0, 2, step=3)
    assert gate.joining(waiting=10, free=2, running=14, step=10) == 0
    assert gate.joining(waiting=10, free=2, running=14, step=11) == 2  # held 8 steps: they join
    assert gate.joining(waiting=10, free=2, running=0, step=4) == 2  # no row runs: never held
    gate.record(2, 2, step=11)
    assert gate.since is None and gate.joining(waiting=8, free=1, running=15, step=12) == 0  # a new hold starts from its own step
    with pytest.raises(LabkitError, match="counts"):
        AdmissionGate(8, Admission(group=-1))


def admissions(engine, asks: list[list[int]], lengths: list[int], k: int, group: int):  # type: ignore[no-untyped-def]
    """Run the requests through 8 slots (K: prompt lookup) -> their tokens, and per admission: requests
    joined, requests still waiting, the step, and the step their hold began (None: not held)."""
    batch = BatchEngine(engine, BatchConfig(slots=8, max_seq_len=64))
    batcher = ContinuousBatcher(batch, (lambda: NgramDrafter(3, 1)) if k else None, k, admission=Admission(group=group, hold=4))
    admit, record, log, held = batch.admit_many, batcher.gate.record, [], [None]
    batcher.gate.record = lambda *a: (held.__setitem__(0, batcher.gate.since), record(*a))[1]  # type: ignore[method-assign]
    batch.admit_many = lambda ps: (log.append((len(ps), len(batcher.waiting), batcher.steps, held[0])), admit(ps))[1]  # type: ignore[method-assign]
    got = [batcher.submit(p, GenerationConfig(max_new_tokens=n)) for p, n in zip(asks, lengths, strict=True)]
    batcher.run()
    return [r.tokens for r in got], log


@pytest.mark.parametrize("k", [0, 3])
def test_requests_join_a_saturated_batch_in_groups_with_their_batch_1_tokens(k: int) -> None:
    """Rows of ragged lengths free their slots one at a time: with a queue waiting, the next requests
    join two at a time (8 slots: a group of 2), or alone once the first has waited `hold` steps; with a
    group of 1 (admission as each slot frees) the same run admits them one by one."""
    engine = engine_for("llama")
    asks = prompts(24, engine.args.vocab_size, seed=3)
    lengths = [6 + (i * 5) % 17 for i in range(len(asks))]
    want = [generate(engine, p, GenerationConfig(max_new_tokens=n)).tokens for p, n in zip(asks, lengths, strict=True)]
    (tokens, grouped), (tokens_1, one_by_one) = (admissions(engine, asks, lengths, k, group) for group in (0, 1))
    assert tokens == want and tokens_1 == want
    grouped, one_by_one = grouped[1:], one_by_one[1:]  # (after the first admission, which fills every slot)
    assert sum(n == 1 for n, _, _, _ in one_by_one) >= 4  # the run does free slots one at a time
    assert len(grouped) < len(one_by_one)
    for n, left, step, since in grouped:  # a lone joiner: the queue's last, or held its `hold` steps
        assert n >= 2 or left == 0 or (since is not None and step - since >= 4), (grouped, n, left, step, since)
