"""The fused Llama layer: each Triton kernel against its PyTorch twin on random inputs (under
TRITON_INTERPRET=1 on the CPU), and whole engines with fused layers against the PyTorch layers."""

import os

import pytest
import torch

from labkit.config import GenerationConfig
from labkit.engine import Engine, pick_layer_ops
from labkit.errors import LabkitError
from labkit.generate import Speculation, generate
from labkit.kernels import layer_reference as ref
from labkit.models.tiny import tiny_hf_model
from labkit.specdec import make_drafter

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                 reason="Triton needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # relative to the output's scale


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    return (a.float() - b.float()).abs().max().item() <= TOL[dtype] * (b.float().abs().max().item() + 1.0)


def layer_inputs(B: int, T: int, dtype: torch.dtype, bias: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    dim, nh, nkv, D, S = 96, 6, 2, 32, 48

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    angles = torch.rand(S, D // 2, generator=g) * 6
    pos = torch.arange(7, 7 + T) if T < 20 else torch.arange(T)
    return dict(
        x=rnd(B * T, dim), eps=1e-5, norm_w=(1 + 0.1 * torch.randn(dim, generator=g)).to(dtype).to(DEVICE),
        w=rnd((nh + 2 * nkv) * D, dim, scale=dim**-0.5), bias=rnd((nh + 2 * nkv) * D) if bias else None,
        cos=torch.cat([angles.cos()] * 2, -1).to(dtype).to(DEVICE), sin=torch.cat([-angles.sin(), angles.sin()], -1).to(dtype).to(DEVICE),
        input_pos=pos.to(DEVICE), k_cache=rnd(B, nkv, S, D), v_cache=rnd(B, nkv, S, D), n_heads=nh,
    )


SHAPES = [(1, 1), (1, 5), (2, 3), (1, 20)]  # (B, T): decode, verify, batch, more rows than one block
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (dtype, prefetch_bytes): the default, and once a prefetch smaller than the reduction (the loop past it)
PREFETCH = [(dtype, None) for dtype in DTYPES] + [(torch.float16, 2048)]


def small_prefetch(prefetch: int | None, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefetch budget below the reduction size: the kernels also take their loop over the
    columns past the tiles loaded up front (what larger models run)."""
    from labkit.kernels import layer_triton as tri

    if prefetch is not None:
        monkeypatch.setitem(tri.TUNE, "prefetch_bytes", prefetch)
        assert tri._k_tiles(96, 64) == (32, 0) and tri._k_tiles(160, 64) == (32, 0)
    else:  # the embedded model's sizes (576, 1536) in bf16 fit whole; fp32 and larger models loop
        assert tri._k_tiles(576, 2 * 32 * 2) == (512, 64) and tri._k_tiles(1536, 32 * 2) == (1024, 512)
        assert tri._k_tiles(1536, 32 * 4) == (512, 256) and tri._k_tiles(5632, 32 * 2) == (1024, 512)


@interpreted
@pytest.mark.parametrize("dtype, prefetch", PREFETCH)
@pytest.mark.parametrize("B, T", SHAPES)
def test_norm_qkv_rope_and_attention_match_reference(
    B: int, T: int, dtype: torch.dtype, prefetch: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from labkit.kernels import layer_triton as tri

    small_prefetch(prefetch, dtype, monkeypatch)
    inputs = layer_inputs(B, T, dtype, bias=B == 2)
    outs = []
    for ops in (ref, tri):
        args = {**inputs, "k_cache": inputs["k_cache"].clone(), "v_cache": inputs["v_cache"].clone()}
        q = ops.norm_qkv_rope(**args)
        scale = 32**-0.5
        counters = torch.zeros(B * 2 * 16, dtype=torch.int32, device=DEVICE)
        full = ops.decode_attention(q, args["k_cache"], args["v_cache"], args["input_pos"], scale, None, counters)
        local = ops.decode_attention(q, args["k_cache"], args["v_cache"], args["input_pos"], scale, 4, counters)
        outs.append((q, args["k_cache"], args["v_cache"], full, local))
    for name, a, b in zip(("q", "k_cache", "v_cache", "attention", "windowed"), outs[1], outs[0], strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert close(a, b, dtype), (name, (a.float() - b.float()).abs().max().item())
    written = inputs["input_pos"]
    assert not torch.equal(outs[0][1][:, :, written], inputs["k_cache"][:, :, written]), "the cache was not written"
    untouched = torch.ones(48, dtype=torch.bool)
    untouched[written.cpu()] = False
    assert torch.equal(outs[1][1][:, :, untouched.to(DEVICE)], inputs["k_cache"][:, :, untouched.to(DEVICE)])


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_at_their_own_positions_match_each_row_alone(dtype: torch.dtype) -> None:
    """Batched decoding: input_pos (B, T), each batch row at its own positions. Each row's q, cache
    writes and attention equal that row run alone (B = 1) with its positions: to the bit in the
    Triton kernels (a row's arithmetic never depends on its neighbours), within rounding in their
    twins (PyTorch's GEMMs pick kernels by row count); the twins and the kernels agree."""
    from labkit.kernels import layer_triton as tri

    B, T = 3, 2
    inputs = layer_inputs(B, T, dtype, bias=True, seed=3)
    inputs["input_pos"] = torch.tensor([[3, 4], [30, 31], [11, 12]], device=DEVICE)  # (B, T)
    results = {}
    for name, ops in (("ref", ref), ("tri", tri)):
        args = {**inputs, "k_cache": inputs["k_cache"].clone(), "v_cache": inputs["v_cache"].clone()}
        q = ops.norm_qkv_rope(**args)
        counters = torch.zeros(B * 2 * 16, dtype=torch.int32, device=DEVICE)
        y = ops.decode_attention(q, args["k_cache"], args["v_cache"], args["input_pos"], 32**-0.5, None, counters)
        results[name] = (q, args["k_cache"], y)
        for b in range(B):  # the row alone
            rows = slice(b * T, (b + 1) * T)
            one = {**inputs, "x": inputs["x"][rows], "input_pos": inputs["input_pos"][b].contiguous(),
                   "k_cache": inputs["k_cache"][b : b + 1].clone(), "v_cache": inputs["v_cache"][b : b + 1].clone()}
            q1 = ops.norm_qkv_rope(**one)
            y1 = ops.decode_attention(q1, one["k_cache"], one["v_cache"], one["input_pos"], 32**-0.5, None, counters)
            same = torch.equal if name == "tri" else (lambda a, b: close(a, b, dtype))
            assert same(q1, q[rows]) and same(one["k_cache"][0], args["k_cache"][b]), (name, b)
            assert same(y1, y[rows]), (name, b)
    for a, b in zip(results["tri"], results["ref"], strict=True):
        assert close(a, b, dtype)


@interpreted
@pytest.mark.parametrize("dtype, prefetch", PREFETCH)
@pytest.mark.parametrize("M", [1, 6, 21])
def test_linear_residual_and_gate_up_match_reference(
    M: int, dtype: torch.dtype, prefetch: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from labkit.kernels import layer_triton as tri

    small_prefetch(prefetch, dtype, monkeypatch)
    g = torch.Generator().manual_seed(M)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    x, res, w, b = rnd(M, 160), rnd(M, 72), rnd(72, 160, scale=160**-0.5), rnd(72)
    for bias in (None, b):
        assert close(tri.linear_residual(x, w, bias, res), ref.linear_residual(x, w, bias, res), dtype)
    h, nw, wgu, bgu = rnd(M, 96), rnd(96), rnd(2 * 80, 96, scale=96**-0.5), rnd(2 * 80)
    for bias in (None, bgu):
        ours, theirs = tri.norm_gate_up(h, nw, 1e-5, wgu, bias), ref.norm_gate_up(h, nw, 1e-5, wgu, bias)
        assert ours.shape == (M, 80) and close(ours, theirs, dtype)


@interpreted
@pytest.mark.parametrize("dtype, prefetch", PREFETCH)
@pytest.mark.parametrize("M", [1, 5, 21])
def test_norm_head_matches_reference(M: int, dtype: torch.dtype, prefetch: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    from labkit.kernels import layer_triton as tri

    small_prefetch(prefetch, dtype, monkeypatch)
    g = torch.Generator().manual_seed(10 + M)
    x = (torch.randn(M, 96, generator=g) * 3).to(dtype).to(DEVICE)
    nw = (1 + 0.1 * torch.randn(96, generator=g)).to(dtype).to(DEVICE)
    w = (torch.randn(200, 96, generator=g) * 96**-0.5).to(dtype).to(DEVICE)  # a vocabulary that is not a multiple of the tile
    want, want_h = ref.norm_head(x, nw, 1e-5, w, True)
    for keep in (True, False):
        logits, h = tri.norm_head(x, nw, 1e-5, w, keep)
        assert logits.shape == (M, 200) and logits.dtype == dtype and close(logits, want, dtype)
        assert (h is not None) == keep
        if h is not None:
            assert h.shape == (M, 96) and close(h, want_h, dtype)


@interpreted
@pytest.mark.parametrize("B, T, depth, shared", [(1, 1, 1, True), (1, 4, 5, True), (3, 4, 4, False), (5, 9, 8, False), (2, 16, 2, False)])
def test_chain_inputs_match_reference(B: int, T: int, depth: int, shared: bool) -> None:
    """chain_inputs (a verify's catch-up tokens and positions, the chain's positions, one launch) against its
    twin, which holds the rule itself: the next fed token after each row, the target's at the accepted row
    and after the last; positions clamped to the draft cache, rows at their own or shared positions."""
    from labkit.kernels import layer_triton as tri

    g = torch.Generator().manual_seed(40 + B * T)
    tokens = torch.randint(0, 1000, (B, T), generator=g)
    accepted = torch.randint(0, T, (B,), generator=g)
    verdict = torch.stack([accepted, 2000 + torch.arange(B)], 1)  # (B, 2)
    starts = torch.tensor([60]) if shared else torch.randint(0, 80, (B,), generator=g)
    input_pos = starts[:, None] + torch.arange(T)  # (B, T) or (1, T)
    input_pos = input_pos[0] if shared else input_pos
    last = 64  # some rows' positions past it: clamped
    got = tri.chain_inputs(tokens.to(DEVICE), verdict.to(DEVICE), input_pos.to(DEVICE), depth, last)
    want = ref.chain_inputs(tokens, verdict, input_pos, depth, last)
    for name, a, b in zip(("after", "positions", "chain positions"), got, want, strict=True):
        assert a.shape == b.shape and torch.equal(a.cpu(), b), (name, a, b)
    after, at, chain_pos = want
    for b in range(B):
        a = int(accepted[b])
        assert after[b].tolist() == [*tokens[b, 1:].tolist(), 2000 + b][:a] + [2000 + b] + [*tokens[b, 1:].tolist(), 2000 + b][a + 1 :]
        anchor = int(input_pos[..., 0].expand(B)[b]) + a
        assert chain_pos[:, b].tolist() == [min(anchor + d, last) for d in range(1, depth)]
    assert at.tolist() == input_pos.clamp(max=last).tolist() and at.max() <= last


@interpreted
@pytest.mark.parametrize("dtype, prefetch", PREFETCH)
@pytest.mark.parametrize("M", [1, 5, 21])
def test_eagle_pass_ends_match_reference(M: int, dtype: torch.dtype, prefetch: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """embed_fc (the embedding gathered inside the fc) and draft_argmax (the draft head's product,
    argmax and id in one launch) against their twins; the argmax exactly (fp32 and fp16: the
    interpreter's bf16 rounds by truncation), its scratch left zero for the next launch."""
    from labkit.kernels import layer_triton as tri

    small_prefetch(prefetch, dtype, monkeypatch)
    g = torch.Generator().manual_seed(20 + M)
    D, V, N = 96, 300, 200  # a draft vocabulary that is not a multiple of the tile

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    tokens = torch.randint(0, V, (M,), generator=g).to(DEVICE)
    emb, feat, fc = rnd(V, D), rnd(M, D), rnd(D, 2 * D, scale=(2 * D) ** -0.5)
    x = tri.embed_fc(tokens, emb, feat, fc)
    assert x.shape == (M, D) and x.dtype == dtype and close(x, ref.embed_fc(tokens, emb, feat, fc), dtype)
    head = rnd(N, D, scale=D**-0.5)
    ids = torch.randperm(V, generator=g)[:N].to(DEVICE)
    scratch = (torch.zeros(32, dtype=torch.long, device=DEVICE), torch.zeros(2, dtype=torch.int32, device=DEVICE))
    for _ in range(2):  # a second launch on the scratch the first left
        picked = tri.draft_argmax(x, head, ids, scratch)
        assert picked.shape == (M,) and picked.dtype == torch.long
        assert not scratch[0].any() and not scratch[1].any()
        if dtype != torch.bfloat16:
            assert picked.tolist() == ref.draft_argmax(x, head, ids).tolist()
        else:  # the logits it picked are the best within bf16 rounding
            logits = x.float() @ head.float().T  # (M, N)
            chosen = logits.gather(1, (ids[None, :] == picked[:, None]).float().argmax(1, keepdim=True))[:, 0]
            assert (chosen >= logits.max(1).values - 3e-2 * logits.abs().max()).all()
    tie = torch.zeros(1, D, dtype=dtype, device=DEVICE)  # every logit 0: the first row's id, as torch.argmax
    assert tri.draft_argmax(tie, head, ids, scratch).tolist() == [ids[0].item()] == ref.draft_argmax(tie, head, ids).tolist()


@interpreted
@pytest.mark.parametrize("M", [1, 5])
def test_a_launch_called_off_writes_nothing(M: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kernel an EAGLE chain runs, given only_if: where it holds, exactly the results without
    the flag; where it does not, nothing written: the outputs (allocated full of a sentinel here),
    the caches, the attention's counters and the argmax's scratch stay as they were."""
    from labkit.kernels import layer_triton as tri

    dtype, sentinel = torch.float32, 12345.0
    empty = torch.empty

    def filled(*shape, **kw):  # the kernels' outputs, made recognisable
        out = empty(*shape, **kw)
        return out.fill_(sentinel if out.is_floating_point() else -7)

    inputs = layer_inputs(1, M, dtype, bias=False, seed=M)
    x, g = inputs["x"], torch.Generator().manual_seed(M)
    counters = torch.zeros(2 * 16, dtype=torch.int32, device=DEVICE)
    scratch = (torch.zeros(32, dtype=torch.long, device=DEVICE), torch.zeros(2, dtype=torch.int32, device=DEVICE))
    head, ids = torch.randn(40, 96, generator=g).to(DEVICE), torch.randperm(50, generator=g)[:40].to(DEVICE)
    tokens, emb, fc = torch.randint(0, 50, (M,), generator=g).to(DEVICE), torch.randn(50, 96, generator=g).to(DEVICE), torch.randn(96, 192, generator=g).to(DEVICE) / 14
    w_o, w_gu = torch.randn(96, 192, generator=g).to(DEVICE) / 14, torch.randn(2 * 64, 96, generator=g).to(DEVICE) / 10

    q0 = ref.norm_qkv_rope(**{**inputs, "k_cache": inputs["k_cache"].clone(), "v_cache": inputs["v_cache"].clone()})  # (M, nh, D)

    def run(**flag) -> list[torch.Tensor]:
        k_cache, v_cache = inputs["k_cache"].clone(), inputs["v_cache"].clone()
        q = tri.norm_qkv_rope(**{**inputs, "k_cache": k_cache, "v_cache": v_cache}, **flag)
        att = tri.decode_attention(q0, inputs["k_cache"], inputs["v_cache"], inputs["input_pos"], 32**-0.5, None, counters, **flag)
        return [q, k_cache, v_cache, att, tri.linear_residual(torch.cat((x, x), 1), w_o, None, x, **flag),
                tri.norm_gate_up(x, inputs["norm_w"], 1e-5, w_gu, None, **flag), tri.embed_fc(tokens, emb, x, fc, **flag),
                tri.draft_argmax(x, head, ids, scratch, **flag)]

    monkeypatch.setattr(torch, "empty", filled)
    plain = run()
    on = run(only_if=torch.ones(1, dtype=torch.bool, device=DEVICE))
    off = run(only_if=torch.zeros(1, dtype=torch.bool, device=DEVICE))
    names = ("q", "k_cache", "v_cache", "attention", "linear_residual", "norm_gate_up", "embed_fc", "draft_argmax")
    for name, a, b, c in zip(names, plain, on, off, strict=True):
        assert torch.equal(a, b), name
        if name.endswith("cache"):
            assert torch.equal(c, inputs[name]) and not torch.equal(a, inputs[name]), name
        else:
            assert (c == (sentinel if c.is_floating_point() else -7)).all() and not torch.equal(a, c), name
    assert not counters.any() and not scratch[0].any() and not scratch[1].any()


@interpreted
def test_a_rows_bits_do_not_depend_on_the_rows_beside_it() -> None:
    """Batch invariance in the layer kernels: every row's outputs are the same bits whatever rows
    share its launch and wherever its 16-row tile falls (M = 1, 16, 24, and rows 24-39 alone,
    against the same rows of a 40-row launch: tiles of rows 0-15, 16-31 and 32-39). At the embedded
    model's sizes on a GPU (tl.dot on tensor cores), small ones under the interpreter."""
    from labkit.kernels import layer_triton as tri

    gpu = DEVICE == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    dim, hidden, vocab, nh, nkv, D, S = (576, 1536, 49152, 9, 3, 64, 64) if gpu else (96, 160, 200, 3, 1, 32, 48)
    g = torch.Generator().manual_seed(42)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    M = 40
    x, h, nw = rnd(M, dim), rnd(M, hidden), 1 + rnd(dim, scale=0.1)
    w_down, w_gu, w_head = rnd(dim, hidden, scale=hidden**-0.5), rnd(2 * hidden, dim, scale=dim**-0.5), rnd(vocab, dim, scale=dim**-0.5)
    w_qkv = rnd((nh + 2 * nkv) * D, dim, scale=dim**-0.5)
    angles = torch.rand(S, D // 2, generator=g)
    cos = torch.cat([angles.cos()] * 2, -1).to(dtype).to(DEVICE)
    sin = torch.cat([-angles.sin(), angles.sin()], -1).to(dtype).to(DEVICE)
    k_cache, v_cache = rnd(1, nkv, S, D), rnd(1, nkv, S, D)

    def outputs(rows: slice) -> list[torch.Tensor]:  # each kernel over x[rows]
        pos = torch.full((len(range(M)[rows]),), 5, device=DEVICE)  # one position: every row writes the same cache slot
        q = tri.norm_qkv_rope(x[rows], nw, 1e-5, w_qkv, None, cos, sin, pos, k_cache.clone(), v_cache.clone(), nh)
        return [q, tri.linear_residual(h[rows], w_down, None, x[rows]), tri.norm_gate_up(x[rows], nw, 1e-5, w_gu, None),
                *tri.norm_head(x[rows], nw, 1e-5, w_head, True)]

    whole = outputs(slice(0, M))
    for rows in (slice(0, 1), slice(0, 16), slice(0, 24), slice(24, 40)):
        for name, part, all_rows in zip(("q", "linear_residual", "norm_gate_up", "logits", "normed"), outputs(rows), whole, strict=True):
            assert torch.equal(part, all_rows[rows]), (name, rows)


@pytest.mark.parametrize("arch", ["llama-untied", "mistral"])  # biases; sliding window
def test_reference_layers_reproduce_the_model_layers(arch: str) -> None:
    """layer_reference through forward_fused is the model's own layer, in another shape."""
    hf = tiny_hf_model(arch, seed=4)
    engine = Engine.from_hf(hf, "cpu", torch.float32, layer_kernels="torch")
    ids = torch.randint(0, hf.config.vocab_size, (1, 19))
    engine.ensure_capacity(32)
    plain = torch.cat([engine.forward(ids[:, :14]), engine.verify(ids[:, 14:])], 1)
    engine.model.layer_ops = ref
    engine.ensure_capacity(32)
    fused = torch.cat([engine.forward(ids[:, :14]), engine.verify(ids[:, 14:])], 1)
    assert (plain - fused).abs().max().item() < 1e-4


@interpreted
@pytest.mark.parametrize("arch", ["llama-untied", "mistral"])  # biases (as Qwen2's); a sliding window
def test_engine_with_triton_layers_gives_the_same_tokens(arch: str) -> None:
    hf = tiny_hf_model(arch, seed=5)
    plain = Engine.from_hf(hf, DEVICE, torch.float32, layer_kernels="torch")
    fused = Engine.from_hf(hf, DEVICE, torch.float32, layer_kernels="triton")
    assert fused.layer_kernels == "triton" and plain.layer_kernels == "torch"
    ids = torch.randint(0, hf.config.vocab_size, (1, 21), device=DEVICE)
    logits = []
    for engine in (plain, fused):
        engine.ensure_capacity(40)
        logits.append(torch.cat([engine.forward(ids[:, :17]), engine.decode(ids[:, 17:18])[:, None], engine.verify(ids[:, 18:])], 1))
    assert (logits[0] - logits[1]).abs().max().item() < 1e-4
    if arch != "llama-untied":  # the interpreter takes ~20 s a model for these: one architecture is enough
        return
    cfg = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
    prompt = ids[0, :9].tolist() * 2  # repeated, so that the n-gram drafter proposes
    want = generate(plain, prompt, cfg).tokens
    assert generate(fused, prompt, cfg).tokens == want
    assert generate(fused, prompt, cfg, Speculation(make_drafter("ngram", fused), 3)).tokens == want
    assert generate(fused, prompt, cfg, Speculation(make_drafter("layerskip", fused, layers=1), 2)).tokens == want


def test_layer_kernel_choice_says_why() -> None:
    gpt2 = Engine.from_hf(tiny_hf_model("gpt2"), "cpu", torch.float32)
    assert gpt2.layer_kernels == "torch" and "Llama" in gpt2.layer_kernels_reason
    with pytest.raises(LabkitError, match="Llama-family"):
        Engine.from_hf(tiny_hf_model("gpt2"), "cpu", torch.float32, layer_kernels="triton")
    llama = tiny_hf_model("llama")
    with pytest.raises(LabkitError, match="compile"):
        Engine.from_hf(llama, "cpu", torch.float32, layer_kernels="triton", compile=True)
    with pytest.raises(LabkitError, match="unknown layer kernels"):
        Engine.from_hf(llama, "cpu", torch.float32, layer_kernels="fast")
    with pytest.raises(LabkitError, match="AMP"):
        Engine.from_hf(llama, "cpu", torch.bfloat16, amp=True, layer_kernels="triton")
    ops, why = pick_layer_ops(Engine.from_hf(llama, "cpu", torch.float32, layer_kernels="torch").model,
                              torch.device("cpu"), torch.float32, False, False, "auto")
    # on the CPU the interpreter is never picked automatically: it is far slower than PyTorch
    assert ops is None and "triton" in why


@pytest.mark.skipif(not torch.cuda.is_available(), reason="model-sized tiles: shared memory limits exist only on a GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim, hidden", [(576, 1536), (2048, 5632)])  # the embedded model; a 1B Llama (loops past the prefetch)
def test_kernels_at_model_sizes(dim: int, hidden: int, dtype: torch.dtype) -> None:
    """Tiles sized for real models fit the GPU's shared memory in every dtype (fp32 tiles are twice
    the bytes) and still match the twins."""
    from labkit.kernels import layer_triton as tri

    g = torch.Generator().manual_seed(dim)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    for M in (1, 7):
        h, res = rnd(M, hidden), rnd(M, dim)
        w_down, w_gu, nw = rnd(dim, hidden, scale=hidden**-0.5), rnd(2 * hidden, dim, scale=dim**-0.5), rnd(dim)
        assert close(tri.linear_residual(h, w_down, None, res), ref.linear_residual(h, w_down, None, res), dtype)
        assert close(tri.norm_gate_up(res, nw, 1e-5, w_gu, None), ref.norm_gate_up(res, nw, 1e-5, w_gu, None), dtype)
        nh, nkv, D, S = dim // 64, 3, 64, 64
        w_qkv = rnd((nh + 2 * nkv) * D, dim, scale=dim**-0.5)
        angles = torch.rand(S, D // 2, generator=g)
        cos = torch.cat([angles.cos()] * 2, -1).to(dtype).to(DEVICE)
        sin = torch.cat([-angles.sin(), angles.sin()], -1).to(dtype).to(DEVICE)
        pos = torch.arange(3, 3 + M, device=DEVICE)
        caches = [(rnd(1, nkv, S, D), rnd(1, nkv, S, D)) for _ in range(2)]
        caches[1] = (caches[0][0].clone(), caches[0][1].clone())
        q_tri = tri.norm_qkv_rope(res, nw, 1e-5, w_qkv, None, cos, sin, pos, *caches[0], nh)
        q_ref = ref.norm_qkv_rope(res, nw, 1e-5, w_qkv, None, cos, sin, pos, *caches[1], nh)
        assert close(q_tri, q_ref, dtype) and close(caches[0][0], caches[1][0], dtype)
        w_head = rnd(49152, dim, scale=dim**-0.5)  # the embedded model's vocabulary
        (l_tri, h_tri), (l_ref, h_ref) = tri.norm_head(res, nw, 1e-5, w_head, True), ref.norm_head(res, nw, 1e-5, w_head, True)
        assert close(l_tri, l_ref, dtype) and h_tri is not None and h_ref is not None and close(h_tri, h_ref, dtype)
