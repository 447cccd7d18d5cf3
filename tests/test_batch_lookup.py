"""Prompt lookup for batched rows on the device (batch/lookup.py): every request's tokens are its
plain greedy tokens, with rows joining and leaving, EOS held by min_new_tokens, host steps mixed in,
and rows too close to their slot's end left to the host."""

import pytest
import torch

from labkit.batch.controller import BatchKController
from labkit.batch.engine import BatchConfig, BatchEngine
from labkit.batch.lookup import CHUNK, BatchLookup
from labkit.batch.scheduler import ContinuousBatcher
from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.errors import LabkitError
from labkit.generate import generate
from labkit.kernels.reference import lookup_draft
from labkit.models.tiny import tiny_hf_model
from labkit.specdec.drafters import NgramDrafter
from labkit.specdec.lookup import lookup_reference
from tests.test_batch import Scripted


def engine() -> Engine:
    hf = tiny_hf_model("llama", seed=5)
    hf.generation_config.eos_token_id = None
    return Engine.from_hf(hf, "cpu", "float32", max_seq_len=256)


def asks(n: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = torch.randint(3, vocab, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
        out.append(p + p[:3] + p)  # repeats: lookup finds drafts
    return out


def two_requests(max_new_tokens: int, max_seq_len: int) -> tuple[list[list[int]], GenerationConfig, list[list[int]], BatchEngine, BatchLookup]:
    """Two requests (seed 2), their config and plain greedy tokens, and a 2-slot batch with device lookup steps of K 2."""
    eng = engine()
    prompts = asks(2, eng.args.vocab_size, seed=2)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens)
    batch = BatchEngine(eng, BatchConfig(slots=2, max_seq_len=max_seq_len))
    return prompts, cfg, [generate(eng, p, cfg).tokens for p in prompts], batch, BatchLookup(batch, 2)


def test_the_lookup_rule_over_rows_is_each_rows_own() -> None:
    g = torch.Generator().manual_seed(1)
    history = torch.randint(0, 5, (6, 40), generator=g)  # (n, Lh) few distinct tokens: matches of every length
    n_ctx = torch.tensor([1, 2, 7, 19, 33, 40])
    got = lookup_draft(history, n_ctx, 5)  # (n, 5)
    assert got.tolist() == [lookup_reference(history[b, : n_ctx[b]].tolist(), 5) for b in range(6)]


@pytest.mark.parametrize("slots", [1, 3])
def test_device_lookup_chunks_give_every_request_its_plain_greedy_tokens(slots: int) -> None:
    """More requests than slots (rows join and leave between chunks, the last row moving into a
    freed slot), different lengths (rows finish inside a chunk), one request's EOS held by its
    min_new_tokens, the others' ending them."""
    eng = engine()
    prompts = asks(5, eng.args.vocab_size, seed=3)
    free = generate(eng, prompts[1], GenerationConfig(max_new_tokens=30, stop_at_eos=False)).tokens
    eos = (free[6], free[15])  # one set for every row: chunks step them all together
    configs = [GenerationConfig(max_new_tokens=20 + 3 * i, eos_token_ids=eos) for i in range(5)]
    configs[1] = GenerationConfig(max_new_tokens=30, min_new_tokens=12, eos_token_ids=eos)
    want = [generate(eng, p, c).tokens for p, c in zip(prompts, configs, strict=True)]
    batch = BatchEngine(eng, BatchConfig(slots=slots, max_seq_len=160))
    lookup = BatchLookup(batch, 3)
    chunks = []
    run = lookup.run
    lookup.run = lambda rows, eos, steps: (chunks.append((len(rows), steps)), run(rows, eos, steps))[1]  # type: ignore[method-assign]
    batcher = ContinuousBatcher(batch, lambda: NgramDrafter(3, 1), 3, lookup=lookup)
    got = [batcher.submit(p, c) for p, c in zip(prompts, configs, strict=True)]
    batcher.run()
    assert [r.tokens for r in got] == want
    assert len(chunks) >= 3 and max(n for n, _ in chunks) == slots  # chunks ran, over every slot
    assert max(m for _, m in chunks) == CHUNK and min(m for _, m in chunks) < CHUNK  # shorter where rows were nearly done
    assert sum(r.accepted for r in got) > 0  # some of the device's drafts were kept: steps committed several tokens
    assert all(len(r.draft_tokens) == r.verify_steps == len(r.accepted_lengths) for r in got)
    long = [r for r in got if len(r.tokens) > 2 * CHUNK]
    assert long and all(len(set(r.token_times)) <= len(r.token_times) // 2 for r in long)  # a chunk's tokens reach the host together


def test_host_steps_between_chunks_and_a_full_slot_left_to_the_host() -> None:
    """A controller choosing plain steps (launched ahead) and K between chunks: each chunk starts
    from the context the host steps grew. A slot with less room than a chunk needs runs host steps:
    the output is the same, and the device ran no step past the slot."""
    eng = engine()
    prompts = asks(3, eng.args.vocab_size, seed=7)
    cfg = GenerationConfig(max_new_tokens=40)
    want = [generate(eng, p, cfg).tokens for p in prompts]
    batch = BatchEngine(eng, BatchConfig(slots=2, max_seq_len=72))  # room for a chunk only early on
    lookup = BatchLookup(batch, 2)
    ctl = BatchKController(2, candidates=[0, 2], warm=1, explore_every=2)
    batcher = ContinuousBatcher(batch, lambda: NgramDrafter(3, 1), 2, ctl, ahead=True, lookup=lookup)
    got = [batcher.submit(p, cfg) for p in prompts]
    chunks: list[int] = []
    host = 0
    run = lookup.run
    lookup.run = lambda *args: (chunks.append(1), run(*args))[1]  # type: ignore[method-assign]
    while batcher.busy:
        steps, n_chunks = batcher.steps, len(chunks)
        batcher.step()
        host += len(chunks) == n_chunks and batcher.steps > steps
    assert [r.tokens for r in got] == want
    assert chunks and host and lookup.room < max(len(p) for p in prompts) + 40


@pytest.mark.parametrize("best", [0, 2])
def test_a_controllers_try_of_k_runs_one_device_step(best: int) -> None:
    """A controller that takes K while another K rates best is trying it: the chunk runs one step
    (a try of a losing K costs one step, not CHUNK of them); where K is the best, whole chunks."""
    prompts, cfg, want, batch, lookup = two_requests(40, 160)
    chunks: list[int] = []
    run = lookup.run
    lookup.run = lambda rows, eos, steps: (chunks.append(steps), run(rows, eos, steps))[1]  # type: ignore[method-assign]
    batcher = ContinuousBatcher(batch, lambda: NgramDrafter(3, 1), 2, Scripted(2, (0, 0, 2) if best == 0 else (2,), best=best), ahead=True, lookup=lookup)  # type: ignore[arg-type]
    got = [batcher.submit(p, cfg) for p in prompts]
    batcher.run()
    assert [r.tokens for r in got] == want
    assert chunks and (set(chunks) == {1} if best == 0 else max(chunks) == CHUNK), chunks


def test_a_try_of_k_is_rated_at_what_its_step_costs_in_a_whole_chunk() -> None:
    """A chunk's host work (here a read of >= 40 ms) is paid once per chunk: a one-step try of K
    is charged its own step (>= 5 ms, the device's time: here a CPU's, in the call) and its share
    of that work in a chunk of the length its rows would run, not the whole 40 ms (charged so on
    the H200 K 5 looked 26% slower than its chunks ran, and lost to K 2)."""
    import statistics
    import time

    eng = engine()
    batch = BatchEngine(eng, BatchConfig(slots=2, max_seq_len=160))
    lookup = BatchLookup(batch, 2)
    run, read = lookup.run, lookup.read
    lookup.run = lambda rows, eos, steps: (time.sleep(0.005 * steps), run(rows, eos, steps))[1]  # type: ignore[method-assign]
    lookup.read = lambda rows: (time.sleep(0.04), read(rows))[1]  # type: ignore[method-assign]
    ctl = Scripted(2, (0, 0, 2), best=0)  # every K 2 chunk a try: one step
    batcher = ContinuousBatcher(batch, lambda: NgramDrafter(3, 1), 2, ctl, ahead=True, lookup=lookup)  # type: ignore[arg-type]
    for p in asks(2, eng.args.vocab_size, seed=2):
        batcher.submit(p, GenerationConfig(max_new_tokens=60))
    batcher.run()
    tries = [seconds for k, seconds in ctl.seen if k == 2]
    assert len(tries) >= 5 and min(tries) >= 0.005 and statistics.median(tries) < 0.025, tries


def test_a_chunk_tells_the_controller_of_the_rows_still_running_only() -> None:
    """A row that finished inside a chunk idles through its last steps: the controller hears each
    step's accepted drafts for the rows still running (a finished row's 0 would read as a rejected
    draft), so the rows it is told of are the steps the requests took part in."""
    eng = engine()
    batch = BatchEngine(eng, BatchConfig(slots=2, max_seq_len=160))
    ctl = Scripted(2, (2,), best=2)
    batcher = ContinuousBatcher(batch, lambda: NgramDrafter(3, 1), 2, ctl, lookup=BatchLookup(batch, 2))  # type: ignore[arg-type]
    got = [batcher.submit(p, GenerationConfig(max_new_tokens=n)) for p, n in zip(asks(2, eng.args.vocab_size, seed=8), [6, 40], strict=True)]
    batcher.run()
    assert sum(len(k) for k in ctl.kept) == sum(r.verify_steps for r in got) and min(len(k) for k in ctl.kept) == 1, ctl.kept


@pytest.mark.parametrize("captured", [False, True])
def test_a_chunk_that_captured_its_step_is_not_rated(captured: bool) -> None:
    """A chunk whose bucket's step was captured first took the capture's time too (on an H200 it
    rated K at 713 tok/s at 2 rows, where it ran 4,600): the controller hears nothing of it."""
    eng = engine()
    batch = BatchEngine(eng, BatchConfig(slots=2, max_seq_len=160))
    lookup = BatchLookup(batch, 2)
    run = lookup.run
    lookup.run = lambda *args: (run(*args), captured)[1]  # type: ignore[method-assign]
    ctl = Scripted(2, (2,), best=2)
    batcher = ContinuousBatcher(batch, lambda: NgramDrafter(3, 1), 2, ctl, lookup=lookup)  # type: ignore[arg-type]
    for p in asks(2, eng.args.vocab_size, seed=2):
        batcher.submit(p, GenerationConfig(max_new_tokens=30))
    batcher.run()
    assert (ctl.seen == []) if captured else len(ctl.seen) >= 8


def test_a_controller_takes_chunks_of_each_k_it_has_device_steps_for() -> None:
    """Device lookup steps of K 1 and 3 beside plain steps, a controller going round 0, 1, 3: each
    drafting K runs as chunks of its own steps (a row's device history rewritten where the other
    K's steps or plain steps moved it on), and every request keeps its plain greedy tokens."""
    eng = engine()
    prompts = asks(3, eng.args.vocab_size, seed=11)
    cfg = GenerationConfig(max_new_tokens=36)
    want = [generate(eng, p, cfg).tokens for p in prompts]
    batch = BatchEngine(eng, BatchConfig(slots=2, max_seq_len=160))
    lookups = [BatchLookup(batch, 1), BatchLookup(batch, 3)]
    ran: list[int] = []
    for lu in lookups:
        run = lu.run
        lu.run = lambda *args, _run=run, _k=lu.k: (ran.append(_k), _run(*args))[1]  # type: ignore[method-assign]
    batcher = ContinuousBatcher(batch, lambda: NgramDrafter(3, 1), 3, Scripted(3, (1, 3, 0), best=3), ahead=True, lookup=lookups)  # type: ignore[arg-type]
    got = [batcher.submit(p, cfg) for p in prompts]
    batcher.run()
    assert [r.tokens for r in got] == want
    assert {1, 3} <= set(ran), ran


def test_a_chunk_runs_the_steps_its_rows_are_expected_to_need() -> None:
    """CHUNK steps, or fewer where every row should be done sooner at its tokens per step so far
    (at least one token a step); never fewer than one."""
    from types import SimpleNamespace

    def row(max_new: int, tokens: int, steps: int) -> SimpleNamespace:
        return SimpleNamespace(config=GenerationConfig(max_new_tokens=max_new), tokens=[0] * tokens, verify_steps=steps)

    from labkit.batch.chunking import chunk_steps as steps

    assert steps([row(100, 1, 0)]) == CHUNK  # nothing known: one token a step
    assert steps([row(100, 95, 10)]) == 1  # 5 left at ~9.4 a step
    assert steps([row(100, 91, 30)]) == 3  # 9 left at 3 a step
    assert steps([row(100, 91, 30), row(100, 96, 95)]) == 4  # the slowest row: 4 left at ~1 a step
    assert steps([row(100, 100, 40)]) == 1
    assert steps([row(100, 67, 30)], coming=[24], uncounted=8) == 4  # a chunk read, not taken: 91 tokens after 38 steps, 9 left at ~2.4 a step


def test_a_chunk_goes_on_ahead_only_where_every_row_goes_on() -> None:
    """rows_go_on: each row's tokens in the chunk just read where every row continues after it;
    None where one reaches max_new_tokens, meets an EOS that ends it, was cancelled or has no room."""
    from types import SimpleNamespace

    from labkit.batch.chunking import rows_go_on

    def row(tokens: int, max_new: int = 20, stop: bool = True, finished: bool = False) -> SimpleNamespace:
        return SimpleNamespace(config=GenerationConfig(max_new_tokens=max_new, stop_at_eos=stop), tokens=[0] * tokens,
                               context=[0] * (10 + tokens), eos_ids=(2,), finished=finished)

    chunk = [[[5, 6], [7]], [[8], [9, 10, 11]]]  # [step][row]: row 0 took 3 tokens, row 1 took 4
    assert rows_go_on([row(5), row(5)], chunk, room=100) == [3, 4]
    assert rows_go_on([row(5), row(16)], chunk, room=100) is None  # row 1 reaches 20
    assert rows_go_on([row(5), row(5, finished=True)], chunk, room=100) is None  # cancelled
    assert rows_go_on([row(5), row(5)], chunk, room=18) is None  # row 1's context 19 > room
    eos = [[[5, 2], [7]], [[8], [9]]]
    assert rows_go_on([row(5), row(5)], eos, room=100) is None and rows_go_on([row(5, stop=False), row(5)], eos, room=100) == [3, 2]


@pytest.mark.parametrize("slots", [1, 3])
def test_chunks_launched_ahead_keep_each_rows_tokens_and_drafts(slots: int) -> None:
    """With `ahead`, the next chunk is launched as soon as the last is read, before the host takes
    its verdicts, wherever no row ends in it and no waiting request could join: every request its
    plain greedy tokens, and each row's drafts and verdicts those of chunks read one at a time."""
    eng = engine()
    prompts = asks(5, eng.args.vocab_size, seed=3)
    free = generate(eng, prompts[1], GenerationConfig(max_new_tokens=60, stop_at_eos=False)).tokens
    configs = [GenerationConfig(max_new_tokens=30 + 7 * i, eos_token_ids=(free[40],)) for i in range(5)]
    want = [generate(eng, p, c).tokens for p, c in zip(prompts, configs, strict=True)]
    runs = []
    for ahead in (False, True):
        batch = BatchEngine(eng, BatchConfig(slots=slots, max_seq_len=200))
        lookup = BatchLookup(batch, 3)
        launched: list[int] = []
        run_on = lookup.run_on
        lookup.run_on = lambda n, steps, log=launched, go=run_on: (log.append(steps), go(n, steps))[1]  # type: ignore[method-assign]
        batcher = ContinuousBatcher(batch, lambda: NgramDrafter(3, 1), 3, ahead=ahead, lookup=lookup)
        got = [batcher.submit(p, c) for p, c in zip(prompts, configs, strict=True)]
        batcher.run()
        assert [r.tokens for r in got] == want and batcher.chunk_ahead is None
        runs.append(([(r.draft_tokens, r.accepted_lengths) for r in got], launched))
    (alone, none), (together, launched) = runs
    assert together == alone and not none and len(launched) >= 5  # chunks went ahead, nothing changed


@pytest.mark.parametrize(("ks", "best"), [((2,), 2), ((2, 0, 0, 2, 2), 2), ((2,), 0)])
def test_a_controllers_chunks_go_ahead_where_its_choice_is_its_best(ks: tuple[int, ...], best: int) -> None:
    """With a controller, the next chunk is launched ahead where the controller, asked as the last
    chunk is read, chooses the chunk's K and rates it best (not a try). Every choice is acted on
    once, in order (one not taken there is the next step's, not asked for again), and every
    request keeps its plain greedy tokens."""
    prompts, cfg, want, batch, lookup = two_requests(60, 200)
    ctl = Scripted(2, ks, best=best)
    done: list[int] = []  # the K of each step begun: a chunk (read at once or launched ahead), or a plain step
    launched: list[int] = []
    run, run_on, advance, choose = lookup.run, lookup.run_on, batch.advance, ctl.choose
    chosen: list[int] = []
    lookup.run = lambda *a: (done.append(2), run(*a))[1]  # type: ignore[method-assign]
    lookup.run_on = lambda *a: (done.append(2), launched.append(1), run_on(*a))[2]  # type: ignore[method-assign]
    batch.advance = lambda *a: (done.append(0), advance(*a))[1]  # type: ignore[method-assign]
    ctl.choose = lambda b: (chosen.append(choose(b)), chosen[-1])[1]  # type: ignore[method-assign]
    batcher = ContinuousBatcher(batch, lambda: NgramDrafter(3, 1), 2, ctl, ahead=True, lookup=lookup)  # type: ignore[arg-type]
    got = [batcher.submit(p, cfg) for p in prompts]
    batcher.run()
    assert [r.tokens for r in got] == want
    assert done == chosen[: len(done)] and len(chosen) - len(done) <= 1, (done, chosen)  # (the last choice may find every row done)
    assert (len(launched) >= 2) if best == 2 else not launched, launched


def test_device_lookup_refuses_what_it_was_not_built_for() -> None:
    eng = engine()
    batch = BatchEngine(eng, BatchConfig(slots=2, max_seq_len=64))
    with pytest.raises(LabkitError, match="K"):
        ContinuousBatcher(batch, lambda: NgramDrafter(3, 1), 3, lookup=BatchLookup(batch, 4))  # more than K
    with pytest.raises(LabkitError, match="batch engine"):
        ContinuousBatcher(batch, lambda: NgramDrafter(3, 1), 3, lookup=BatchLookup(BatchEngine(eng, BatchConfig(slots=2, max_seq_len=64)), 3))
    with pytest.raises(LabkitError, match="invariant"):
        BatchLookup(BatchEngine(eng, BatchConfig(slots=2, max_seq_len=64, invariant=True)), 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_device_lookup_chunks_replay_captured_steps_with_plain_greedy_tokens(dtype: str) -> None:
    """On the GPU: each rows bucket's step captured once (from positions past every request, then
    every row loaded again) and replayed CHUNK times per read; ragged lengths, so rows leave and
    buckets shrink between chunks; bf16 included."""
    hf = tiny_hf_model("llama", seed=5)
    hf.generation_config.eos_token_id = None
    eng = Engine.from_hf(hf, "cuda", dtype, max_seq_len=256, cuda_graph=True)
    prompts = asks(9, eng.args.vocab_size, seed=8)
    lengths = [12 + (i * 5) % 13 for i in range(len(prompts))]
    want = [generate(eng, p, GenerationConfig(max_new_tokens=n)).tokens for p, n in zip(prompts, lengths, strict=True)]
    batch = BatchEngine(eng, BatchConfig(slots=5, max_seq_len=160, cuda_graph=True))
    lookup = BatchLookup(batch, 3)
    if dtype == "bfloat16":  # every bucket up front (as the server does); float32: each when first needed
        lookup.capture_all()
        assert set(lookup.graphs) == {1, 2, 4, 8}
    batcher = ContinuousBatcher(batch, lambda: NgramDrafter(3, 1), 3, lookup=lookup)
    got = [batcher.submit(p, GenerationConfig(max_new_tokens=n)) for p, n in zip(prompts, lengths, strict=True)]
    batcher.run()
    assert [r.tokens for r in got] == want
    assert len(lookup.graphs) >= 2  # buckets captured as rows left


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
def test_cuda_device_lookup_of_two_k_beside_plain_steps_keeps_plain_greedy_tokens() -> None:
    """On the GPU, bf16: device steps of K 1 and 3, every bucket captured up front, plain steps
    launched ahead between chunks; every request its plain greedy tokens."""
    hf = tiny_hf_model("llama", seed=5)
    hf.generation_config.eos_token_id = None
    eng = Engine.from_hf(hf, "cuda", "bfloat16", max_seq_len=256, cuda_graph=True)
    prompts = asks(6, eng.args.vocab_size, seed=12)
    cfg = GenerationConfig(max_new_tokens=30)
    want = [generate(eng, p, cfg).tokens for p in prompts]
    batch = BatchEngine(eng, BatchConfig(slots=3, max_seq_len=160, cuda_graph=True))
    lookups = [BatchLookup(batch, 1), BatchLookup(batch, 3)]
    for lu in lookups:
        lu.capture_all()
    batcher = ContinuousBatcher(batch, lambda: NgramDrafter(3, 1), 3, Scripted(3, (1, 3, 0), best=3), lookup=lookups)  # type: ignore[arg-type]
    got = [batcher.submit(p, cfg) for p in prompts]
    batcher.run()
    assert [r.tokens for r in got] == want
    assert all(set(lu.graphs) == {1, 2, 4} for lu in lookups)
