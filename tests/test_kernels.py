"""Every kernel against its PyTorch reference, on random inputs (never zeros)."""

from pathlib import Path

import pytest
import torch

from labkit.kernels import cpu_quant
from labkit.kernels.reference import dequant_q4_1, quant_linear_ref
from labkit.models.gguf_weights import QuantLinear, QuantWeight, unpermute_rows
from tests.native.build import TARGETS, build_and_run

needs_kernel = pytest.mark.skipif(not cpu_quant.available()[0], reason=f"cpu_quant: {cpu_quant.available()[1]}")


def half(t: torch.Tensor) -> torch.Tensor:  # a GGUF block's scales are float16s
    return t.half().float()


def random_q4(N: int, K: int) -> QuantWeight:
    return QuantWeight("q4_1", torch.randint(0, 256, (N, K // 2), dtype=torch.uint8), half(torch.rand(N, K // 32) * 0.02 + 1e-3), half(-torch.rand(N, K // 32) * 0.1))


def random_q8(N: int, K: int) -> QuantWeight:
    return QuantWeight("q8_0", torch.randint(-127, 128, (N, K), dtype=torch.int8), half(torch.rand(N, K // 32) * 0.01 + 1e-4), None)


@needs_kernel
@pytest.mark.parametrize("make", [random_q4, random_q8])
@pytest.mark.parametrize("M, N, K", [(1, 96, 64), (1, 577, 576), (5, 192, 1536), (16, 33, 96)])
def test_quant_gemv_matches_reference(make, M: int, N: int, K: int) -> None:
    qw = make(N, K)
    x = torch.randn(M, K)
    ours = cpu_quant.quant_linear(x, qw.kind, qw.qs, qw.d, qw.m)
    ref = quant_linear_ref(x, qw.kind, qw.qs, qw.d, qw.m)
    assert ours.shape == (M, N)
    assert (ours - ref).abs().max().item() < 1e-5 * ref.abs().max().item() + 1e-5


def test_q4_1_nibble_order() -> None:
    """Block byte j holds element j in its low nibble and element j+16 in its high nibble."""
    qs = torch.zeros(1, 16, dtype=torch.uint8)
    qs[0, 0] = 0x21  # element 0 → 1, element 16 → 2
    w = dequant_q4_1(qs, torch.ones(1, 1), torch.zeros(1, 1))
    assert w[0, 0] == 1 and w[0, 16] == 2 and w.abs().sum() == 3


def test_unpermute_rows_is_a_permutation() -> None:
    idx = unpermute_rows(24, 3)
    assert sorted(idx.tolist()) == list(range(24))
    assert idx[:8].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]  # per head: even rows, then odd rows


@needs_kernel
def test_quant_linear_uses_blocks_for_few_rows_and_dense_beyond() -> None:
    qw = random_q4(64, 96)
    dense = torch.nn.Linear(96, 64, bias=True)
    with torch.no_grad():
        dense.weight.copy_(qw.dequantize())
    layer = QuantLinear(dense, qw)
    for rows in (1, 3, layer.max_rows, layer.max_rows + 5):
        x = torch.randn(1, rows, 96)
        assert (layer(x) - dense(x)).abs().max().item() < 1e-4
    # the block path really reads the blocks: corrupt them and the small-batch output moves
    layer.qs.zero_()
    x = torch.randn(1, 1, 96)
    assert (layer(x) - dense(x)).abs().max().item() > 1e-2


def test_force_py_disables_the_kernel(monkeypatch) -> None:
    cpu_quant._load.cache_clear()
    monkeypatch.setenv("SPECDEC_FORCE_PY", "1")
    try:
        ok, reason = cpu_quant.available()
        assert not ok and "SPECDEC_FORCE_PY" in reason
    finally:
        cpu_quant._load.cache_clear()


# --- speculative decoding kernels: every available backend against the reference ---------

from labkit.kernels import reference  # noqa: E402
from labkit.kernels.registry import BACKENDS, FUSED_LAYER_OPS, KERNELS, NO_CUDA, backend_status, get, table  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
AVAILABLE = [b for b in BACKENDS if backend_status(b, DEVICE).ok]
COMPILED = [b for b in AVAILABLE if b != "torch"]  # the torch backend *is* the reference: checked against naive loops below


def naive_verify_prefix(draft: torch.Tensor, target: torch.Tensor) -> tuple[list[int], list[int]]:
    """Row by row, token by token: the accepted run and the target's token after it."""
    accepted, bonus = [], []
    for d, t in zip(draft.tolist(), target.tolist(), strict=True):
        n = 0
        while n < len(d) and d[n] == t[n]:
            n += 1
        accepted.append(n)
        bonus.append(t[n])
    return accepted, bonus


def naive_rejection_sample(draft, q, p, u_accept, u_sample) -> tuple[list[int], list[int]]:
    """Leviathan et al. written out: accept x_i when u_i <= p_i(x)/q_i(x); at the first rejection
    invert the CDF of norm(max(0, p_i - q_i)) at u_sample; after K accepts, invert p_K's CDF."""
    accepted, tokens = [], []
    for b in range(draft.shape[0]):
        K = draft.shape[1]
        n = 0
        while n < K:
            x = int(draft[b, n])
            if float(u_accept[b, n]) * float(q[b, n, x]) <= float(p[b, n, x]):
                n += 1
            else:
                break
        dist = p[b, n].double() if n == K else (p[b, n].double() - q[b, n].double()).clamp(min=0)
        cdf = (dist / dist.sum()).cumsum(0)
        tokens.append(min(int(torch.searchsorted(cdf, torch.tensor([float(u_sample[b])], dtype=torch.float64), right=True)), dist.shape[0] - 1))
        accepted.append(n)
    return accepted, tokens


def naive_kv_append(cache, new, keep, start) -> torch.Tensor:
    out = cache.clone()
    for b in range(cache.shape[0]):
        at = int(start[b])
        for j in keep[b].tolist():
            if j < 0:
                break
            out[b, :, at] = new[b, :, j]
            at += 1
    return out


def test_references_match_naive_loops() -> None:
    """The PyTorch references (the torch backend, and what every other backend is held to) against
    loops written out here, on random inputs with partial runs, full accepts and zero accepts."""
    g = torch.Generator().manual_seed(11)
    target = torch.randint(0, 6, (64, 5), generator=g)  # a small vocabulary: runs of every length occur
    draft = torch.where(torch.rand(64, 4, generator=g) < 0.7, target[:, :4], torch.randint(0, 6, (64, 4), generator=g))
    accepted, bonus = reference.verify_prefix(draft, target)
    assert (accepted.tolist(), bonus.tolist()) == naive_verify_prefix(draft, target)
    assert {0, 4} <= set(accepted.tolist())
    B, K, V = 64, 3, 7
    p = torch.randn(B, K + 1, V, generator=g).mul(2).softmax(-1)
    q = torch.randn(B, K, V, generator=g).mul(2).softmax(-1)
    d = torch.multinomial(q.reshape(-1, V), 1, generator=g).view(B, K)
    u_a, u_s = torch.rand(B, K, generator=g), torch.rand(B, generator=g)
    acc, tok = reference.rejection_sample(d, q, p, u_a, u_s)
    want_acc, want_tok = naive_rejection_sample(d, q, p, u_a, u_s)
    assert acc.tolist() == want_acc and {0, K} <= set(want_acc)
    assert sum(a != b for a, b in zip(tok.tolist(), want_tok, strict=True)) <= 1  # a uniform on a CDF step may round either way
    cache, new = torch.randn(3, 2, 16, 4, generator=g), torch.randn(3, 2, 5, 4, generator=g)
    keep, start = torch.tensor([[0, 1, 2, 3, 4], [1, 3, -1, -1, -1], [-1] * 5]), torch.tensor([2, 9, 0])
    assert torch.equal(reference.kv_append(cache.clone(), new, keep, start), naive_kv_append(cache, new, keep, start))


def test_triton_is_tested_here() -> None:
    """CI must exercise the Triton kernels (on the CPU through the interpreter)."""
    assert "triton" in AVAILABLE, backend_status("triton", DEVICE).reason


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("K", [1, 4, 8])
def test_verify_prefix(backend: str, K: int) -> None:
    fn = get("verify_prefix", DEVICE, backend)
    g = torch.Generator().manual_seed(K)
    target = torch.randint(0, 50, (5, K + 1), generator=g)
    draft = target[:, :K].clone()
    draft[1, 0] += 1  # zero accepted
    if K > 1:
        draft[2, K // 2] += 1  # a partial run
    draft[3] = torch.randint(0, 50, (K,), generator=g)  # random
    # row 0 and 4: full accept
    want = reference.verify_prefix(draft, target)
    accepted, bonus = want
    assert accepted[0] == K and bonus[0] == target[0, K]  # full accept: the bonus is the target's last
    assert accepted[1] == 0 and bonus[1] == target[1, 0]  # zero accept
    if K > 1:
        assert accepted[2] == K // 2
    got = fn(draft.to(DEVICE), target.to(DEVICE))
    assert [t.cpu().tolist() for t in got] == [t.tolist() for t in want]


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("K, V", [(1, 17), (4, 1000), (8, 3000)])
def test_rejection_sample(backend: str, K: int, V: int) -> None:
    fn = get("rejection_sample", DEVICE, backend)
    g = torch.Generator().manual_seed(V)
    B = 4
    p = torch.randn(B, K + 1, V, generator=g).mul(3).softmax(-1)
    q = torch.randn(B, K, V, generator=g).mul(3).softmax(-1)
    draft = torch.multinomial(q.reshape(-1, V), 1, generator=g).view(B, K)
    u_accept = torch.rand(B, K, generator=g)
    u_accept[0] = 0.0  # row 0 accepts everything: the bonus comes from p_K
    u_sample = torch.rand(B, generator=g)
    p[1, 0, draft[1, 0]] = 0.0  # row 1 rejects at once
    want = reference.rejection_sample(draft, q, p, u_accept, u_sample)
    assert want[0][0].tolist() == K  # row 0: full accept
    assert want[0][1].tolist() == 0  # row 1: rejected at once
    got = fn(draft.to(DEVICE), q.to(DEVICE), p.to(DEVICE), u_accept.to(DEVICE), u_sample.to(DEVICE))
    assert [t.cpu().tolist() for t in got] == [t.tolist() for t in want]


def test_rejection_sample_reference_keeps_the_target_distribution() -> None:
    """The kernel reference in law: the first token's frequencies over 20,000 draws are p's."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]).expand(20000, 2, 3).contiguous()
    q = torch.tensor([[0.1, 0.2, 0.7]]).expand(20000, 1, 3).contiguous()
    draft = torch.multinomial(q[:, 0], 1, generator=g)
    accepted, token = reference.rejection_sample(draft, q, p, torch.rand(20000, 1, generator=g), torch.rand(20000, generator=g))
    first = torch.where(accepted > 0, draft[:, 0], token)
    freq = torch.bincount(first, minlength=3).float() / 20000
    assert (freq - p[0, 0]).abs().max() < 0.015


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("D", [8, 64])
def test_kv_append_with_compaction(backend: str, D: int) -> None:
    fn = get("kv_append", DEVICE, backend)
    g = torch.Generator().manual_seed(D)
    B, H, S, T = 3, 2, 24, 5
    cache = torch.randn(B, H, S, D, generator=g)
    new = torch.randn(B, H, T, D, generator=g)
    keep = torch.tensor([[0, 1, 2, 3, 4], [0, 2, 3, -1, -1], [-1, -1, -1, -1, -1]])  # all, with gaps, none
    start = torch.tensor([4, 10, 7])
    want = reference.kv_append(cache.clone(), new, keep, start)
    assert torch.equal(want[1, :, 11], new[1, :, 2]) and torch.equal(want[2], cache[2])
    got = fn(cache.clone().to(DEVICE), new.to(DEVICE), keep.to(DEVICE), start.to(DEVICE))
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("backend", [b for b in COMPILED if b != "cuda"])
def test_lookup_draft(backend: str) -> None:
    """Prompt lookup on random contexts over small vocabularies (many matches, loops), short ones,
    and a context longer than the Triton kernel's block, one row and several rows of different
    lengths at once: the same drafts as the reference, and each row's as if it were alone."""
    fn = get("lookup_draft", DEVICE, backend)
    g = torch.Generator().manual_seed(1)
    for L, vocab, k in [(1, 5, 3), (2, 2, 4), (3, 3, 1), (17, 2, 8), (40, 5, 6), (300, 50, 8), (1500, 7, 5), (1500, 4000, 4)]:
        history = torch.randint(0, vocab, (1, L + 20), generator=g)
        n_ctx = torch.tensor([L])
        want_n, got_n = torch.full((1,), -1), torch.full((1,), -1, device=DEVICE)
        want = reference.lookup_draft(history, n_ctx, k, want_n)
        got = fn(history.to(DEVICE), n_ctx.to(DEVICE), k, got_n)
        assert got.cpu().tolist() == want.tolist() and got_n.tolist() == want_n.tolist(), (L, vocab, k)
        assert torch.equal(fn(history.to(DEVICE), n_ctx.to(DEVICE), k).cpu(), want)  # the match's n only where asked
    history = torch.randint(0, 4, (5, 1300), generator=g)  # (B, Lh)
    n_ctx = torch.tensor([1, 3, 40, 1299, 700])
    want_n, got_n = torch.full((5,), -1), torch.full((5,), -1, device=DEVICE)
    want = reference.lookup_draft(history, n_ctx, 6, want_n)
    assert want.tolist() == [reference.lookup_draft(history[b : b + 1], n_ctx[b : b + 1], 6)[0].tolist() for b in range(5)]
    assert fn(history.to(DEVICE), n_ctx.to(DEVICE), 6, got_n).cpu().tolist() == want.tolist()
    assert got_n.tolist() == want_n.tolist() and want_n[0] == 0 and want_n[3] == 3
    if "cuda" in AVAILABLE:
        with pytest.raises(RuntimeError, match="Triton and PyTorch only"):
            get("lookup_draft", DEVICE, "cuda")


@pytest.mark.parametrize("backend", [b for b in COMPILED if b != "cuda"])
def test_step_feed(backend: str) -> None:
    """Each row's verify input is its context's last token, then its drafts, at positions n_ctx - 1
    on, whatever its neighbours' lengths; drafts read from a view of wider columns (a hook's)."""
    fn = get("step_feed", DEVICE, backend)
    g = torch.Generator().manual_seed(7)
    for B, K in [(1, 1), (1, 8), (3, 4), (5, 15)]:
        history = torch.randint(0, 1000, (B, 40), generator=g)
        n_ctx = torch.randint(1, 30, (B,), generator=g)
        cols = torch.randint(1000, 2000, (B, K + 3), generator=g)
        draft = cols[:, :K]  # (B, K), rows K + 3 apart
        feed, pos = fn(history.to(DEVICE), n_ctx.to(DEVICE), draft.to(DEVICE))
        want_feed, want_pos = reference.step_feed(history, n_ctx, draft)
        assert torch.equal(feed.cpu(), want_feed) and torch.equal(pos.cpu(), want_pos), (B, K)
        for b in range(B):  # the rule itself, row by row
            L = int(n_ctx[b])
            assert want_feed[b].tolist() == [int(history[b, L - 1]), *draft[b].tolist()]
            assert want_pos[b].tolist() == list(range(L - 1, L + K))
    if "cuda" in AVAILABLE:
        with pytest.raises(RuntimeError, match="Triton and PyTorch only"):
            get("step_feed", DEVICE, "cuda")


def test_opt_in_triton_kernels_are_chosen_only_when_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """step_feed's Triton kernel (no measurable gain on an H200) is chosen automatically only with LABKIT_GLUE_KERNELS=1;
    the kernels that were timed are chosen as before."""
    from labkit.kernels.registry import BackendStatus, _chosen_automatically

    compiled = BackendStatus("triton", True, "compiled")
    monkeypatch.delenv("LABKIT_GLUE_KERNELS", raising=False)
    assert not _chosen_automatically("step_feed", "triton", compiled) and _chosen_automatically("lookup_draft", "triton", compiled)
    assert _chosen_automatically("step_feed", "torch", BackendStatus("torch", True, "PyTorch reference"))
    monkeypatch.setenv("LABKIT_GLUE_KERNELS", "1")
    assert _chosen_automatically("step_feed", "triton", compiled)


@pytest.mark.parametrize("backend", [b for b in COMPILED if b != "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_verdict(backend: str, dtype: torch.dtype) -> None:
    """Logits that force a known answer (drafts matching the argmax up to a chosen row, EOS the
    argmax of a blocked row, ties broken to the first index), then random ones against the reference."""
    fn = get("greedy_verdict", DEVICE, backend)
    g = torch.Generator().manual_seed(3)
    V, eos = 5000, 17  # more than two vocabulary tiles, and not a multiple of one
    eos_mask = torch.zeros(V, dtype=torch.bool)
    eos_mask[eos] = True
    for B, T, match, block in [(1, 1, 0, 0), (1, 5, 2, 0), (1, 5, 4, 0), (2, 9, 3, 2), (1, 16, 15, 16), (1, 4, 1, -3)]:
        logits = torch.randn(B, T, V, generator=g)
        argmax = torch.randint(0, V, (B, T), generator=g)
        argmax[:, 0] = eos  # EOS is the first row's favourite: blocked there when block > 0
        logits.scatter_(2, argmax[..., None], 50.0)
        logits[:, 1:, V - 1] = 50.0  # a tie at the vocabulary's end: the first index wins
        logits[:, 0, 1234] = 40.0  # the runner-up of row 0
        tokens = torch.randint(0, V, (B, T), generator=g)
        tokens[:, 1 : match + 1] = argmax[:, :match]  # drafts 0..match-1 agree with the target
        if block > 0 and match > 0:
            tokens[:, 1] = 1234  # row 0's EOS is blocked: its runner-up is the token to agree with
        if match < T - 1:
            tokens[:, match + 1] = (argmax[:, match] + 1) % V  # and draft `match` does not agree
        block_rows = torch.tensor([block])
        want = reference.greedy_verdict(logits.to(dtype), tokens, eos_mask, block_rows)
        got = fn(logits.to(dtype).to(DEVICE), tokens.to(DEVICE), eos_mask.to(DEVICE), block_rows.to(DEVICE)).cpu()
        assert torch.equal(got, want), (B, T, match, block, got, want)
        assert want[:, 0].tolist() == [match] * B
        assert want[:, 1].tolist() == [1234 if match == 0 and block > 0 else int(argmax[b, match]) for b in range(B)]
    for _ in range(4):  # random logits and drafts
        logits = torch.randn(1, 6, V, generator=g).to(dtype)
        tokens = logits.argmax(-1)[:, [0, 0, 1, 2, 3, 4]]  # drafts that agree...
        tokens[0, 1 + int(torch.randint(0, 5, (1,), generator=g))] = 3  # ...up to a random row
        args = (logits, tokens, eos_mask, torch.tensor([2]))
        assert torch.equal(fn(*(a.to(DEVICE) for a in args)).cpu(), reference.greedy_verdict(*args))
    # a block count per batch row: EOS (every row's favourite at every position) blocked in the first 0 / 2 / 5 positions
    logits = torch.randn(3, 5, V, generator=g)
    logits[:, :, eos] = 50.0
    tokens = torch.full((3, 5), eos)  # drafts of EOS: accepted wherever EOS is not blocked
    got = fn(logits.to(dtype).to(DEVICE), tokens.to(DEVICE), eos_mask.to(DEVICE), torch.tensor([0, 2, 5]).to(DEVICE)).cpu()
    want = reference.greedy_verdict(logits.to(dtype), tokens, eos_mask, torch.tensor([0, 2, 5]))
    assert torch.equal(got, want) and want[:, 0].tolist() == [4, 0, 0] and want[:, 1].tolist()[0] == eos and eos not in want[1:, 1].tolist()


def test_greedy_verdict_with_the_block_known_on_the_host() -> None:
    """graphs.greedy_verdict given the block as a host int (an eager verify): the tensor form's
    verdict for every block, the argmax itself (no masked copy) where it is <= 0; EOS, every
    position's favourite, still blocked in the first `block` positions."""
    from labkit.graphs import greedy_verdict

    g = torch.Generator().manual_seed(5)
    V, eos = 3000, 11
    eos_mask = torch.zeros(V, dtype=torch.bool)
    eos_mask[eos] = True
    logits = torch.randn(2, 5, V, generator=g)
    logits[:, :, eos] = 50.0
    tokens = torch.full((2, 5), eos)  # drafts of EOS: accepted wherever EOS is not blocked
    for block in (-2, 0, 1, 3, 5):
        want = reference.greedy_verdict(logits, tokens, eos_mask, torch.tensor([block]))
        got = greedy_verdict(logits, tokens, eos_mask, block)
        assert torch.equal(got, want), (block, got, want)
        assert got[:, 0].tolist() == ([4, 4] if block <= 0 else [0, 0]) and (got[:, 1] == eos).all() == (block <= 0)
    # an eager verify (Engine.eager_verdict): EOS written into the step's own logits by the mask's ids,
    # kept per mask: two masks in turn each block their own EOS
    from labkit.graphs import EagerVerdict

    eager, other = EagerVerdict(), torch.zeros(V, dtype=torch.bool)
    other[12] = True
    logits[:, :, 12] = 49.0  # the runner-up: EOS under the other mask
    for mask, block in [(eos_mask, 3), (other, 2), (eos_mask, 1), (other, 5), (eos_mask, 0)]:
        want = reference.greedy_verdict(logits, tokens, mask, torch.tensor([block]))
        assert torch.equal(eager(logits.clone(), tokens, mask, block), want), (int(mask.nonzero()[0]), block)


@pytest.mark.parametrize("backend", [b for b in COMPILED if b != "cuda"])
def test_lookup_commit(backend: str) -> None:
    """Each row's drafts land after its context with the target's token at the first rejected one
    (or after all K), its context grows by accepted + 1, and the step is logged at step_idx, into
    logs that are views of wider ones (a batch's first rows)."""
    fn = get("lookup_commit", DEVICE, backend)
    g = torch.Generator().manual_seed(4)
    for K, accepted, step in [(1, [0], 0), (1, [1], 3), (4, [2, 0, 4], 1), (8, [8, 3], 7), (15, [0, 15, 7, 1], 2)]:
        B = len(accepted)
        history = torch.randint(0, 100, (B, 60), generator=g)
        feed = torch.randint(100, 200, (B, K + 1), generator=g)
        n_ctx = torch.tensor([20 + 3 * b for b in range(B)])
        state = [history, n_ctx, feed, torch.tensor([[a, 900 + b] for b, a in enumerate(accepted)]),
                 torch.randint(0, 9, (8, B + 2, K), generator=g), torch.randint(0, 9, (8, B + 2), generator=g), torch.tensor([step])]
        want = [t.clone() for t in state]
        reference.lookup_commit(*want[:4], want[4][:, :B], want[5][:, :B], want[6])
        got = [t.clone().to(DEVICE) for t in state]
        fn(*got[:4], got[4][:, :B], got[5][:, :B], got[6])
        for name, a, b in zip(("history", "n_ctx", "feed", "verdict", "drafts", "accepted", "step"), got, want, strict=True):
            assert torch.equal(a.cpu(), b), (K, accepted, name)
        for b, a in enumerate(accepted):
            L = 20 + 3 * b
            assert want[0][b, L : L + a].tolist() == feed[b, 1 : 1 + a].tolist() and int(want[0][b, L + a]) == 900 + b
            assert int(want[1][b]) == L + a + 1 and want[4][step, b].tolist() == feed[b, 1:].tolist() and int(want[5][step, b]) == a
        assert torch.equal(want[4][:, B:], state[4][:, B:]) and int(want[6]) == step + 1


def test_registry_prefers_the_fastest_available_and_honours_force_py(monkeypatch) -> None:
    rows = table(DEVICE)
    assert [r["kernel"] for r in rows] == list(KERNELS + FUSED_LAYER_OPS)
    assert all(r["cuda"].startswith("no") for r in rows if r["kernel"] in FUSED_LAYER_OPS + NO_CUDA)  # Triton and PyTorch only
    automatic = [b for b in AVAILABLE if backend_status(b, DEVICE).auto]
    assert rows[0]["chosen"] == automatic[0]
    if DEVICE.type == "cpu":  # the Triton interpreter works when named, but is never picked for real work
        assert rows[0]["chosen"] == "torch" and rows[0]["triton"].startswith("named only")
        assert get("verify_prefix", DEVICE) is reference.verify_prefix
    monkeypatch.setenv("SPECDEC_FORCE_PY", "1")
    assert all(r["chosen"] == "torch" for r in table(DEVICE))
    assert backend_status("triton", DEVICE).reason == "SPECDEC_FORCE_PY=1"


def test_the_built_kernel_is_keyed_by_the_cpu(monkeypatch, tmp_path) -> None:
    """A cache shared between machines: a CPU with other instruction sets builds its own kernel
    instead of loading one compiled with -march=native elsewhere."""
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path))
    cpu_quant._load.cache_clear()
    try:
        if not cpu_quant.available()[0]:
            pytest.skip("no C compiler")
        built = {p.name for p in (tmp_path / "kernels").glob("*.so")}
        monkeypatch.setattr(cpu_quant, "cpu_signature", lambda: "x86_64:fpu sse sse2")  # another machine
        cpu_quant._load.cache_clear()
        assert cpu_quant.available()[0]
        assert len({p.name for p in (tmp_path / "kernels").glob("*.so")} - built) == 1
    finally:
        cpu_quant._load.cache_clear()


def use_kernel_build(mp: pytest.MonkeyPatch, cache: Path | None, flags: str) -> None:
    """Load the kernel library built with LABKIT_CPU_KERNEL_FLAGS `flags` (into `cache`; None: the session's),
    skipping where this machine cannot take that path: instruction-set flags off x86, no compiler, an AVX2
    build without AVX2. The caller clears `cpu_quant._load`'s cache when done."""
    import platform

    if flags and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 instruction-set flags")
    if cache is not None:
        mp.setenv("LABKIT_CACHE", str(cache))
    mp.setenv("LABKIT_CPU_KERNEL_FLAGS", flags)
    cpu_quant._load.cache_clear()
    if not cpu_quant.available()[0]:
        pytest.skip(f"cpu_quant: {cpu_quant.available()[1]}")
    if "-mno-avx512f" in flags and "-mno-avx2" not in flags and "avx2" not in cpu_quant.cpu_signature().split():
        pytest.skip("this CPU has no AVX2")


@pytest.mark.parametrize("flags, path", [("-mno-avx512f", "avx2"), ("-mno-avx512f -mno-avx2 -mno-fma", "portable")])
def test_kernel_without_avx512_matches_reference(monkeypatch, tmp_path, flags: str, path: str) -> None:
    """The paths a CPU without AVX-512 takes (LABKIT_CPU_KERNEL_FLAGS), built and checked here
    even on a machine that has it: the same values as the reference, for every row count."""
    try:
        use_kernel_build(monkeypatch, tmp_path, flags)
        assert cpu_quant.kernel_path() == path
        for make in (random_q4, random_q8):
            qw = make(577, 576)
            for rows in (1, 3, 8, 11):  # one variant, a middle one, a full chunk, a chunk and a rest
                x = torch.randn(rows, 576)
                ours = cpu_quant.quant_linear(x, qw.kind, qw.qs, qw.d, qw.m)
                ref = quant_linear_ref(x, qw.kind, qw.qs, qw.d, qw.m)
                assert (ours - ref).abs().max().item() < 1e-5 * ref.abs().max().item() + 1e-5, (make.__name__, rows)
    finally:
        cpu_quant._load.cache_clear()


@pytest.mark.parametrize("target", TARGETS)
def test_block_kernel_builds_elsewhere_match_a_double_reference(tmp_path, target: str) -> None:
    """The paths this machine does not take, built as standalone programs (tests/native/check_gemv.c:
    every row count, Q4_1 and Q8_0, against a double-precision reference): the portable vector
    path with x86's SIMD extensions off, and aarch64 (NEON) cross builds by GCC and by clang run
    under qemu where they are installed (tests/native/build.py)."""
    out = build_and_run(Path(__file__).parent / "native" / "check_gemv.c", target, tmp_path)
    assert out.strip() == "ok portable", out
