"""EAGLE-lite (labkit/specdec/eagle.py, eagle_drafter.py, eagle_train.py) on tiny models."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from labkit.errors import LabkitError
from labkit.models.kvcache import KVCache
from labkit.specdec.eagle import EagleConfig, EagleDims, EagleHead, load_eagle, random_eagle_head, save_eagle, top_tokens

DIMS = EagleDims(dim=128, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256)


def random_head(dims: EagleDims = DIMS, depth: int = 4, vocab: int = 96, seed: int = 0, ids: torch.Tensor | None = None) -> EagleHead:
    return random_eagle_head(dims, depth, vocab, seed, ids)


@pytest.mark.parametrize("ops_name", ["masked", "reference"])
def test_training_unroll_is_the_chain_inference_runs(ops_name: str) -> None:
    """The training-time test's unrolled depths give, at every anchor, the features the cached
    chain computes at inference (true elements up to the anchor, then its own predictions), in the
    masked PyTorch form and through the fused layer operations' PyTorch twins."""
    from labkit.kernels import layer_reference

    ops = layer_reference if ops_name == "reference" else None
    head = random_head()
    embed = torch.nn.Embedding(96, DIMS.dim)
    T, depth = 12, 3
    torch.manual_seed(1)
    feats, tokens = torch.randn(1, T, DIMS.dim), torch.randint(0, 96, (1, T))
    with torch.no_grad():
        outs = head.unrolled(feats, tokens, embed, depth)  # depth x (1, T, D)
        for c in (0, 4, T - depth - 1):
            cache = KVCache(1, 1, DIMS.n_kv_heads, 32, DIMS.head_dim, dtype=torch.float32, device=torch.device("cpu"))
            cache.k.normal_()  # stale garbage past the anchor: never read
            f = head.forward_cached(feats[:, : c + 1], embed(tokens[:, 1 : c + 2]), torch.arange(c + 1)[None], cache, ops)[:, -1]
            torch.testing.assert_close(f, outs[0][:, c], rtol=1e-4, atol=1e-4)
            for d in range(2, depth + 1):  # the chain feeds its own feature and the true token
                f = head.forward_cached(f[:, None], embed(tokens[:, c + d : c + d + 1]), torch.tensor([[c + d - 1]]), cache, ops)[:, 0]
                torch.testing.assert_close(f, outs[d - 1][:, c], rtol=1e-4, atol=1e-4)


def _engine(seed: int = 4):
    from labkit.engine import Engine
    from labkit.models.tiny import tiny_hf_model

    return Engine.from_hf(tiny_hf_model("llama", seed=seed), "cpu", "float32")


@pytest.mark.parametrize("prompt_len", [5, 40])
def test_eagle_drafts_inside_the_verify_step_as_after_it_and_stays_lossless(prompt_len: int) -> None:
    """Greedy output equals plain greedy; the drafts made inside the verify step (the hook: ragged
    catch-up on the device) are the ones the host-side catch-up makes (timed phases run it)."""
    from labkit.config import GenerationConfig
    from labkit.generate import Speculation, generate
    from labkit.specdec.eagle_drafter import EagleDrafter

    engine = _engine()
    prompt = list(range(3, 3 + prompt_len))
    cfg = GenerationConfig(max_new_tokens=40, stop_at_eos=False)
    want = generate(engine, prompt, cfg).tokens
    drafter = EagleDrafter(engine, random_head())
    fused = generate(engine, prompt, cfg, Speculation(drafter, 3))
    host = generate(engine, prompt, cfg, Speculation(drafter, 3), detailed_metrics=True)
    assert fused.tokens == want and host.tokens == want
    assert fused.stats.draft_tokens == host.stats.draft_tokens and len(fused.stats.draft_tokens) >= 5
    assert sum(fused.stats.accepted_lengths) < sum(map(len, fused.stats.draft_tokens))  # some rejections: ragged rows were met


def test_the_chain_a_verify_drafts_is_as_deep_as_k_asks(monkeypatch) -> None:
    """On the host's steps the verify drafts a chain as deep as the proposal before it asked (a
    draft-layer pass per depth, not the head's whole depth); where the next K asks for more, the
    proposal makes its chain again. Drafts equal the host-side catch-up's, the output plain greedy's."""
    from labkit.config import GenerationConfig
    from labkit.generate import Speculation, generate
    from labkit.specdec.controllers import Controller
    from labkit.specdec.eagle_drafter import EagleDrafter

    class Cycle(Controller):  # K 2, 4, 1, 3, ...: a deeper chain asked after a shallower one
        k_max = 4

        def reset(self) -> None:
            self.i = 0

        def next_k(self) -> int:
            self.i += 1
            return (2, 4, 1, 3)[self.i % 4]

    engine = _engine()
    prompt = list(range(3, 20))
    cfg = GenerationConfig(max_new_tokens=40, stop_at_eos=False)
    want = generate(engine, prompt, cfg).tokens
    drafter = EagleDrafter(engine, random_head(depth=4))
    picks: list[int] = []
    pick = drafter._pick
    monkeypatch.setattr(drafter, "_pick", lambda feat, width=1, ops=None: (picks.append(1), pick(feat, width, ops))[1])
    fixed = generate(engine, prompt, cfg, Speculation(drafter, 2))
    assert fixed.tokens == want and len(picks) <= 2 * len(fixed.stats.draft_tokens)  # a pass per drafted depth, not 4
    cycled = generate(engine, prompt, cfg, Speculation(drafter, 4, controller=Cycle()))
    host = generate(engine, prompt, cfg, Speculation(drafter, 4, controller=Cycle()), detailed_metrics=True)
    assert cycled.tokens == want == host.tokens
    assert cycled.stats.draft_tokens == host.stats.draft_tokens
    assert [len(d) for d in cycled.stats.draft_tokens[:8]] == [4, 1, 3, 2, 4, 1, 3, 2]


def test_a_prompt_in_several_passes_gives_the_drafter_every_position(monkeypatch) -> None:
    """A prompt longer than one pass (PREFILL_CHUNK) is gathered: the draft cache gets every
    prompt element, so the drafts are those of the prompt in one pass (fresh drafters)."""
    import labkit.engine
    from labkit.config import GenerationConfig
    from labkit.generate import Speculation, generate
    from labkit.specdec.eagle_drafter import EagleDrafter

    prompt, cfg = list(range(3, 43)), GenerationConfig(max_new_tokens=20, stop_at_eos=False)
    whole = generate(engine := _engine(), prompt, cfg, Speculation(EagleDrafter(engine, random_head()), 3))
    monkeypatch.setattr(labkit.engine, "PREFILL_CHUNK", 16)
    chunked = generate(engine := _engine(), prompt, cfg, Speculation(EagleDrafter(engine, random_head()), 3))
    assert chunked.tokens == whole.tokens and chunked.stats.draft_tokens == whole.stats.draft_tokens


def test_a_long_catch_up_runs_the_draft_layer_in_passes_with_the_same_drafts() -> None:
    """The draft layer takes a long prompt in passes of pass_t elements (one fused attention pass
    covers COUNTER_ROWS rows: a 4,096-token prompt overran it on the H200); the drafts are those of
    one pass."""
    from labkit.config import GenerationConfig
    from labkit.generate import Speculation, generate
    from labkit.models.kvcache import COUNTER_ROWS
    from labkit.specdec.eagle_drafter import EagleDrafter

    prompt, cfg = list(range(3, 43)), GenerationConfig(max_new_tokens=20, stop_at_eos=False)
    whole = generate(engine := _engine(), prompt, cfg, Speculation(drafter := EagleDrafter(engine, random_head()), 3))
    assert drafter.pass_t * (DIMS.n_heads // DIMS.n_kv_heads) <= COUNTER_ROWS and drafter.pass_t > len(prompt)
    drafter = EagleDrafter(engine := _engine(), random_head())
    drafter.pass_t = 7
    passes = generate(engine, prompt, cfg, Speculation(drafter, 3))
    assert passes.tokens == whole.tokens and passes.stats.draft_tokens == whole.stats.draft_tokens


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton's kernels run on the CPU under TRITON_INTERPRET=1")
def test_eagle_through_the_fused_triton_layers_drafts_as_its_pytorch_twins() -> None:
    """A target on the fused Triton layers runs the draft layer through them too (the five fused
    operations, attention up to each query's position): the drafts are the PyTorch twins' and
    the output plain greedy's."""
    from labkit.config import GenerationConfig
    from labkit.engine import Engine
    from labkit.generate import Speculation, generate
    from labkit.kernels import layer_reference, layer_triton
    from labkit.models.tiny import tiny_hf_model
    from labkit.specdec.eagle_drafter import EagleDrafter

    hf = tiny_hf_model("llama", seed=4)
    fused = Engine.from_hf(hf, "cpu", "float32", layer_kernels="triton")
    assert EagleDrafter(fused, random_head()).ops is layer_triton  # the target's kernels, the draft layer's too
    # the draft layer alone interpreted (the target's layers interpreted too would take a minute)
    engine = Engine.from_hf(hf, "cpu", "float32")
    prompt, cfg = list(range(3, 21)), GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    results = {}
    for ops in (layer_triton, layer_reference):
        drafter = EagleDrafter(engine, random_head(depth=2))
        assert drafter.ops is layer_reference  # a CPU target's default
        drafter.ops = ops
        results[ops.__name__] = generate(engine, prompt, cfg, Speculation(drafter, 2))
    triton, reference = results[layer_triton.__name__], results[layer_reference.__name__]
    assert triton.tokens == reference.tokens == generate(engine, prompt, cfg).tokens
    assert triton.stats.draft_tokens == reference.stats.draft_tokens and len(triton.stats.draft_tokens) >= 3


@pytest.mark.parametrize("ops_name", ["layer_reference", "layer_triton", "torch"])
def test_the_draft_layers_window_leaves_older_elements_unread(ops_name: str, monkeypatch) -> None:
    """The draft layer attends `window` positions back, so a catch-up starts there: a 40-token
    prompt's first proposal runs 6 elements, not 40, and the drafts are those of a drafter whose
    catch-ups run every element (the ones before the window are never read), in the PyTorch twins
    and in the Triton kernels (interpreted on a CPU), and as PyTorch ops over the whole cache with a
    mask (a GPU without Triton); the output is plain greedy's."""
    import importlib

    from labkit.config import GenerationConfig
    from labkit.generate import Speculation, generate
    from labkit.specdec.eagle_drafter import EagleDrafter

    if ops_name == "layer_triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's kernels run on the CPU under TRITON_INTERPRET=1")
    ops = None if ops_name == "torch" else importlib.import_module(f"labkit.kernels.{ops_name}")
    engine = _engine()
    prompt, cfg = list(range(3, 43)), GenerationConfig(max_new_tokens=12, stop_at_eos=False)
    want = generate(engine, prompt, cfg).tokens
    runs = {}
    for windowed in (True, False):
        drafter = EagleDrafter(engine, random_head(depth=2), device_steps=False, window=6)
        drafter.ops = ops
        if not windowed:
            monkeypatch.setattr(drafter, "first_needed", lambda L: 0)  # every element caught up
        rows: list[int] = []
        elements = drafter.elements
        monkeypatch.setattr(drafter, "elements", lambda feats, *a, elements=elements, rows=rows, **kw: (rows.append(feats.shape[1]), elements(feats, *a, **kw))[1])
        out = generate(engine, prompt, cfg, Speculation(drafter, 2))
        runs[windowed] = (out, rows)
    (short, short_rows), (full, full_rows) = runs[True], runs[False]
    assert short.tokens == want == full.tokens
    assert short.stats.draft_tokens == full.stats.draft_tokens and len(short.stats.draft_tokens) >= 3
    assert short_rows[0] == 6 and full_rows[0] == 40  # the first proposal's catch-up: the window's elements, or all


def test_eagle_learns_the_targets_continuation_and_its_draft_vocabulary() -> None:
    """Trained on texts a tiny target wrote, the head guesses its held-out greedy tokens better
    than untrained, at depth 1 and 2, and drafts only from its reduced vocabulary."""
    from labkit.config import GenerationConfig
    from labkit.eagle_train import EagleTrainConfig, expected_accepted, train_eagle
    from labkit.generate import Speculation, generate
    from labkit.heads_train import self_written_texts
    from labkit.models.tiny import tiny_hf_model
    from labkit.specdec.eagle_drafter import EagleDrafter

    hf = tiny_hf_model("llama", seed=3)
    from labkit.engine import Engine

    engine = Engine.from_hf(hf, "cpu", "float32")
    cfg = EagleTrainConfig(eagle=EagleConfig(depth=3, draft_vocab=48, train_depth=2), texts=40, sampled_tokens=3, greedy_tokens=32,
                           steps=150, batch_size=4, lr=3e-3, held_out=0.2, progress=False)
    texts = self_written_texts(engine, 1, cfg)
    head, report = train_eagle(engine, texts, cfg)
    assert report["draft_vocab"] <= 48 and 0 < report["held_out_vocab_coverage"] <= 1
    before, after = report["held_out_top1_before"], report["held_out_top1"]
    # a random model's continuation is hard to guess (chance: 1 in 96; 48 draft tokens hold 66% of the
    # held-out labels); measured 1.6% -> 12% at depth 1 and 2 (the head memorises its 32 texts)
    assert after[0] > before[0] + 0.06 and after[1] > before[1] + 0.06, report
    assert expected_accepted(after) > expected_accepted(before)
    drafter = EagleDrafter(engine, head)
    prompt = texts[0][0][: texts[0][1]]
    gen = GenerationConfig(max_new_tokens=30, stop_at_eos=False)
    result = generate(engine, prompt, gen, Speculation(drafter, 3))
    assert result.tokens == generate(engine, prompt, gen).tokens
    allowed = set(head.vocab_ids.tolist())
    assert all(t in allowed for d in result.stats.draft_tokens for t in d)
    assert sum(result.stats.accepted_lengths) > 0
    # device steps (CHUNK steps per host read): the same steps, accepted drafts and all
    steps = generate(engine, prompt, gen, Speculation(EagleDrafter(engine, head, device_steps=True), 3))
    n = next(i for i, d in enumerate(result.stats.draft_tokens) if len(d) < 3)
    assert steps.tokens == result.tokens and steps.stats.draft_tokens[:n] == result.stats.draft_tokens[:n]
    assert steps.stats.accepted_lengths[:n] == result.stats.accepted_lengths[:n] and sum(result.stats.accepted_lengths[:n]) > 0
    # token trees: the chain with the next-best candidates as leaf siblings at every depth
    tree = generate(engine, prompt, gen, Speculation(EagleDrafter(engine, head, width=3), 3))
    assert tree.tokens == result.tokens and all(len(d) == 9 for d in tree.stats.draft_tokens[:-2])
    chain_tau = len(result.tokens) / len(result.stats.accepted_lengths)
    assert len(tree.tokens) / len(tree.stats.accepted_lengths) >= chain_tau, (tree.stats.accepted_lengths, result.stats.accepted_lengths)


def test_top_tokens_are_the_most_written_greedy_ones() -> None:
    texts = [([9, 9, 9, 5, 5, 7], 3), ([1, 5, 7, 7], 1)]  # greedy parts: [5, 5, 7] and [5, 7, 7]
    assert top_tokens(texts, 2, 10).tolist() == [5, 7]
    assert top_tokens(texts, 5, 10).tolist() == [5, 7]  # never-written tokens left out
    assert top_tokens(texts, 0, 10).tolist() == list(range(10))


def test_eagle_files_round_trip_and_refuse_another_target(tmp_path) -> None:
    from labkit.specdec.heads import fingerprint

    head = random_head(ids=torch.tensor([3, 5, 8]))
    lm = torch.randn(96, DIMS.dim)
    save_eagle(head, tmp_path / "e", fingerprint(lm), {"note": 1})
    back = load_eagle(tmp_path / "e", fingerprint(lm))
    assert back.vocab_ids.tolist() == [3, 5, 8] and back.cfg == head.cfg
    for a, b in zip(head.state_dict().values(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(LabkitError, match="another target"):
        load_eagle(tmp_path / "e", fingerprint(torch.randn(96, DIMS.dim)))
    with pytest.raises(LabkitError, match="holds no EAGLE head"):
        load_eagle(tmp_path / "none", fingerprint(lm))
    (tmp_path / "e" / "eagle.json").write_text("{")
    with pytest.raises(LabkitError, match="not an EAGLE description"):
        load_eagle(tmp_path / "e", fingerprint(lm))


def test_a_half_precision_head_keeps_its_positions() -> None:
    """Cast for a bf16 target, the head's rotary tables stay fp32: a bf16 table turns a position
    of a few hundred by radians, and the drafts stop matching what training taught."""
    head = random_head()
    ref = [t.clone() for t in head.rope_table(600, torch.device("cpu"))]
    head.cast(torch.device("cpu"), torch.bfloat16)
    cos, sin = head.rope_table(600, torch.device("cpu"))
    assert cos.dtype == torch.float32 and torch.equal(cos[:600], ref[0][:600]) and torch.equal(sin[:600], ref[1][:600])
    assert head.fc.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("lookup_over", [0, 2])
def test_eagle_drafts_for_a_bf16_cpu_target(lookup_over: int) -> None:
    """A bf16 target on a CPU: the draft layer's PyTorch operations take bf16 rows with fp32 rotary
    tables and write the bf16 draft cache in the rows' dtype, as the Triton kernels store (they
    raised a dtype error there: a bf16 cache written with the fp32 rotated keys), for chains and
    eagle-ngram. (Token identity is not promised here: a bf16 verify of several rows through the
    PyTorch layers is not a decode step's bits, docs/speculation.md.)"""
    from labkit.config import GenerationConfig
    from labkit.engine import Engine
    from labkit.generate import Speculation, generate
    from labkit.kernels import layer_reference as ref
    from labkit.models.tiny import tiny_hf_model
    from labkit.specdec.eagle_drafter import EagleDrafter

    engine = Engine.from_hf(tiny_hf_model("llama", seed=4), "cpu", "bfloat16")
    prompt = [5, 9, 11, 5, 9, 11, 5, 9, 14, 20, 5, 9, 11]
    cfg = GenerationConfig(max_new_tokens=24, stop_at_eos=False)
    drafter = EagleDrafter(engine, random_head(), lookup_over=lookup_over)
    out = generate(engine, prompt, cfg, Speculation(drafter, 3))
    assert drafter.dtype == torch.bfloat16 and len(out.tokens) == 24 and len(out.stats.draft_tokens) >= 3
    assert out.tokens[0] == generate(engine, prompt, cfg).tokens[0]  # the prompt's pass is plain's
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 32, generator=g), torch.randn(4 * 8 + 2 * 2 * 8, 32, generator=g)  # 4 query heads, 2 kv heads, D 8
    cos, sin = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    caches = {dt: (torch.zeros(1, 2, 16, 8, dtype=dt), torch.zeros(1, 2, 16, 8, dtype=dt)) for dt in (torch.float32, torch.bfloat16)}
    q = {dt: ref.norm_qkv_rope(x.to(dt), torch.ones(32, dtype=dt), 1e-5, w.to(dt), None, cos, sin, torch.tensor([2, 3, 4]), *caches[dt], 4)
         for dt in caches}
    assert q[torch.bfloat16].dtype == torch.bfloat16 and q[torch.float32].dtype == torch.float32
    torch.testing.assert_close(q[torch.bfloat16].float(), q[torch.float32], rtol=0.05, atol=0.3)
    torch.testing.assert_close(caches[torch.bfloat16][0].float(), caches[torch.float32][0], rtol=0.05, atol=0.3)


def test_a_heads_rotary_tables_outlive_every_drafter_built_on_it() -> None:
    """Captured steps read the rotary tables by address, so a table a drafter drafted with stays
    where it was: another drafter's cast of the same head keeps it, and a longer table asked for
    later leaves the shorter one alive (each drafter built per system and size in `bench batch`
    on one head; freed and reused, the first drafters' graphs read other tensors)."""
    import gc
    import weakref

    from labkit.specdec.eagle_drafter import EagleDrafter

    engine, head = _engine(), random_head()
    EagleDrafter(engine, head)
    cpu = torch.device("cpu")
    first = head.rope_table(300, cpu)
    EagleDrafter(engine, head)  # casts the head again
    assert head.rope_table(300, cpu)[0] is first[0] and head.rope_table(300, cpu)[1] is first[1]
    alive = [weakref.ref(t) for t in first]
    longer = head.rope_table(first[0].shape[0] + 500, cpu)
    assert longer[0].shape[0] > first[0].shape[0] and torch.equal(longer[0][:300], first[0][:300])
    del first
    gc.collect()
    assert all(ref() is not None for ref in alive)


def test_eagle_training_settings_are_checked() -> None:
    from labkit.eagle_train import EagleTrainConfig

    with pytest.raises(LabkitError, match="feature_weight"):
        EagleTrainConfig(feature_weight=-1).validate()
    with pytest.raises(LabkitError, match="greedy_tokens >= 5"):
        EagleTrainConfig(eagle=EagleConfig(train_depth=3), greedy_tokens=4).validate()
    EagleTrainConfig(eagle=EagleConfig(train_depth=3), greedy_tokens=5).validate()


def test_the_fit_ends_at_its_time_with_the_learning_rate_annealed(monkeypatch) -> None:
    """With a time for the fit shorter than its steps take, it stops in time, and the learning-rate schedule
    (warm-up, cosine to a tenth) follows the time, not the steps; a run whose time is gone before the fit says so."""
    import random

    from labkit import eagle_train
    from labkit.heads_train import Deadline

    w = torch.nn.Parameter(torch.ones(3))
    head = torch.nn.Module()
    head.w = w
    train = [(torch.randn(6, 3), [1, 2, 3, 4, 5, 6], 2) for _ in range(4)]
    shares: list[float] = []
    real = eagle_train.lr_at
    monkeypatch.setattr(eagle_train, "lr_at", lambda share, lr: shares.append(share) or real(share, lr))
    clock = iter(range(10_000)).__next__  # one second a reading
    cfg = eagle_train.EagleTrainConfig(steps=1000, batch_size=2, progress=False)
    losses = eagle_train._fit(head, lambda batch: (batch.feats.sum(-1) * w.sum()).mean(), train, cfg, random.Random(0), 20.0, clock)
    assert 15 <= len(losses) <= 21 and len(shares) == len(losses)  # ~20 s of one-second steps, not 1,000 steps
    assert shares == sorted(shares) and shares[-1] > 0.9  # the whole schedule, by the time
    assert real(0.025, 1.0) == pytest.approx(0.5) and real(0.05, 1.0) == pytest.approx(1.0) and real(1.0, 1.0) == pytest.approx(0.1)
    t = [0.0]
    deadline = Deadline(60, lambda: t[0])
    t[0] = 40.0
    assert deadline.fit_seconds(5.0, None) == pytest.approx(15.0)  # what is left but the held-out check after it
    t[0] = 58.0
    with pytest.raises(LabkitError, match=r"time limit \(60 s\) passed before training; the texts are kept in t.json"):
        deadline.fit_seconds(5.0, "t.json")


def test_a_padded_training_batch_counts_each_text_as_alone() -> None:
    """Texts of different lengths in one padded pass: per depth, the hits and labels seen are the
    sums of each text's own, and padding past a text's end changes neither its loss nor its counts
    (no label, feature or attention from beyond a text's length)."""
    from labkit.eagle_train import EagleTrainConfig, TextBatch, eagle_loss_counts
    from labkit.specdec.eagle import vocab_index

    torch.manual_seed(2)
    head = random_head(vocab=96, ids=torch.arange(60))
    embed = torch.nn.Embedding(96, DIMS.dim)
    index = vocab_index(head.vocab_ids, 96)
    shapes = ((14, 3), (9, 2), (20, 6))  # (length, first greedy position)
    texts = [(torch.randn(T, DIMS.dim), torch.randint(0, 4, (T,)).tolist(), first) for T, first in shapes]
    cfg = EagleTrainConfig(eagle=EagleConfig(depth=3, draft_vocab=60, train_depth=3))

    def counts(batch, weight):
        return eagle_loss_counts(head, batch, embed, weight, index, 3, cfg)

    with torch.no_grad():
        blind = torch.zeros(60, DIMS.dim)  # every draft is row 0 (token 0): a label 0 is a hit
        _, hits, seen = counts(TextBatch.of(texts), blind)
        alone = [counts(TextBatch.of([t]), blind) for t in texts]
        assert torch.equal(seen, sum(a[2] for a in alone)) and torch.equal(hits, sum(a[1] for a in alone))
        assert seen.tolist() == [sum(T - max(first, d + 1) for T, first in shapes) for d in range(1, 4)]
        assert hits.tolist() == [sum(t[max(f, d + 1):].count(0) for _, t, f in texts) for d in range(1, 4)] and hits.sum() > 0
        weight = torch.randn(60, DIMS.dim)
        want = counts(TextBatch.of([texts[1]]), weight)
        padded = TextBatch.of([texts[1]])
        padded.feats = torch.cat([padded.feats, torch.randn(1, 7, DIMS.dim)], dim=1)
        padded.tokens = torch.cat([padded.tokens, torch.randint(0, 96, (1, 7))], dim=1)
        got = counts(padded, weight)
        assert torch.allclose(want[0], got[0], atol=1e-6) and torch.equal(want[1], got[1]) and torch.equal(want[2], got[2])


def test_features_of_a_batch_of_texts_are_each_texts_own() -> None:
    """A features engine of batch B prefills B right-padded texts at once: each text's features
    are those of its own batch-1 prefill (the padding after it never reaches it)."""
    from labkit.eagle_train import engine_features
    from labkit.engine import Engine
    from labkit.models.tiny import tiny_hf_model

    hf = tiny_hf_model("llama", seed=3)
    texts = [list(range(3, 3 + n)) for n in (7, 19, 12, 30, 5)]
    one = engine_features(Engine.from_hf(hf, "cpu", "float32"), texts)
    batched = engine_features(Engine.from_hf(hf, "cpu", "float32", batch_size=3), texts)
    assert [f.shape[0] for f in batched] == [len(t) for t in texts]
    for a, b in zip(one, batched, strict=True):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("prompt_len", [5, 40])
def test_eagle_device_steps_are_the_host_steps(prompt_len: int) -> None:
    """EAGLE chains in device steps (CHUNK greedy steps per host read, each verifying the chain the
    step before drafted inside its verify): plain greedy's tokens, and step for step the drafts
    of the host loop that reads every verdict."""
    from labkit.config import GenerationConfig
    from labkit.generate import Speculation, generate
    from labkit.specdec.eagle_drafter import EagleDrafter

    engine = _engine()
    prompt = list(range(3, 3 + prompt_len))
    cfg = GenerationConfig(max_new_tokens=48, stop_at_eos=False)
    want = generate(engine, prompt, cfg).tokens
    host = generate(engine, prompt, cfg, Speculation(EagleDrafter(engine, random_head(), device_steps=False), 3))
    steps = generate(engine, prompt, cfg, Speculation(drafter := EagleDrafter(engine, random_head(), device_steps=True), 3))
    assert drafter.device_steps is drafter and any(key[0] == "eagle-steps" for key in engine.graphs.keys())
    assert host.tokens == want and steps.tokens == want
    # the host drafts fewer near the token budget; device steps run at the full K there (one captured width)
    n = next(i for i, d in enumerate(host.stats.draft_tokens) if len(d) < 3)
    assert steps.stats.draft_tokens[:n] == host.stats.draft_tokens[:n] and n >= 8
    assert steps.stats.accepted_lengths[:n] == host.stats.accepted_lengths[:n]  # a random head: rejections (a trained one: below)


def test_device_steps_draft_chains_as_deep_as_their_k(monkeypatch) -> None:
    """Device steps of width K draft K deep inside each verify (one draft-layer pass and pick per
    depth), not the head's whole depth, whatever the host's path asked before (K=2 there)."""
    from labkit.config import GenerationConfig
    from labkit.generate import Speculation, generate
    from labkit.specdec.eagle_drafter import EagleDrafter

    engine = _engine()
    prompt = list(range(3, 20))
    cfg = GenerationConfig(max_new_tokens=30, stop_at_eos=False)
    want = generate(engine, prompt, cfg).tokens
    drafter = EagleDrafter(engine, random_head(depth=4), device_steps=True)
    assert generate(engine, prompt, cfg, Speculation(drafter, 2), detailed_metrics=True).tokens == want  # timed phases: the host's steps
    assert drafter.chain_depth == 2
    picks: list[int] = []
    pick = drafter._pick
    monkeypatch.setattr(drafter, "_pick", lambda feat, width=1, ops=None: (picks.append(1), pick(feat, width, ops))[1])
    out = generate(engine, prompt, cfg, Speculation(drafter, 3))
    assert out.tokens == want and any(key[0] == "eagle-steps" for key in engine.graphs.keys())
    steps = len(out.stats.draft_tokens)
    assert all(len(d) == 3 for d in out.stats.draft_tokens[:-1])
    assert 3 * steps <= len(picks) <= 3 * (steps + 1)  # a chain per step (and the first proposal's), 3 deep, not 4


def test_device_steps_take_a_plain_step_where_the_controller_asks_for_no_draft() -> None:
    """A calibrated cost-aware controller may answer K=0 (no draft pays): device speculation then
    runs a plain step, and the output stays plain greedy's."""
    from labkit.config import GenerationConfig
    from labkit.generate import Speculation, generate
    from labkit.specdec.controllers import CostAware
    from labkit.specdec.eagle_drafter import EagleDrafter

    engine = _engine()
    prompt = list(range(3, 20))
    cfg = GenerationConfig(max_new_tokens=30, stop_at_eos=False)
    want = generate(engine, prompt, cfg).tokens
    controller = CostAware(3, alpha_prior=0.0)
    controller.calibrate({k: 1.0 + 0.5 * k for k in range(4)})  # a draft token costs half a step: with alpha 0, K=0 wins
    out = generate(engine, prompt, cfg, Speculation(EagleDrafter(engine, random_head(), device_steps=True), 3, controller=controller))
    assert out.tokens == want
    assert out.stats.target_steps > len(out.stats.k_trace) > 0  # plain steps, and probes that drafted


def log_chunks(monkeypatch) -> list:
    """Every chunk EagleDrafter's device steps run from now: (context, copy steps?, its steps)."""
    from labkit.specdec.eagle_drafter import EagleDrafter

    chunks = []
    run_steps = EagleDrafter.run_steps

    def logged(self, context, k, m, eos_mask, eos_until):
        copying = self.copying
        out = run_steps(self, context, k, m, eos_mask, eos_until)
        chunks.append((list(context), copying, out))
        return out

    monkeypatch.setattr(EagleDrafter, "run_steps", logged)
    return chunks


def test_eagle_ngram_verifies_lookups_copy_after_a_match_and_the_chain_elsewhere(monkeypatch) -> None:
    """eagle-ngram: on the host, a step whose context ends in an n-gram seen before (n >= lookup_over;
    1 here, since a random tiny model seldom repeats itself longer) verifies prompt lookup's copy,
    every other step EAGLE's chain; in device steps chunks of copy steps (lookup's COPY_K-token
    drafts) come where they rate faster (test_copy_or_chain.py). Both give plain greedy's tokens."""
    from labkit.config import GenerationConfig
    from labkit.generate import Speculation, generate
    from labkit.specdec.eagle_drafter import COPY_K, EagleDrafter
    from labkit.specdec.lookup import latest_match, lookup_reference

    engine = _engine()
    prompt = [5, 6, 7, 8, 9, 10, 11] * 3 + [40, 41, 5, 6]  # copies to find, and stretches with none
    cfg = GenerationConfig(max_new_tokens=60, stop_at_eos=False)
    want = generate(engine, prompt, cfg).tokens
    host = generate(engine, prompt, cfg, Speculation(drafter := EagleDrafter(engine, random_head(), device_steps=False, lookup_over=1), 3))
    assert host.tokens == want and drafter.name.endswith("+ngram1")
    kinds, at = [], 1  # the prefill made the first token
    for draft, accepted in zip(host.stats.draft_tokens, host.stats.accepted_lengths, strict=True):
        context = prompt + want[:at]
        kinds.append(latest_match(context, 3, 1) is not None)
        if draft:  # (none at the budget's last token)
            assert (draft == lookup_reference(context, len(draft))) == kinds[-1], (at, draft)  # else a random head's chain
        at += accepted + 1
    assert any(kinds) and not all(kinds)  # both kinds of step were met
    eagle = generate(engine, prompt, cfg, Speculation(EagleDrafter(engine, random_head(), device_steps=False), 3)).stats
    assert host.stats.draft_tokens != eagle.draft_tokens  # the copies changed what was verified

    chunks = log_chunks(monkeypatch)
    steps = generate(engine, prompt, cfg, Speculation(EagleDrafter(engine, random_head(), device_steps=True, lookup_over=1), 3))
    assert steps.tokens == want
    for context, copying, out in chunks:
        ctx = list(context)
        for draft, new in out:
            if copying:
                assert len(draft) == COPY_K and draft == lookup_reference(ctx, COPY_K)
            ctx += new
    assert {c for _, c, _ in chunks} == {False, True}


def test_a_plain_step_after_copy_steps_leaves_the_chain_a_fresh_drafter_makes(monkeypatch) -> None:
    """Copy steps, then a plain step (the controller asked for no draft), then chain steps: the
    catch-up takes the copy steps' span from the hidden states they kept and the plain step's
    position from its own pass (the copy steps' last kept row there is a rejected draft's), so the
    first chain is the one a fresh drafter makes from the whole context."""
    from labkit.config import GenerationConfig
    from labkit.generate import Speculation, generate
    from labkit.specdec.controllers import Controller
    from labkit.specdec.eagle_drafter import EagleDrafter

    class Cycle(Controller):  # chain chunk, copy chunk, plain step, chain chunks
        k_max = 3

        def reset(self) -> None:
            self.ks = iter([3, 3, 0] + [3] * 40)

        def next_k(self) -> int:
            return next(self.ks)

    engine = _engine()
    prompt = [5, 6, 7, 8, 9, 10, 11] * 3 + [40, 41, 5, 6]
    cfg = GenerationConfig(max_new_tokens=60, stop_at_eos=False)
    want = generate(engine, prompt, cfg).tokens
    kinds = iter([True, False] + [False] * 40)  # after the first chunk: copy steps, then chains
    monkeypatch.setattr(EagleDrafter, "next_copying", lambda self, *chunk: next(kinds))
    chunks = log_chunks(monkeypatch)
    got = generate(engine, prompt, cfg, Speculation(EagleDrafter(engine, random_head(), device_steps=True, lookup_over=3), 3,
                                                   controller=Cycle()))
    assert got.tokens == want
    assert [c for _, c, _ in chunks[:3]] == [False, True, False]
    context_a, _, out_a = chunks[1]
    context_c = chunks[2][0]
    assert len(context_c) == len(context_a) + sum(len(new) for _, new in out_a) + 1  # one plain token between
    fresh = EagleDrafter(engine, random_head(), device_steps=False)
    engine.reset()
    engine.prefill(torch.tensor([context_c[:-1]]))
    fresh.start(context_c, len(context_c) + 8)
    assert chunks[2][2][0][0] == fresh.propose(context_c, 3, GenerationConfig(), None).tokens


def test_eagle_ngram_on_a_cpu_drafts_chains_only_where_it_takes_no_copy(monkeypatch) -> None:
    """On a CPU eagle-ngram's verify only catches the draft cache up (its hook drafts no chain): the
    next proposal drafts a chain where the context ends in no match, and a copy step runs no
    draft-layer pass of a chain. The drafts are those of the verify that drafts a chain every step
    (the same elements, the same chains), the output plain greedy's, with fewer picks."""
    from labkit.config import GenerationConfig
    from labkit.generate import Speculation, generate
    from labkit.specdec.eagle_drafter import EagleDrafter
    from labkit.specdec.eagle_hooks import CatchUpOnly
    from labkit.specdec.lookup import latest_match

    engine = _engine()
    prompt = [5, 6, 7, 8, 9, 10, 11] * 3 + [40, 41, 5, 6]
    cfg = GenerationConfig(max_new_tokens=60, stop_at_eos=False)
    want = generate(engine, prompt, cfg).tokens
    runs = {}
    for catch_up_only in (True, False):
        drafter = EagleDrafter(engine, random_head(), device_steps=False, lookup_over=1)  # 1-grams: copies this tiny target meets
        assert isinstance(drafter.verify_hook, CatchUpOnly)  # a CPU target's
        if not catch_up_only:
            drafter.verify_hook = drafter  # the verify drafts the chain, as on a GPU
        picks: list[int] = []
        pick = drafter._pick
        monkeypatch.setattr(drafter, "_pick", lambda feat, width=1, ops=None, pick=pick, picks=picks: (picks.append(1), pick(feat, width, ops))[1])
        out = generate(engine, prompt, cfg, Speculation(drafter, 3))
        runs[catch_up_only] = (out, len(picks))
    (lean, lean_picks), (full, full_picks) = runs[True], runs[False]
    assert lean.tokens == want == full.tokens
    assert lean.stats.draft_tokens == full.stats.draft_tokens and lean.stats.accepted_lengths == full.stats.accepted_lengths
    at, copies = 1, 0  # copy steps: where the context ends in a 1-gram seen before (the prefill made the first token)
    for accepted in lean.stats.accepted_lengths:
        copies += latest_match(prompt + want[:at], 3, 1) is not None
        at += accepted + 1
    assert copies >= 4 and full_picks - lean_picks >= 3 * (copies - 1)  # no chain for a copy step (the last: cut by the budget)


def test_eagle_ngram_settings_are_checked() -> None:
    from labkit.specdec.eagle_drafter import EagleDrafter
    from labkit.specdec.eagle_tree import DynamicTreeConfig

    engine = _engine()
    for kwargs in ({"lookup_over": 4}, {"lookup_over": -1}, {"lookup_over": 2, "width": 2},
                   {"lookup_over": 2, "tree": DynamicTreeConfig.square(2, 2)}):
        with pytest.raises(LabkitError, match="eagle-ngram"):
            EagleDrafter(engine, random_head(), **kwargs)


@pytest.mark.parametrize("pattern", [(False, True), (False, True, True)])  # chunks: chain, copy (, copy), ...
def test_eagle_ngram_copy_steps_keep_the_draft_cache_true(monkeypatch, pattern: tuple[bool, ...]) -> None:
    """Device steps whose chunks alternate copy and chain steps: plain greedy's tokens; each copy
    step verifies lookup's K-token copy; the chain that follows copy steps is the one a fresh drafter
    makes from the whole context (the hidden states the copy steps kept make every element of the
    draft cache true when the chain catches up over their span)."""
    from labkit.config import GenerationConfig
    from labkit.generate import Speculation, generate
    from labkit.specdec.eagle_drafter import EagleDrafter
    from labkit.specdec.lookup import lookup_reference

    engine = _engine()
    prompt = [5, 6, 7, 8, 9, 10, 11] * 3 + [40, 41, 5, 6]
    cfg = GenerationConfig(max_new_tokens=60, stop_at_eos=False)
    want = generate(engine, prompt, cfg).tokens
    kinds = itertools.cycle(pattern[1:] + pattern[:1])  # what each chunk after the first runs
    monkeypatch.setattr(EagleDrafter, "next_copying", lambda self, *chunk: next(kinds))
    chunks = log_chunks(monkeypatch)
    got = generate(engine, prompt, cfg, Speculation(EagleDrafter(engine, random_head(), device_steps=True, lookup_over=3), 3))
    assert got.tokens == want
    assert [c for _, c, _ in chunks][: 2 * len(pattern)] == list(pattern) * 2
    checked = 0
    for i, (context, copying, out) in enumerate(chunks):
        ctx = list(context)
        for draft, new in out:
            if copying:
                assert draft == lookup_reference(ctx, len(draft)), (i, draft)
            ctx += new
        if copying and i + 1 < len(chunks) and not chunks[i + 1][1]:  # the next chain chunk's first chain, against a fresh drafter's
            nxt = chunks[i + 1][0]
            fresh = EagleDrafter(engine, random_head(), device_steps=False)
            engine.reset()
            engine.prefill(torch.tensor([nxt[:-1]]))
            fresh.start(nxt, len(nxt) + 8)
            assert chunks[i + 1][2][0][0] == fresh.propose(nxt, 3, GenerationConfig(), None).tokens, i
            checked += 1
    assert checked >= 2
