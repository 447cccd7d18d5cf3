"""The CPU layer operations (kernels/cpu_layer.c through labkit/kernels/layer_cpu.py) against their
PyTorch reference, op by op and through the engine: tiny Llama-family models whose linears are
random GGUF blocks (their dense weights the same values), every family the fused layers take
(GQA, tied and untied heads, biases, a sliding window)."""

import pytest
import torch

from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.engine_choices import cpu_layers_unusable
from labkit.generate import generate
from labkit.kernels import cpu_quant, layer_reference
from labkit.kernels.layer_cpu import CpuLayerOps
from labkit.models.gguf_weights import QuantLinear, QuantWeight
from labkit.models.tiny import tiny_hf_model
from tests.native.build import TARGETS, build_and_run
from tests.test_kernels import half

pytestmark = pytest.mark.skipif(not cpu_quant.available()[0], reason=f"cpu_quant: {cpu_quant.available()[1]}")


def random_blocks(N: int, K: int, kind: str, gen: torch.Generator) -> QuantWeight:  # scales float16 values, as a GGUF's
    if kind == "q4_1":
        return QuantWeight("q4_1", torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen),
                           half(torch.rand(N, K // 32, generator=gen) * 0.05 + 1e-3), half(-torch.rand(N, K // 32, generator=gen) * 0.3))
    return QuantWeight("q8_0", torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen), half(torch.rand(N, K // 32, generator=gen) * 0.02 + 1e-4), None)


def block_engine(arch: str, seed: int = 0) -> Engine:
    """A tiny engine whose every linear reads random blocks (the head Q8_0, the rest Q4_1), its
    dense weights overwritten with the same values, reading the blocks."""
    engine = Engine.from_hf(tiny_hf_model(arch, seed=seed), "cpu", "float32")
    gen = torch.Generator().manual_seed(seed)
    model = engine.model
    owners = [(model, "lm_head")] + [(block, name) for block in model.layers for name in ("wqkv", "wo", "w_gate_up", "w_down")]
    with torch.no_grad():
        for owner, name in owners:
            dense = getattr(owner, name)
            qw = random_blocks(*dense.weight.shape, "q8_0" if name == "lm_head" else "q4_1", gen)
            dense.weight.copy_(qw.dequantize())  # a tied head rewrites the embedding too: still one set of values
            setattr(owner, name, QuantLinear(dense, qw))
    engine.read_blocks(True)
    return engine


ARCHS = ["llama", "llama-untied", "mistral", "qwen2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_steps_match_the_pytorch_layers_on_the_same_values(arch: str) -> None:
    """Prompt, decode steps and a 5-token verify: logits within 1e-4 of the PyTorch layers (the
    same weights, read dense), and the same greedy tokens past the sliding window."""
    engine = block_engine(arch)
    assert engine.layer_kernels == "cpu" and engine.weights == "gguf"
    ids = torch.randint(3, 96, (1, 30), generator=torch.Generator().manual_seed(1))
    outs = {}
    for blocks in (True, False):
        engine.read_blocks(blocks)
        engine.ensure_capacity(40)
        with torch.inference_mode():
            steps = [engine.forward(ids[:, :20]).clone()]  # a prompt: PyTorch layers both times (more than 16 rows)
            steps += [engine.forward(ids[:, i : i + 1]).clone() for i in range(20, 24)]  # decode steps
            steps.append(engine.forward(ids[:, 24:29]).clone())  # a verify of 5
        outs[blocks] = steps
    for ours, ref in zip(outs[True], outs[False], strict=True):
        assert (ours - ref).abs().max().item() < 1e-4 * ref.abs().max().item() + 1e-4
    cfg = GenerationConfig(max_new_tokens=24, stop_at_eos=False)
    engine.read_blocks(True)
    got = generate(engine, ids[0, :12].tolist(), cfg).tokens
    engine.read_blocks(False)
    assert got == generate(engine, ids[0, :12].tolist(), cfg).tokens


def test_each_operation_matches_its_reference() -> None:
    """Random activations, several rows, positions well inside the cache, a window."""
    engine = block_engine("llama-untied", seed=3)
    ops: CpuLayerOps = engine.model.layer_ops
    block = engine.model.layers[1]
    gen = torch.Generator().manual_seed(2)
    M, dim, nh, nkv, D, S = 5, 128, 4, 2, 32, 64
    x = torch.randn(M, dim, generator=gen)
    pos = torch.arange(20, 20 + M)
    caches = [torch.randn(1, nkv, S, D, generator=gen) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    cos, sin = engine.model.cos, engine.model.sin
    args = (block.attn_norm.weight, 1e-5, block.wqkv.weight, block.wqkv.bias, cos, sin, pos)
    q = ops.norm_qkv_rope(x, *args, *caches, nh)
    q_ref = layer_reference.norm_qkv_rope(x, *args, *ref_caches, nh)
    assert torch.allclose(q, q_ref, atol=1e-4) and all(torch.allclose(c, r, atol=1e-4) for c, r in zip(caches, ref_caches, strict=True))
    for window in (None, 6):
        y = ops.decode_attention(q, *caches, pos, 0.17, window)
        assert torch.allclose(y, layer_reference.decode_attention(q, *caches, pos, 0.17, window), atol=1e-5)
    odd = [torch.randn(1, nkv, S, 20, generator=gen) for _ in range(2)]  # a head size past the scores' eight lanes (a tail of 4)
    q_odd = torch.randn(M, nh, 20, generator=gen)
    y = ops.decode_attention(q_odd, *odd, pos, 0.17, None)
    assert torch.allclose(y, layer_reference.decode_attention(q_odd, *odd, pos, 0.17, None), atol=1e-5)
    # a token tree: rotary positions apart from the slots, each row seeing its ancestors among the tree's slots
    from labkit.specdec.tree import TokenTree

    tree = TokenTree([-1, 0, 0, 1, 2])
    rope_pos, base, mask = 20 + torch.tensor(tree.depths()), torch.tensor([20]), tree.ancestor_mask().to(torch.int8)
    caches = [torch.randn(1, nkv, S, D, generator=gen) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    q = ops.norm_qkv_rope(x, *args, *caches, nh, rope_pos)
    q_ref = layer_reference.norm_qkv_rope(x, *args, *ref_caches, nh, rope_pos)
    assert torch.allclose(q, q_ref, atol=1e-4) and all(torch.allclose(c, r, atol=1e-4) for c, r in zip(caches, ref_caches, strict=True))
    assert not torch.allclose(q, ops.norm_qkv_rope(x, *args, *[c.clone() for c in caches], nh), atol=1e-3)  # the depths mattered
    y = ops.decode_attention(q, *caches, pos, 0.17, None, tree_base=base, tree_mask=mask)
    assert torch.allclose(y, layer_reference.decode_attention(q, *caches, pos, 0.17, None, tree_base=base, tree_mask=mask), atol=1e-5)
    assert not torch.allclose(y, ops.decode_attention(q, *caches, pos, 0.17, None), atol=1e-3)  # the mask mattered
    h = torch.randn(M, nh * D, generator=gen)
    assert torch.allclose(ops.linear_residual(h, block.wo.weight, block.wo.bias, x),
                          layer_reference.linear_residual(h, block.wo.weight, block.wo.bias, x), atol=1e-4)
    up = ops.norm_gate_up(x, block.mlp_norm.weight, 1e-5, block.w_gate_up.weight, block.w_gate_up.bias)
    assert torch.allclose(up, layer_reference.norm_gate_up(x, block.mlp_norm.weight, 1e-5, block.w_gate_up.weight, block.w_gate_up.bias), atol=1e-4)
    logits, normed = ops.norm_head(x, engine.model.norm.weight, 1e-5, engine.model.lm_head.weight, True)
    ref_logits, ref_normed = layer_reference.norm_head(x, engine.model.norm.weight, 1e-5, engine.model.lm_head.weight, True)
    assert torch.allclose(logits, ref_logits, atol=1e-4) and normed is not None and torch.allclose(normed, ref_normed, atol=1e-5)


@pytest.mark.parametrize("nh, nkv, D", [(9, 3, 64), (4, 4, 48), (8, 2, 32), (12, 2, 20)])
def test_attention_matches_its_reference_and_keeps_each_rows_bits(nh: int, nkv: int, D: int) -> None:
    """The C attention reads each key and value once for every query sharing it (the kv head's
    group, a verify's rows), by blocks of positions and slices of the head: against the PyTorch
    twin over every shape it takes apart (the embedded model's 9 heads over 3, one kv head a query
    head, groups past four, head sizes that leave a slice or the eight lanes short), keys across
    several blocks, a window, batch rows; and each row's output bit for bit the one it gets alone."""
    ops = block_engine("llama").model.layer_ops
    gen = torch.Generator().manual_seed(nh * D)
    B, T, S = 2, 5, 300
    k_cache, v_cache = (torch.randn(B, nkv, S, D, generator=gen) for _ in range(2))
    q = torch.randn(B * T, nh, D, generator=gen)
    pos = torch.tensor([[150, 151, 152, 153, 154], [201, 202, 203, 204, 205]])  # (B, T)
    for window in (None, 70):
        y = ops.decode_attention(q, k_cache, v_cache, pos, 0.125, window)  # (B*T, NH*D)
        assert torch.allclose(y, layer_reference.decode_attention(q, k_cache, v_cache, pos, 0.125, window), atol=1e-5)
        for b in range(B):
            for t in range(T):
                alone = ops.decode_attention(q[b * T + t : b * T + t + 1], k_cache[b : b + 1], v_cache[b : b + 1], pos[b, t : t + 1], 0.125, window)
                assert torch.equal(alone[0], y[b * T + t]), (b, t, window)


@pytest.mark.parametrize("target", ["native", *TARGETS])
def test_attention_builds_elsewhere_match_a_double_reference(tmp_path, target: str) -> None:
    """The attention as other builds take it (tests/native/check_attention.c, against a
    double-precision softmax(q k^T) v, GQA groups of 1 to 6, short head sizes, a window, a tree,
    each row's bits alone and in a verify): this machine's own build (eight scores a pass where it
    has AVX), x86 without AVX (a position at a time, outputs through memory) and aarch64 (NEON)."""
    from pathlib import Path

    out = build_and_run(Path(__file__).parent / "native" / "check_attention.c", target, tmp_path)
    assert out.strip() == "ok", out


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_a_stack_in_one_call_is_the_five_operations_bit_for_bit(arch: str) -> None:
    """decode_layers (every layer in one call) against forward_fused layer by layer: the same
    residual stream and the same cache, exactly, for decode rows, a verify and a token tree."""
    from labkit.models.kvcache import TreeAttention
    from labkit.specdec.tree import TokenTree

    engine = block_engine(arch, seed=4)
    model, ops = engine.model, engine.model.layer_ops
    engine.ensure_capacity(48)
    cache, gen = engine.cache, torch.Generator().manual_seed(5)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    tree = TokenTree([-1, 0, 0, 1, 2])
    cases = [(1, None), (5, None),
             (5, TreeAttention(30 + torch.tensor(tree.depths()), torch.tensor([30]), tree.ancestor_mask().to(torch.int8)))]
    for M, tree_attention in cases:
        x = torch.randn(1, M, model.args.dim, generator=gen)
        pos = torch.arange(30, 30 + M)
        before = (cache.k.clone(), cache.v.clone())
        ref = x
        for i in range(model.args.n_layers):
            ref = model.layers[i].forward_fused(ops, ref, model.cos, model.sin, cache, i, pos, 30 + M, tree_attention)
        ref_cache = (cache.k.clone(), cache.v.clone())
        cache.k.copy_(before[0])
        cache.v.copy_(before[1])
        got = model.forward_stack(x, cache, pos, model.args.n_layers, tree_attention)
        assert torch.equal(got, ref) and torch.equal(cache.k, ref_cache[0]) and torch.equal(cache.v, ref_cache[1])
        assert not torch.equal(got, model.forward_stack(x, cache, pos, model.args.n_layers - 1, tree_attention))  # n counts


def test_the_operations_refuse_what_they_cannot_run() -> None:
    plain = Engine.from_hf(tiny_hf_model("llama"), "cpu", "float32")
    assert "GGUF blocks" in cpu_layers_unusable(plain.model, 1) and plain.layer_kernels == "torch"
    engine = block_engine("llama")
    assert "batch 1" in cpu_layers_unusable(engine.model, 2)
    with pytest.raises(Exception, match="no blocks"):
        engine.model.layer_ops.linear_residual(torch.randn(1, 128), torch.randn(128, 128), None, torch.randn(1, 128))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_batched_rows_run_the_cpu_operations_with_batch_1_bits(arch: str) -> None:
    """Continuous batching over an engine on GGUF blocks: the batched steps run the C operations
    (rows at their own positions, each in its own cache row; joining prompts prefilled together),
    and every request's greedy tokens, plain and speculative, are its batch-1 tokens."""
    from labkit.batch.engine import BatchConfig, BatchEngine
    from labkit.batch.scheduler import ContinuousBatcher
    from labkit.specdec.drafters import NgramDrafter

    engine = block_engine(arch, seed=2)
    gen = torch.Generator().manual_seed(4)
    asks = [torch.randint(3, 96, (n,), generator=gen).tolist() for n in (5, 23, 40, 9, 31)]
    asks = [p + p[:8] for p in asks]  # something for prompt lookup to find
    cfg = GenerationConfig(max_new_tokens=20, stop_at_eos=False)
    want = [generate(engine, p, cfg).tokens for p in asks]
    ops = engine.model.layer_ops
    rows_seen: list[int] = []
    stack = ops.decode_layers

    def spy(x, layers, k_layers, *args, **kwargs):
        rows_seen.append(k_layers[0].shape[0])
        return stack(x, layers, k_layers, *args, **kwargs)

    ops.decode_layers = spy
    try:
        for drafter, k in ((None, 0), (lambda: NgramDrafter(3, 1), 3)):
            batcher = ContinuousBatcher(BatchEngine(engine, BatchConfig(slots=3, max_seq_len=128)), drafter, k)
            got = [batcher.submit(p, cfg) for p in asks]
            batcher.run()
            assert [r.tokens for r in got] == want, k
    finally:
        del ops.decode_layers
    assert max(rows_seen) == 3  # three slots stepped together through the C layers, a stack a call


def test_texts_are_written_on_the_cpu_operations_rows_at_once() -> None:
    """Self-distillation's texts on an engine that reads GGUF blocks: written on the C operations'
    rows, several at once (each row's bits are a batch-1 step's, so no invariant tiles of the
    PyTorch layers), and each text is the one `generate` writes alone."""
    from labkit.heads_train import CPU_WRITING_ROWS, HeadsTrainConfig, self_written_texts, writing_batch
    from labkit.specdec.heads import HeadsConfig

    engine = block_engine("llama", seed=2)
    batch = writing_batch(engine, 40)
    assert batch is not None and (batch.cfg.slots, batch.cfg.invariant) == (CPU_WRITING_ROWS, False)
    ops, rows_seen = engine.model.layer_ops, []
    stack = ops.decode_layers
    ops.decode_layers = lambda x, layers, k_layers, *a, **kw: rows_seen.append(k_layers[0].shape[0]) or stack(x, layers, k_layers, *a, **kw)
    frame, eos = ([1, 5, 6], [7, 8]), set(engine.eos_token_ids)
    cfg = HeadsTrainConfig(heads=HeadsConfig(n_heads=2), texts=5, user_tokens=5, greedy_tokens=6, progress=False)
    try:
        texts = self_written_texts(engine, 1, cfg, frame)
    finally:
        del ops.decode_layers
    assert max(rows_seen) > 1  # rows stepped together through the C layers
    for i, (tokens, first) in enumerate(texts):
        user = generate(engine, frame[0], GenerationConfig(max_new_tokens=5, temperature=1.0, top_p=0.95, seed=cfg.seed + i)).tokens
        while user and user[-1] in eos:
            user = user[:-1]
        prefix = [*frame[0], *user, *frame[1]]
        answer = generate(engine, prefix, GenerationConfig(max_new_tokens=6, min_new_tokens=6, stop_at_eos=False)).tokens
        assert (tokens, first) == (prefix + answer, len(prefix)), i


def test_texts_for_the_embedded_model_are_written_on_its_blocks_and_the_engine_handed_on_is_dense(embedded, monkeypatch) -> None:
    """write_texts_for_model on a CPU writes on the GGUF blocks where "auto" takes them (forced here: the
    choice is timed), then hands on the engine reading its dense weights (the same values), as
    EAGLE's features and the fingerprint read them."""
    from labkit import heads_train
    from labkit.heads_train import HeadsTrainConfig, write_texts_for_model
    from labkit.specdec.heads import HeadsConfig

    build, kernels = Engine.from_loaded, []
    monkeypatch.setattr(heads_train.Engine, "from_loaded", lambda loaded, *a, weights, **kw: build(loaded, *a, weights="gguf", **kw))
    real_batch = heads_train.writing_batch
    monkeypatch.setattr(heads_train, "writing_batch", lambda engine, longest: kernels.append(engine.layer_kernels) or real_batch(engine, longest))
    cfg = HeadsTrainConfig(heads=HeadsConfig(n_heads=2), texts=2, user_tokens=4, greedy_tokens=4, progress=False)
    engine, texts, frame = write_texts_for_model(embedded, torch.device("cpu"), torch.float32, cfg)
    assert kernels == ["cpu"] and len(texts) == 2 and frame is not None
    assert (engine.weights, engine.layer_kernels) == ("dense", "torch")


def test_eagle_drafts_through_the_cpu_operations_on_q8_0_blocks() -> None:
    """On a target that reads GGUF blocks, EAGLE's draft layer runs the C operations on Q8_0 blocks
    of its linears (their dense weights set to the blocks' values) and its head reads the target's
    head blocks: plain greedy's tokens, and the drafts the PyTorch twins make on the same values."""
    from labkit.generate import Speculation
    from labkit.kernels import layer_reference
    from labkit.models.gguf_weights import quantize_q8_0
    from labkit.specdec.eagle_drafter import EagleDrafter
    from tests.test_eagle import random_head

    engine = block_engine("llama", seed=1)
    prompt, cfg = list(range(3, 40)), GenerationConfig(max_new_tokens=40, stop_at_eos=False)
    want = generate(engine, prompt, cfg).tokens
    head = random_head(ids=torch.arange(1, 96, 2))  # a reduced draft vocabulary: rows of the target's head blocks
    drafter = EagleDrafter(engine, head, device_steps=False)
    assert isinstance(drafter.ops, CpuLayerOps) and isinstance(drafter.head.wqkv, QuantLinear) and drafter.draft_head is not None
    assert not isinstance(head.wqkv, QuantLinear)  # the caller's head is left as it was
    got = generate(engine, prompt, cfg, Speculation(drafter, 3), detailed_metrics=True)
    twin = EagleDrafter(engine, drafter.head, device_steps=False)  # the same values through the PyTorch twins
    twin.ops, twin.draft_head = layer_reference, None
    ref = generate(engine, prompt, cfg, Speculation(twin, 3), detailed_metrics=True)
    assert got.tokens == want == ref.tokens
    assert got.stats.draft_tokens == ref.stats.draft_tokens and len(got.stats.draft_tokens) >= 8
    from labkit.specdec.eagle_mix import LAZY_WINDOW, EagleMixDrafter

    looping = [5, 6, 7, 8, 9, 10, 11] * 3 + [40, 41, 5, 6]  # copy steps and chain steps
    plain = generate(engine, looping, cfg).tokens
    for lazy in (0, LAZY_WINDOW):  # eagle-mix's and eagle-lazy's device steps, eagerly: the C operations take no only_if
        mixed = EagleMixDrafter(engine, head, lazy=lazy, device_steps=True)
        assert generate(engine, looping, cfg, Speculation(mixed, 3)).tokens == plain, mixed.name
    w = torch.randn(8, 64)
    qw = quantize_q8_0(w)
    assert torch.equal(qw.d.half().float(), qw.d) and qw.qs.abs().max() <= 127  # GGUF's float16 scales, never past 127 steps
    assert (qw.d * 127 >= w.reshape(8, 2, 32).abs().amax(-1)).all()  # rounded up
    assert (qw.dequantize() - w).abs().max() <= qw.d.max() / 2 + 1e-6  # half a step of the largest block


def test_eagle_drafts_with_the_targets_8_bit_activations() -> None:
    """Under --weights gguf-q8 the draft layer's products take 8-bit activations too (on tiles where the build has
    them), and speculation keeps that mode's plain greedy tokens."""
    from labkit.generate import Speculation
    from labkit.kernels import cpu_quant
    from labkit.specdec.eagle_drafter import EagleDrafter
    from tests.test_eagle import random_head

    engine = block_engine("llama", seed=1)
    engine.read_blocks(True, "q8")
    prompt, cfg = list(range(3, 40)), GenerationConfig(max_new_tokens=40, stop_at_eos=False)
    want = generate(engine, prompt, cfg).tokens
    drafter = EagleDrafter(engine, random_head(ids=torch.arange(1, 96, 2)), device_steps=False)
    assert drafter.draft_head is not None and drafter.draft_head.act == drafter.head.wqkv.act == "q8"
    assert (drafter.head.wqkv.q8_tiles() is not None) == bool(cpu_quant.q8_tile_rows())
    got = generate(engine, prompt, cfg, Speculation(drafter, 3), detailed_metrics=True)
    assert got.tokens == want and len(got.stats.draft_tokens) >= 8
