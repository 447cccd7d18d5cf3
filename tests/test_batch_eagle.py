"""EAGLE chains for batched rows (labkit/batch/eagle.py): drafted inside each batched verify, every
row's drafts are a single-request EAGLE drafter's, and every request's output its plain greedy one."""

from __future__ import annotations

import pytest
import torch

from labkit.batch.eagle import BatchEagle, device_eagles
from labkit.batch.engine import BatchConfig, BatchEngine
from labkit.batch.lookup import BatchLookup
from labkit.batch.scheduler import ContinuousBatcher
from labkit.config import GenerationConfig
from labkit.errors import LabkitError
from labkit.generate import Speculation, generate
from labkit.specdec.drafters import NgramDrafter
from labkit.specdec.eagle_drafter import EagleDrafter
from labkit.specdec.lookup import latest_match
from tests.test_batch import Scripted, prompts
from tests.test_eagle import _engine, random_head

K = 3


def host_eagle(engine, head, prompt: list[int], cfg: GenerationConfig):  # type: ignore[no-untyped-def]
    """One request alone, its EAGLE chain proposed from the host every step: the drafts to match."""
    return generate(engine, prompt, cfg, Speculation(EagleDrafter(engine, head, device_steps=False), K))


@pytest.mark.parametrize("slots,ahead,whole,padded", [(1, False, False, False), (3, False, False, False), (3, True, False, False),
                                                      (3, False, True, False), (3, False, True, True), (1, False, False, True)])
def test_batched_eagle_rows_draft_what_one_request_drafts_and_keep_plain_greedy(slots: int, ahead: bool, whole: bool, padded: bool) -> None:
    """whole: a load's first chains over its bucket's rows, the loaded marked (as captured on CUDA): the others' drafts and caches kept;
    padded: loads' catch-ups padded to a few lengths through a scratch row (as on CUDA, batch/eagle_load.py)."""
    engine, head = _engine(), random_head()
    asks = [p * 2 for p in prompts(5, 96, seed=11)]  # repeats: some drafts stand
    lengths = [24 + 5 * i for i in range(len(asks))]  # ragged: rows leave and others join mid-run
    cfgs = [GenerationConfig(max_new_tokens=n, stop_at_eos=False) for n in lengths]
    want = [generate(engine, p, c).tokens for p, c in zip(asks, cfgs, strict=True)]
    alone = [host_eagle(engine, head, p, c) for p, c in zip(asks, cfgs, strict=True)]
    batch = BatchEngine(engine, BatchConfig(slots=slots, max_seq_len=128))
    steps = BatchLookup(batch, K, hook=BatchEagle(batch, head, K, padded=padded))
    steps.hook.whole_bucket = whole  # type: ignore[attr-defined]
    batcher = ContinuousBatcher(batch, lambda: NgramDrafter(3, 1), K, ahead=ahead, lookup=steps)  # ahead: chunks launched before their last's verdicts
    got = [batcher.submit(p, c) for p, c in zip(asks, cfgs, strict=True)]
    batcher.run()
    assert [r.tokens for r in got] == want
    compared = 0
    for request, one in zip(got, alone, strict=True):
        # the host drafts fewer near the token budget, device steps keep K (one captured width): compare before
        n = next((i for i, d in enumerate(one.stats.draft_tokens) if len(d) < K), len(one.stats.draft_tokens))
        assert request.draft_tokens[:n] == one.stats.draft_tokens[:n]
        assert request.accepted_lengths[:n] == one.stats.accepted_lengths[:n]
        compared += n
    assert compared >= 30 and sum(r.accepted for r in got) > 0  # many steps, some drafts kept
    hook = steps.hook
    assert isinstance(hook, BatchEagle) and (hook.chained < hook.loaded if slots > 1 else hook.chained == hook.loaded)  # rows admitted together: one first chain
    assert sum(r.accepted for r in got) < sum(r.drafted for r in got)  # and some rejected: ragged rows were met


def test_eagle_rows_under_a_k_controller_go_plain_and_back_with_plain_greedy_and_no_ngram_judging() -> None:
    """eagle-device-auto (a K controller over EAGLE chunks): rows switch between plain steps and
    chunks, each switch back loads them again from their contexts, and every output stays plain
    greedy; the controller learns what rows keep from EAGLE's drafts alone (plain steps' host
    n-gram drafts, batch/shadow.py, would judge another drafter's acceptance). A chunk's load of
    rows back from plain steps (here >= 1.5 s each: a margin over the steps' own seconds, which a
    busy machine stretches) is told apart, a switch's cost, not in its steps'
    seconds (charged to them, on the H200 a one-step try was rated at 3.4 ms where EAGLE's steps
    took 0.8). A request's first load (its prompt's draft cache) is no switch's cost (told, it priced
    switches at 8-42 ms at 1-8 rows on the H200, and the controller stayed plain at one row) but
    drafting's: in its chunk's steps (left out, EAGLE's K 5 was rated 1.28x plain at 16 rows on the
    H200 where it ran 0.77x: a request joined every few steps)."""
    import time

    engine, head = _engine(), random_head()
    asks = [p * 2 for p in prompts(4, 96, seed=13)]
    cfgs = [GenerationConfig(max_new_tokens=20 + 4 * i, stop_at_eos=False) for i in range(len(asks))]
    want = [generate(engine, p, c).tokens for p, c in zip(asks, cfgs, strict=True)]
    batch = BatchEngine(engine, BatchConfig(slots=3, max_seq_len=128))
    hook = BatchEagle(batch, head, K)
    load, back = hook.load, []
    hook.load = lambda *args: (back.append(any(args[2])), time.sleep(1.5), load(*args))[2]  # type: ignore[method-assign]
    ctl = Scripted(K, (0, 0, K), best=K)  # two plain steps, then a chunk of EAGLE steps, in turn
    batcher = ContinuousBatcher(batch, lambda: NgramDrafter(3, 1), K, ctl, lookup=BatchLookup(batch, K, hook=hook))  # type: ignore[arg-type]
    got = [batcher.submit(p, c) for p, c in zip(asks, cfgs, strict=True)]
    batcher.run()
    assert [r.tokens for r in got] == want
    assert {k for k, _ in ctl.seen} == {0, K} and ctl.kept and not ctl.judged
    assert hook.loaded > len(asks)  # rows back from plain steps were loaded again
    assert sum(seconds >= 1.5 for k, seconds in ctl.loads if k == K) == sum(back) >= 2 and len(back) > sum(back), (ctl.loads, back)
    firsts, drafting = len(back) - sum(back), sum(seconds for k, seconds in ctl.seen if k == K)  # (chunks at their full length)
    assert 1.5 * firsts <= drafting < 1.5 * (firsts + sum(back)), (firsts, drafting, back)  # the first loads' seconds in K's steps, the others' not


@pytest.mark.parametrize("window,padded", [(512, False), (6, False), (6, True)])
def test_eagle_rows_back_from_plain_steps_catch_up_from_the_steps_hidden_states(window: int, padded: bool) -> None:
    """Rows that a K controller sends to plain steps and back: each is loaded again from the hidden
    states those plain steps kept (BatchEngine.listen_steps), over the positions since its last
    chunk, not by a pass over its whole context (the H200 paid 9-47 ms a switch back for that
    pass); one whose plain steps came before its first chunk, from its admission's hidden states and
    those steps'. Its drafts are those a load by a pass of its own gives, step for step, and every
    output stays plain greedy. The steps'
    states are kept by position mod the draft layer's window and a step's headroom: window 6, the
    catch-ups read across the ring's wrap many times. padded: through padded passes (batch/eagle_load.py), which
    read the row's elements before the catch-up's first from the chunks before."""
    engine, head = _engine(), random_head()
    asks = [p * 2 for p in prompts(4, 96, seed=13)]
    cfgs = [GenerationConfig(max_new_tokens=24 + 4 * i, stop_at_eos=False) for i in range(len(asks))]
    want = [generate(engine, p, c).tokens for p, c in zip(asks, cfgs, strict=True)]
    runs = []
    for from_steps in (True, False):
        batch = BatchEngine(engine, BatchConfig(slots=3, max_seq_len=128))
        hook = BatchEagle(batch, head, K, window=window, padded=padded)
        if not from_steps:  # no step's hidden states kept: every load but a new request's a pass over the row's context (as before)
            batch.step_listeners.clear()
        batcher = ContinuousBatcher(batch, lambda: NgramDrafter(3, 1), K, Scripted(K, (0, 0, 0, K), best=K),  # type: ignore[arg-type]
                                    lookup=BatchLookup(batch, K, hook=hook))
        got = [batcher.submit(p, c) for p, c in zip(asks, cfgs, strict=True)]
        batcher.run()
        assert [r.tokens for r in got] == want
        runs.append(([r.draft_tokens for r in got], hook.caught_up, hook.prefilled))
    (drafts, caught_up, prefilled), (full_drafts, none, passes) = runs
    assert caught_up >= 8 and prefilled + caught_up == passes and none == 0, runs[0][1:] + runs[1][1:]  # (rows moved by a release: a pass)
    assert drafts == full_drafts


def test_a_request_a_release_moves_takes_its_kept_hidden_states_along() -> None:
    """A is admitted and steps on; B joins later, steps, and moves into A's slot when A leaves: the
    hidden states kept for B (its admission's and its steps') go along (BatchEngine.listen_releases),
    so B's load there, at once or after more plain steps, catches up from them, no pass of its own,
    and its draft layer gets what a pass over its context gives; the slot's positions A's steps wrote
    are never read (BatchEngine.turns tells the slots' requests apart). (Kept by prompt and not
    moved, such loads were passes: on the H200 one stalled 1.8 s.)"""
    engine, head = _engine(), random_head()
    batch = BatchEngine(engine, BatchConfig(slots=2, max_seq_len=64))
    hook = BatchEagle(batch, head, K)
    a, b = prompts(2, 96, seed=3)
    a, b = a[:6], b[:8]
    batch.admit_many([a])
    step = lambda: batch.advance(torch.zeros(batch.active, dtype=torch.long))  # noqa: E731
    for _ in range(10):
        step()  # A at positions 6..15
    batch.admit_many([b])
    for _ in range(3):
        step()  # A 16..18, B 8..10
    assert batch.release(0) == 1  # A leaves, B moves into slot 0 (length 11)
    for steps in (0, 2):  # at once, and after B's steps 11..12 in slot 0
        for _ in range(steps):
            step()
        context = b + [0] * (batch.lengths[0] + 1 - len(b))  # (the tokens fed are zeros: what a load reads of them)
        passes, caught_up, kept = hook.prefilled, hook.caught_up, hook.fed[0]
        hook.load([0], [context], [0], [len(b)])
        assert (hook.prefilled, hook.caught_up) == (passes, caught_up + 1)
        caught = hook.anchor_feat[0].clone()  # (D,) the anchor's predicted feature: from every element caught up
        hook.fed[0] = (0, 0, -1)  # nothing kept: the same load by a pass over the context
        hook.load([0], [context], [0], [len(b)])
        assert hook.prefilled == passes + 1
        torch.testing.assert_close(caught, hook.anchor_feat[0], rtol=1e-4, atol=1e-4)
        hook.fed[0] = kept


@pytest.mark.parametrize("whole", [False, True])
def test_batched_eagle_mix_rows_copy_or_chain_as_one_requests_eagle_ngram(whole: bool) -> None:
    """copy_after 2 (eagle-mix): a row whose context ends in a bigram seen before drafts lookup's copy,
    else its chain; every row's drafts are a lone request's eagle-ngram host loop's, step for step
    (whole: loads' first chains over their bucket's rows, as captured on CUDA: the others' matches kept)."""
    engine, head = _engine(), random_head()
    one = GenerationConfig(max_new_tokens=1, stop_at_eos=False)
    pool = [p * 2 for p in prompts(8, 96, seed=7)]  # repeats: copies; the random head's chains elsewhere
    # prompts whose context at admission (the prompt and its first token) ends in a bigram seen before: the load's draft a copy
    opened = [[p[-1], *generate(engine, p, one).tokens] + p for p in pool]
    copy_first = [p for p in opened if latest_match(p + generate(engine, p, one).tokens, 3, 2) is not None]
    asks = copy_first[:2] + pool[:2]
    assert len(asks) == 4 and all(latest_match(p + generate(engine, p, one).tokens, 3, 2) is None for p in pool[:2])
    cfgs = [GenerationConfig(max_new_tokens=30 + 6 * i, stop_at_eos=False) for i in range(len(asks))]
    alone = [generate(engine, p, c, Speculation(EagleDrafter(engine, head, device_steps=False, lookup_over=2), K)) for p, c in zip(asks, cfgs, strict=True)]
    chains = [host_eagle(engine, head, p, c) for p, c in zip(asks, cfgs, strict=True)]
    batch = BatchEngine(engine, BatchConfig(slots=3, max_seq_len=128))
    (steps,) = device_eagles(batch, head, [K], copy_after=2)
    steps.hook.whole_bucket = whole  # type: ignore[attr-defined]
    batcher = ContinuousBatcher(batch, lambda: NgramDrafter(3, 1), K, lookup=steps)
    got = [batcher.submit(p, c) for p, c in zip(asks, cfgs, strict=True)]
    batcher.run()
    assert [r.tokens for r in got] == [one.tokens for one in alone]
    compared = copied = 0
    for request, one, chain in zip(got, alone, chains, strict=True):
        n = next((i for i, d in enumerate(one.stats.draft_tokens) if len(d) < K), len(one.stats.draft_tokens))
        assert request.draft_tokens[:n] == one.stats.draft_tokens[:n]
        compared += n
        copied += one.stats.draft_tokens[:n] != chain.stats.draft_tokens[:n]
    assert compared >= 30 and copied >= 2  # the copies changed what rows drafted


def test_a_row_moved_by_a_release_keeps_its_drafts() -> None:
    """Slot 0's request leaves first; the last row moves into its slot and is loaded there afresh:
    its drafts stay a lone request's."""
    engine, head = _engine(), random_head()
    asks = [p * 2 for p in prompts(3, 96, seed=5)]
    cfgs = [GenerationConfig(max_new_tokens=n, stop_at_eos=False) for n in (10, 40, 40)]
    alone = [host_eagle(engine, head, p, c) for p, c in zip(asks, cfgs, strict=True)]
    batch = BatchEngine(engine, BatchConfig(slots=3, max_seq_len=128))
    (steps,) = device_eagles(batch, head, [0, K])
    batcher = ContinuousBatcher(batch, lambda: NgramDrafter(3, 1), K, lookup=steps)
    got = [batcher.submit(p, c) for p, c in zip(asks, cfgs, strict=True)]
    batcher.run()
    last, one = got[2], alone[2]
    n = next((i for i, d in enumerate(one.stats.draft_tokens) if len(d) < K), len(one.stats.draft_tokens))
    assert last.draft_tokens[:n] == one.stats.draft_tokens[:n] and n > len(got[0].draft_tokens)  # it drafted on after the move
    hook = steps.hook
    assert isinstance(hook, BatchEagle) and hook.moved >= 1 and hook.loaded == len(asks)  # moved with its row, loaded once (admission)
    assert hook.prefilled == 0  # each load read its admission's hidden states


def test_batched_eagle_settings_are_checked() -> None:
    engine = _engine()
    batch = BatchEngine(engine, BatchConfig(slots=2, max_seq_len=64))
    with pytest.raises(LabkitError, match="drafts 1 to 4"):
        BatchEagle(batch, random_head(depth=4), 5)
    with pytest.raises(LabkitError, match="copies after 9"):
        BatchEagle(batch, random_head(depth=4), 3, copy_after=9)
    assert BatchEagle(batch, random_head(depth=4), 6, copy_after=2).depth == 4  # copies fill K columns, chains 4 deep
    with pytest.raises(LabkitError, match="cannot draft K"):
        BatchLookup(batch, 2, hook=BatchEagle(batch, random_head(depth=4), 3))
    assert torch.equal(BatchEagle(batch, random_head(), 2).cols, torch.zeros(2, 2, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
@pytest.mark.parametrize("dtype,copy_after", [("float32", 0), ("bfloat16", 0), ("bfloat16", 2)])
def test_cuda_batched_eagle_steps_replay_captured_with_a_lone_requests_drafts(dtype: str, copy_after: int) -> None:
    """On the GPU: every rows bucket's step captured with its catch-up and chain (the draft layer on
    the fused Triton kernels, rows at their own positions), replayed per chunk; each request its
    plain greedy tokens and, step for step, a lone request's EAGLE drafts (bf16 included: the fused
    kernels keep a row's arithmetic its own), with another drafter captured on the same head in
    between (as `bench batch` builds one per system and size); copy_after 2: eagle-mix's rows, a
    lone eagle-ngram's drafts."""
    from labkit.engine import Engine
    from labkit.models.tiny import tiny_hf_model

    engine = Engine.from_hf(tiny_hf_model("llama", seed=4).cuda(), "cuda", dtype, max_seq_len=256, cuda_graph=True)
    head = random_head()
    asks = [p * 2 for p in prompts(6, 96, seed=11)]
    cfgs = [GenerationConfig(max_new_tokens=24 + 5 * i, stop_at_eos=False) for i in range(len(asks))]
    want = [generate(engine, p, c).tokens for p, c in zip(asks, cfgs, strict=True)]
    alone = [generate(engine, p, c, Speculation(EagleDrafter(engine, head, device_steps=False, lookup_over=copy_after), K))
             for p, c in zip(asks, cfgs, strict=True)]
    batch = BatchEngine(engine, BatchConfig(slots=4, max_seq_len=160, cuda_graph=True))
    (steps,) = device_eagles(batch, head, [K], copy_after)
    assert set(steps.graphs) == set(steps.hook.first_chains) == {1, 2, 4}  # type: ignore[attr-defined]  # (loads' first chains: replays)
    device_eagles(BatchEngine(engine, BatchConfig(slots=2, max_seq_len=220, cuda_graph=True)), head, [K])  # another drafter on the head,
    # captured after these steps with a longer table: the steps above still read theirs (freed, the drafts left a lone request's)
    batcher = ContinuousBatcher(batch, lambda: NgramDrafter(3, 1), K, lookup=steps)
    got = [batcher.submit(p, c) for p, c in zip(asks, cfgs, strict=True)]
    batcher.run()
    assert [r.tokens for r in got] == want
    for request, one in zip(got, alone, strict=True):
        n = next((i for i, d in enumerate(one.stats.draft_tokens) if len(d) < K), len(one.stats.draft_tokens))
        assert request.draft_tokens[:n] == one.stats.draft_tokens[:n] and n >= 5
    hook = steps.hook
    assert isinstance(hook, BatchEagle) and hook.loaded - hook.prefilled == len(asks)  # each new request its admission's hidden states (staged too)
    wide = BatchEagle(BatchEngine(engine, BatchConfig(slots=40, max_seq_len=160, cuda_graph=True)), head, K)  # past 16 rows: scratch for each
    feat = torch.randn(40, head.dims.dim, device="cuda", dtype=wide.drafter.dtype)
    assert wide.drafter.chain(feat, torch.full((40,), 30, device="cuda"), 1, K, cache=wide.cache).shape == (40, K, 1)
    torch.cuda.synchronize()  # an asynchronous fault surfaces here, in the test that made it (H200 at 40a9f07: in the next test's setup)


def test_bench_batch_runs_eagle_device_steps_from_a_head_folder(tiny_folder, tmp_path) -> None:
    """`labkit bench batch --heads FOLDER`: an eagle-device-K system beside the others, its rows
    identical to batch-1 plain greedy; a folder without a head is one clear error, before anything
    runs; with K past the head's depth the chain system drafts at the depth (a K 8 run stopped on
    the H200 after its plain runs), eagle-mix at K."""
    import dataclasses

    from labkit.bench.batch import BatchBenchConfig, _systems, run_batch_bench
    from labkit.config import EngineConfig
    from labkit.engine_build import from_config
    from labkit.models.loading import load_model
    from labkit.specdec.eagle import save_eagle
    from labkit.specdec.heads import fingerprint

    loaded = load_model(str(tiny_folder))
    cpu = EngineConfig(device="cpu", dtype="float32")
    save_eagle(random_head(), tmp_path / "eagle", fingerprint(from_config(loaded, cpu).model.lm_head.weight), {})
    cfg = BatchBenchConfig(model=str(tiny_folder), engine=cpu, sizes=[1, 2], invariant=False, k=2, max_new_tokens=6, requests_per_slot=1,
                           min_requests=3, max_seq_len=128, repeats=1, heads=str(tmp_path / "eagle"), output_dir=None, progress=False)
    rows = [r for r in run_batch_bench(cfg, loaded)["rows"] if r["system"] in ("eagle-device-2", "eagle-device-auto-2")]
    assert [(r["system"], r["batch"]) for r in rows] == [("eagle-device-2", 1), ("eagle-device-auto-2", 1), ("eagle-device-2", 2), ("eagle-device-auto-2", 2)]
    assert all(r["identical_to_batch_1"] == 1.0 == r["identical_to_own_batch_1"] and r["tau"] >= 1.0 for r in rows)
    for r in (r for r in rows if "auto" in r["system"]):  # the controller's steps reported, plain or K alone (a switch between two Ks reloads)
        assert sum(r["k_steps"].values()) > 0 and {int(k) for k, n in r["k_steps"].items() if n} <= {0, 2}
    with pytest.raises(LabkitError, match="holds no EAGLE head"):
        dataclasses.replace(cfg, heads=str(tmp_path / "none")).validate()  # before anything runs
    names = [s.name for s in _systems(dataclasses.replace(cfg, k=6))]  # past the head's depth of 4: the chain at 4, eagle-mix at 6
    assert "eagle-device-4" in names and "eagle-mix-device-6" in names and not any(n.startswith("eagle-device-6") for n in names)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
def test_cuda_plain_steps_captured_before_an_eagle_hook_hand_it_their_hidden_states() -> None:
    """Plain steps captured before the EAGLE hook made the model keep hidden states (as `bench batch`
    captures every step shape first) are captured again: rows back from them catch up from their
    hidden states, not by a prefill (on the H200 such loads took 42-73 ms at one row)."""
    from labkit.engine import Engine
    from labkit.models.tiny import tiny_hf_model

    engine = Engine.from_hf(tiny_hf_model("llama", seed=4).cuda(), "cuda", "float32", max_seq_len=256, cuda_graph=True)
    asks = [p * 2 for p in prompts(2, 96, seed=13)]
    cfgs = [GenerationConfig(max_new_tokens=28, stop_at_eos=False) for _ in asks]
    want = [generate(engine, p, c).tokens for p, c in zip(asks, cfgs, strict=True)]
    batch = BatchEngine(engine, BatchConfig(slots=2, max_seq_len=160, cuda_graph=True))
    batch.capture_graphs([1, K + 1])  # the model keeps no hidden states yet
    (steps,) = device_eagles(batch, random_head(), [K])
    batcher = ContinuousBatcher(batch, lambda: NgramDrafter(3, 1), K, Scripted(K, (0, 0, 0, K), best=K), lookup=steps)  # type: ignore[arg-type]
    got = [batcher.submit(p, c) for p, c in zip(asks, cfgs, strict=True)]
    batcher.run()
    assert [r.tokens for r in got] == want
    hook = steps.hook
    assert isinstance(hook, BatchEagle) and hook.caught_up >= 2 and hook.prefilled == 0, (hook.caught_up, hook.prefilled)


def test_the_padded_catch_ups_warm_up_writes_only_the_draft_caches_headroom() -> None:
    """capture_all runs (or captures) the padded catch-up of each length class once (on the H200 a load that compiled
    a kernel stalled 1.1 s): into slot 0's headroom past every request's positions, so no row's draft cache changes
    below it (on a CPU capture_all does not run it; here directly, eager)."""
    engine, head = _engine(), random_head()
    batch = BatchEngine(engine, BatchConfig(slots=3, max_seq_len=128))
    hook = BatchEagle(batch, head, K, padded=True)
    assert hook.padded is not None and hook.padded.classes == [16, 32, 64, 128, 256, 512]
    gen = torch.Generator().manual_seed(0)
    for buf in (hook.cache.k, hook.cache.v):
        buf.copy_(torch.randn(buf.shape, generator=gen).to(buf.dtype))
    k, v, at = hook.cache.k.clone(), hook.cache.v.clone(), batch.cfg.max_seq_len + 1
    with torch.inference_mode():
        hook.padded.capture_all(at, graphs=False)
    assert torch.equal(hook.cache.k[..., :at, :], k[..., :at, :]) and torch.equal(hook.cache.v[..., :at, :], v[..., :at, :])
    assert torch.equal(hook.cache.k[:, 1:], k[:, 1:])  # other slots untouched
    assert not torch.equal(hook.cache.k[:, 0, :, at:], k[:, 0, :, at:])  # it ran, into slot 0's headroom


@pytest.mark.parametrize("pattern", [(0,) * 15 + (K,), (0,) * 5 + (K,) * 3])
def test_rows_going_plain_and_back_through_releases_never_load_by_a_pass(pattern: tuple[int, ...]) -> None:
    """Requests of ragged lengths through 4 slots, a K controller mostly plain: rows draft, run plain steps, are moved
    by releases, and draft again. However those come in turn, each load catches up from what the request's admission,
    its plain steps and its last chunk left (moved with it: BatchEngine.listen_releases), never a pass over its context
    (on the H200 such passes stalled a run at 64 rows for 1.8 s), and every output stays plain greedy."""
    import random

    engine, head = _engine(), random_head()
    asks = [p * 2 for p in prompts(16, 96, seed=5)]
    rng = random.Random(1)
    cfgs = [GenerationConfig(max_new_tokens=rng.randint(8, 48), stop_at_eos=False) for _ in asks]
    want = [generate(engine, p, c).tokens for p, c in zip(asks, cfgs, strict=True)]
    batch = BatchEngine(engine, BatchConfig(slots=4, max_seq_len=160))
    hook = BatchEagle(batch, head, K)
    batcher = ContinuousBatcher(batch, lambda: NgramDrafter(3, 1), K, Scripted(K, pattern, best=K),  # type: ignore[arg-type]
                                lookup=BatchLookup(batch, K, hook=hook))
    got = [batcher.submit(p, c) for p, c in zip(asks, cfgs, strict=True)]
    batcher.run()
    assert [r.tokens for r in got] == want
    assert hook.moved > 0 and hook.caught_up > 8 and hook.prefilled == 0, (hook.moved, hook.caught_up, hook.prefilled)
