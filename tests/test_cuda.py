"""The engine on a CUDA card (skipped on machines without one): parity with transformers there."""

import pytest
import torch

from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.engine_warmup import warm_up_steps
from labkit.generate import generate
from labkit.models.tiny import TINY_ARCHS, tiny_hf_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_cuda_fp32_logits_and_greedy_match_hf(arch: str) -> None:
    hf = tiny_hf_model(arch, seed=7).cuda()
    hf.generation_config.eos_token_id = None
    engine = Engine.from_hf(hf, "cuda", "float32", batch_size=2, max_seq_len=64)
    ids = torch.randint(0, hf.config.vocab_size, (2, 20), device="cuda")
    with torch.no_grad():
        ref = hf(ids).logits
    ours = torch.cat([engine.forward(ids[:, :12]), engine.verify(ids[:, 12:20])], 1)
    assert (ours - ref).abs().max().item() < 1e-3
    single = Engine.from_hf(hf, "cuda", "float32")
    prompt = ids[0, :9].tolist()
    with torch.no_grad():
        hf_out = hf.generate(ids[:1, :9], attention_mask=torch.ones_like(ids[:1, :9]), max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert generate(single, prompt, GenerationConfig(max_new_tokens=16)).tokens == hf_out[0, 9:].tolist()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_half_precision_is_close(dtype: str) -> None:
    hf = tiny_hf_model("llama", seed=7).cuda()
    ids = torch.randint(0, hf.config.vocab_size, (1, 16), device="cuda")
    with torch.no_grad():
        ref = hf(ids).logits
    out = Engine.from_hf(hf, "cuda", dtype).forward(ids).float()
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_cuda_peak_memory_is_reported() -> None:
    hf = tiny_hf_model("gpt2", seed=7).cuda()
    s = generate(Engine.from_hf(hf, "cuda", "float32"), [5, 6, 7], GenerationConfig(max_new_tokens=4, stop_at_eos=False)).stats
    assert s.memory_kind == "cuda_max_allocated" and s.peak_memory_bytes > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
def test_cuda_graph_steps_match_eager(arch: str) -> None:
    from labkit.generate import Speculation
    from labkit.specdec import make_drafter

    hf = tiny_hf_model(arch, seed=8).cuda()
    eager = Engine.from_hf(hf, "cuda", "float32", cuda_graph=False)
    graphed = Engine.from_hf(hf, "cuda", "float32", cuda_graph=True)
    ids = torch.randint(0, hf.config.vocab_size, (1, 20), device="cuda")
    outs = []
    for engine in (eager, graphed):
        engine.ensure_capacity(40)
        steps = [engine.forward(ids[:, :8], last_only=True)[:, -1]]
        steps += [engine.decode(ids[:, i : i + 1]).clone() for i in range(8, 12)]
        steps += list(engine.verify(ids[:, 12:17]).clone()[0])
        engine.rollback(14)
        steps += list(engine.verify(ids[:, 14:20]).clone()[0])
        outs.append(torch.cat([s.reshape(-1, s.shape[-1]) for s in steps]))
    assert graphed.graphs.keys(), "no graph was captured"
    assert (outs[0] - outs[1]).abs().max().item() < 1e-3
    cfg = GenerationConfig(max_new_tokens=24, stop_at_eos=False)
    prompt = ids[0, :9].tolist()
    plain = generate(eager, prompt, cfg).tokens
    assert generate(graphed, prompt, cfg).tokens == plain
    for kind in ("ngram", "layerskip", "truncated"):
        assert generate(graphed, prompt, cfg, Speculation(make_drafter(kind, graphed, layers=2), 3)).tokens == plain, kind



@pytest.mark.parametrize("compile", [False, True])
def test_cuda_greedy_graph_chunks_match_eager(compile: bool) -> None:
    """The captured greedy step (argmax, EOS blocking and position inside the graph) gives the
    eager engine's tokens, with EOS inside a chunk and min_new_tokens."""
    hf = tiny_hf_model("llama", seed=9).cuda()
    eager = Engine.from_hf(hf, "cuda", "float32", cuda_graph=False)
    graphed = Engine.from_hf(hf, "cuda", "float32", cuda_graph=True, compile=compile)
    prompt = list(range(3, 14))
    free = generate(eager, prompt, GenerationConfig(max_new_tokens=40, stop_at_eos=False)).tokens
    eos = free[20]
    for cfg in (GenerationConfig(max_new_tokens=40, stop_at_eos=False), GenerationConfig(max_new_tokens=40, eos_token_ids=(eos,)),
                GenerationConfig(max_new_tokens=40, min_new_tokens=30, eos_token_ids=(eos,))):
        assert generate(graphed, prompt, cfg).tokens == generate(eager, prompt, cfg).tokens
    assert any(key[0] == "greedy" for key in graphed.graphs.keys())


def test_cuda_detailed_metrics_use_events() -> None:
    from labkit.generate import Speculation
    from labkit.specdec import make_drafter

    hf = tiny_hf_model("llama", seed=9).cuda()
    engine = Engine.from_hf(hf, "cuda", "float32", cuda_graph=True)
    cfg = GenerationConfig(max_new_tokens=20, stop_at_eos=False)
    r = generate(engine, list(range(3, 14)), cfg, Speculation(make_drafter("layerskip", engine, layers=1), 3), detailed_metrics=True)
    p = r.stats.phases
    assert p is not None and p["device_s"]["verify"] > 0 and set(p["device_s"]) == set(p["host_s"])


def test_cuda_warm_up_captures_every_verify_width() -> None:
    hf = tiny_hf_model("llama", seed=9).cuda()
    engine = Engine.from_hf(hf, "cuda", "float32", cuda_graph=True)
    warm_up_steps(engine, 5)
    steps = [key[1:5] for key in engine.graphs.keys() if key[0] == "step"]  # (T, n_layers, greedy, hook)
    widths = {T for T, _, greedy, _ in steps if not greedy}
    greedy_widths = {T for T, _, greedy, _ in steps if greedy}
    assert widths == set(range(1, 17)) and greedy_widths == set(range(2, 6))  # verify widths up to K+1 = 5
    assert not any(heads for *_, heads in steps)  # no heads attached: no verify drafts with them
    assert any(key[0] == "greedy" for key in engine.graphs.keys()) and engine.length == 0


@pytest.mark.parametrize("compile", [False, True])
def test_cuda_long_inputs_run_as_graph_chunks(compile: bool) -> None:
    """A prompt longer than a captured step runs as chunks of graph replays: same logits as eager."""
    hf = tiny_hf_model("llama", seed=9).cuda()
    eager = Engine.from_hf(hf, "cuda", "float32", cuda_graph=False)
    graphed = Engine.from_hf(hf, "cuda", "float32", cuda_graph=True, compile=compile)
    warm_up_steps(graphed, 4)
    ids = torch.randint(0, hf.config.vocab_size, (1, 41), device="cuda")
    outs = []
    for engine in (eager, graphed):
        engine.ensure_capacity(60)
        full = engine.forward(ids[:, :37]).clone()
        last = engine.prefill(ids[:, 37:41]).clone()
        engine.ensure_capacity(60)
        outs.append((full, last, engine.prefill(ids).clone()))
    for a, b in zip(outs[0], outs[1], strict=True):
        assert a.shape == b.shape and (a - b).abs().max().item() < 1e-3
    assert len([key for key in graphed.graphs.keys() if key[0] == "step"]) >= 16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_fused_layers_match_torch_layers(dtype: str) -> None:
    """CUDA graphs over the fused Triton layers against the PyTorch layers: logits close, and in
    fp32 the same greedy tokens (plain chunks and speculative)."""
    from labkit.generate import Speculation
    from labkit.specdec import make_drafter

    hf = tiny_hf_model("llama", seed=11).cuda()
    torch_layers = Engine.from_hf(hf, "cuda", dtype, cuda_graph=True, layer_kernels="torch")
    fused = Engine.from_hf(hf, "cuda", dtype, cuda_graph=True, layer_kernels="auto")
    assert fused.layer_kernels == "triton", fused.layer_kernels_reason
    ids = torch.randint(0, hf.config.vocab_size, (1, 40), device="cuda")
    outs = []
    for engine in (torch_layers, fused):
        engine.ensure_capacity(60)
        outs.append(torch.cat([engine.forward(ids[:, :33]).clone(), engine.decode(ids[:, 33:34])[:, None].clone(),
                               engine.verify(ids[:, 34:]).clone()], 1).float())
    scale = outs[0].abs().max().item()
    assert (outs[0] - outs[1]).abs().max().item() < (1e-4 if dtype == "float32" else 0.05) * scale
    if dtype == "float32":
        cfg = GenerationConfig(max_new_tokens=40, stop_at_eos=False)
        prompt = ids[0, :9].tolist() * 2
        want = generate(torch_layers, prompt, cfg).tokens
        assert generate(fused, prompt, cfg).tokens == want
        assert any(key[0] == "greedy" for key in fused.graphs.keys())
        for kind in ("ngram", "layerskip"):
            assert generate(fused, prompt, cfg, Speculation(make_drafter(kind, fused, layers=2), 3)).tokens == want, kind


def test_cuda_cost_aware_calibrates_on_graphs_and_stays_lossless() -> None:
    """The cost table is timed through the captured steps; afterwards a request still decodes with
    graphs (the calibration must not leave the cache too small for them) and matches plain greedy."""
    from labkit.generate import Speculation
    from labkit.specdec import make_drafter
    from labkit.specdec.controllers import CostAware

    hf = tiny_hf_model("llama", seed=9).cuda()
    engine = Engine.from_hf(hf, "cuda", "float32", cuda_graph=True)
    warm_up_steps(engine, 5)
    prompt = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]
    cfg = GenerationConfig(max_new_tokens=40, stop_at_eos=False)
    want = generate(engine, prompt, cfg).tokens
    c = CostAware(4)
    got = generate(engine, prompt, cfg, Speculation(make_drafter("ngram", engine), 4, None, c)).tokens
    assert got == want and c.verify_table is not None and sorted(c.verify_table) == [0, 1, 2, 3, 4]
    assert all(t > 0 for t in c.verify_table.values()) and engine.graphs_safe


@pytest.mark.parametrize("layer_kernels,fused", [("torch", False), ("auto", False), ("torch", True), ("auto", True)])
def test_cuda_heads_read_the_captured_hidden_state(layer_kernels: str, fused: bool) -> None:
    """With CUDA graphs (and the fused layers where Triton is there) the draft heads read the
    hidden state the captured verify wrote, at the right row, and decoding stays lossless; fused:
    the heads run inside the captured verify and their draft is the one made after it."""
    from labkit.generate import Speculation
    from labkit.specdec.drafters import HeadsDrafter
    from tests.test_heads import _CheckedFusedHeads, _CheckedHeads, random_heads

    hf = tiny_hf_model("llama", seed=4).cuda()
    engine = Engine.from_hf(hf, "cuda", "float32", cuda_graph=True, layer_kernels=layer_kernels)
    drafter = (_CheckedFusedHeads if fused else _CheckedHeads)(HeadsDrafter(engine, random_heads(engine.args.dim, 3)))
    warm_up_steps(engine, 4, hook=drafter.verify_hook)
    prompt = list(range(3, 40))
    cfg = GenerationConfig(max_new_tokens=40, stop_at_eos=False)
    want = generate(engine, prompt, cfg).tokens
    result = generate(engine, prompt, cfg, Speculation(drafter, 3))
    assert result.tokens == want and drafter.checked >= 10 and engine.graphs_safe
    assert drafter.prepared in ((drafter.checked - 1, drafter.checked) if fused else (0,))
    hooked = {key[1] for key in engine.graphs.keys() if key[0] == "step" and key[4] is not None}
    assert hooked == ({2, 3, 4} if fused else set())  # warm-up captured the verifies the heads draft after (K <= 3)


@pytest.mark.parametrize("layer_kernels", ["torch", "auto"])
def test_cuda_eagle_drafts_inside_the_captured_verify(layer_kernels: str) -> None:
    """EAGLE's catch-up and chain captured inside the verify step: plain greedy's tokens, and the
    drafts the host-side catch-up makes (fp32: the same sums either way); with device steps (the
    default on CUDA graphs: 8 captured steps per host read, each verifying the chain the step
    before drafted) the same steps again."""
    from labkit.generate import Speculation
    from labkit.specdec.eagle_drafter import EagleDrafter
    from tests.test_eagle import random_head

    hf = tiny_hf_model("llama", seed=4).cuda()
    engine = Engine.from_hf(hf, "cuda", "float32", cuda_graph=True, layer_kernels=layer_kernels)
    drafter = EagleDrafter(engine, random_head(depth=4), device_steps=False)
    warm_up_steps(engine, 5, hook=drafter.verify_hook)
    prompt, cfg = list(range(3, 60)), GenerationConfig(max_new_tokens=60, stop_at_eos=False)
    want = generate(engine, prompt, cfg).tokens
    fused = generate(engine, prompt, cfg, Speculation(drafter, 4))
    host = generate(engine, prompt, cfg, Speculation(drafter, 4), detailed_metrics=True)
    assert fused.tokens == want and host.tokens == want and engine.graphs_safe
    assert fused.stats.draft_tokens == host.stats.draft_tokens
    hooked = {key[1] for key in engine.graphs.keys() if key[0] == "step" and key[4] is not None}
    assert hooked == {2, 3, 4, 5}
    stepper = EagleDrafter(engine, random_head(depth=4))
    assert stepper.device_steps is stepper
    steps = generate(engine, prompt, cfg, Speculation(stepper, 4))
    n = next(i for i, d in enumerate(host.stats.draft_tokens) if len(d) < 4)  # the host drafts fewer at the budget's end
    assert steps.tokens == want and steps.stats.draft_tokens[:n] == host.stats.draft_tokens[:n] and n >= 8
    assert any(key[0] == "eagle-steps" for key in engine.graphs.keys())


@pytest.mark.parametrize("layer_kernels", ["torch", "auto"])
def test_cuda_eagle_ngram_copy_and_chain_steps_run_captured(layer_kernels: str, monkeypatch) -> None:
    """eagle-ngram's device steps on CUDA graphs, chunks of copy and chain steps in turn: plain
    greedy's tokens, both kinds captured, and the chain after copy steps the one a fresh drafter
    makes from the whole context (fp32)."""
    from labkit.generate import Speculation
    from labkit.specdec.eagle_drafter import EagleDrafter
    from tests.test_eagle import random_head

    hf = tiny_hf_model("llama", seed=4).cuda()
    engine = Engine.from_hf(hf, "cuda", "float32", cuda_graph=True, layer_kernels=layer_kernels)
    monkeypatch.setattr(EagleDrafter, "next_copying", lambda self, *chunk: not self.copying)
    prompt, cfg = [5, 6, 7, 8, 9, 10, 11] * 3 + list(range(40, 60)), GenerationConfig(max_new_tokens=80, stop_at_eos=False)
    want = generate(engine, prompt, cfg).tokens
    drafter = EagleDrafter(engine, random_head(depth=4), lookup_over=3)
    got = generate(engine, prompt, cfg, Speculation(drafter, 4))
    assert got.tokens == want and engine.graphs_safe
    kinds = {key[0] for key in engine.graphs.keys()}
    assert {"eagle-steps", "eagle-copy-steps"} <= kinds
    assert any(len(d) == 8 for d in got.stats.draft_tokens) and any(len(d) == 4 for d in got.stats.draft_tokens)


def test_cuda_only_where_runs_its_block_only_where_the_flag_holds(monkeypatch) -> None:
    """A captured graph's IF node (graphs.only_where, on by default; PyTorch's own or kernels/graph_if.cu):
    each replay runs the block where the device flag holds then, and skips it elsewhere; the block's
    own allocations come from the graph's pool, and the work after the node sees the block's.
    LABKIT_IF_NODES=0 turns them off."""
    from labkit.graphs import if_nodes, only_where

    monkeypatch.setenv("LABKIT_IF_NODES", "0")
    assert not if_nodes()
    monkeypatch.delenv("LABKIT_IF_NODES")
    if not if_nodes():
        from labkit.kernels import cuda_ops

        pytest.skip(f"no CUDA graph IF nodes here (PyTorch has none; labkit's own: {cuda_ops.graph_if()[1]})")
    flag = torch.zeros(1, dtype=torch.bool, device="cuda")
    x = torch.zeros(1, device="cuda")
    y = torch.zeros(1, device="cuda")
    pool = torch.cuda.graph_pool_handle()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up: the block runs
        x.add_(torch.ones_like(x))
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph, pool=pool):
        with only_where(flag, pool):
            x.add_(torch.ones_like(x))  # a new tensor inside the body: its memory from the pool
        y.copy_(x * 10)  # after the node, on the capture's own stream
    x.zero_()
    seen = []
    for f in (False, True, True, False, True):
        flag.fill_(f)
        graph.replay()
        seen.append((x.item(), y.item()))
    assert seen == [(0, 0), (1, 10), (2, 20), (2, 20), (3, 30)]
    from labkit.graphs import if_nodes_status

    assert if_nodes_status() in ("PyTorch's", "labkit's")  # what results files record
    from labkit.doctor import run_doctor

    assert run_doctor(torch.device("cuda"), [], torch.bfloat16).cuda_graph_if_nodes == if_nodes_status()  # and doctor says


def test_cuda_warm_up_builds_the_if_nodes_device_steps_may_capture() -> None:
    """warm_up with a drafter that has device steps asks for CUDA graph IF nodes, so labkit's own are
    built then (a minute at a machine's first use), not inside a request."""
    from labkit.generate import warm_up
    from labkit.graphs import if_nodes_status
    from labkit.kernels import cuda_ops
    from labkit.specdec.eagle_mix import EagleMixDrafter
    from tests.test_eagle import random_head

    engine = Engine.from_hf(tiny_hf_model("llama", seed=4).cuda(), "cuda", "float32", cuda_graph=True)
    cuda_ops.graph_if.cache_clear()
    assert if_nodes_status() in ("not yet asked", "PyTorch's")
    warm_up(engine, 4, prompt_len=64, drafter=EagleMixDrafter(engine, random_head(depth=4), device_steps=True))
    assert if_nodes_status() != "not yet asked"


@pytest.mark.parametrize("layer_kernels", ["torch", "auto"])
@pytest.mark.parametrize("unsure, lazy", [(None, 0), (0.6, 0), (None, 64)])
def test_cuda_eagle_mix_steps_run_captured(layer_kernels: str, unsure: float | None, lazy: int) -> None:
    """eagle-mix's device steps on CUDA graphs (the chain in an IF node), eagle-agree's (unsure: its
    choice asks the chain's first draft) and eagle-lazy's (the catch-up in the IF node too, over 64
    positions: the whole of this request's copies): plain greedy's tokens, and the drafts of the same
    steps run eagerly (fp32), copies and chains both met."""
    from labkit.generate import Speculation
    from labkit.specdec.eagle_mix import EagleMixDrafter
    from labkit.specdec.lookup import latest_match
    from tests.test_eagle import random_head

    prompt, cfg = [5, 6, 7, 8, 9, 10, 11] * 3 + list(range(40, 60)), GenerationConfig(max_new_tokens=80, stop_at_eos=False)
    runs = []
    for graphs in (True, False):
        engine = Engine.from_hf(tiny_hf_model("llama", seed=4).cuda(), "cuda", "float32", cuda_graph=graphs, layer_kernels=layer_kernels)
        want = generate(engine, prompt, cfg).tokens
        got = generate(engine, prompt, cfg, Speculation(EagleMixDrafter(engine, random_head(depth=4), min_n=1, unsure=unsure, lazy=lazy,
                                                                   device_steps=True), 4))
        assert got.tokens == want
        runs.append(got.stats)
        if graphs:
            assert engine.graphs_safe and any(key[0] == "eagle-mix-steps" for key in engine.graphs.keys())
    assert runs[0].draft_tokens == runs[1].draft_tokens
    ctx, kinds = prompt + want[:1], set()
    for accepted in runs[0].accepted_lengths:
        kinds.add(latest_match(ctx, 1, 1) is not None)
        ctx = prompt + want[: len(ctx) - len(prompt) + accepted + 1]
    assert kinds == {True, False}


@pytest.mark.parametrize("layer_kernels", ["torch", "auto"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_token_trees_run_captured_and_stay_lossless(layer_kernels: str, dtype: str) -> None:
    """Token trees verified as captured graphs (one per shape; the fused layers' tree mask, or the
    PyTorch layers' boolean one): plain greedy's tokens for every shape, and EAGLE's trees too."""
    from labkit.generate import Speculation
    from labkit.specdec.eagle_drafter import EagleDrafter
    from tests.test_eagle import random_head
    from tests.test_trees import SHAPES, OracleTreeDrafter

    hf = tiny_hf_model("llama", seed=4).cuda()
    engine = Engine.from_hf(hf, "cuda", dtype, cuda_graph=True, layer_kernels=layer_kernels)
    prompt, cfg = list(range(3, 60)), GenerationConfig(max_new_tokens=60, stop_at_eos=False)
    want = generate(engine, prompt, cfg).tokens
    for name, paths in sorted(SHAPES.items()):
        drafter = OracleTreeDrafter(want, len(prompt), paths, engine.args.vocab_size, seed=len(name))
        got = generate(engine, prompt, cfg, Speculation(drafter, max(len(p) for p in paths)))
        assert got.tokens == want, name
        assert sum(got.stats.accepted_lengths) >= 15, name
    trees = {key[1:3] for key in engine.graphs.keys() if key[0] == "tree"}  # (nodes, depth): one captured step each
    assert trees == {(5, 1), (4, 3), (8, 3), (8, 4)} and engine.graphs_safe
    eagle = generate(engine, prompt, cfg, Speculation(EagleDrafter(engine, random_head(depth=3), width=3), 3))
    assert eagle.tokens == want
    if layer_kernels == "auto":  # EAGLE-2's dynamic trees: the draft layer's tree attention on the Triton kernels
        from labkit.specdec.eagle_tree import DynamicTreeConfig

        dynamic = EagleDrafter(engine, random_head(depth=3), tree=DynamicTreeConfig(depth=3, expand=2, width=3, nodes=7))
        got = generate(engine, prompt, cfg, Speculation(dynamic, 3))
        assert got.tokens == want and got.stats.tree_steps


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cuda_tree_nodes_get_a_chain_verifys_bits_for_their_path(dtype: str) -> None:
    """On the fused Triton layers a tree node's logits are a chain verify's of its path, bit for bit,
    in bf16 too (the tree's attention lays each path out where the chain's tokens sit)."""
    from labkit.specdec.tree import TokenTree
    from tests.test_trees import SHAPES, tree_and_path_logits

    engine = Engine.from_hf(tiny_hf_model("llama", seed=4).cuda(), "cuda", dtype)
    assert engine.layer_kernels == "triton"
    prompt = list(range(3, 90))
    engine.prefill(torch.tensor([prompt[:-1]], device="cuda"))
    for name in ("binary", "lopsided", "wide"):
        tree = TokenTree.from_paths(SHAPES[name])
        tree_logits, chains = tree_and_path_logits(engine, tree, [prompt[-1], *range(40, 40 + tree.size - 1)], engine.length)
        assert all(torch.equal(tree_logits[t], chain) for t, chain in enumerate(chains)), name


@pytest.mark.parametrize("layer_kernels", ["torch", "auto"])
def test_cuda_lookup_steps_run_as_one_graph_and_stay_lossless(layer_kernels: str) -> None:
    """The n-gram graph drafter: lookup, verify and acceptance captured as one CUDA graph and
    replayed several times per host read; tokens identical to plain greedy (and to the same steps
    run eagerly), EOS blocked while asked."""
    from labkit.generate import Speculation
    from labkit.specdec.drafters import make_drafter

    hf = tiny_hf_model("llama", seed=4).cuda()
    graphed = Engine.from_hf(hf, "cuda", "float32", cuda_graph=True, layer_kernels=layer_kernels)
    eager = Engine.from_hf(hf, "cuda", "float32", cuda_graph=False, layer_kernels=layer_kernels)
    prompt = [3, 4, 5, 6, 3, 4, 5, 6, 3, 4] * 3
    for min_new in (0, 30):
        cfg = GenerationConfig(max_new_tokens=60, min_new_tokens=min_new, eos_token_ids=(7,))
        want = generate(graphed, prompt, cfg).tokens
        drafter = make_drafter("ngram-graph", graphed)
        got = generate(graphed, prompt, cfg, Speculation(drafter, 4))
        assert got.tokens == want and drafter.steps_for(4).graph is not None
        assert generate(eager, prompt, cfg, Speculation(make_drafter("ngram-graph", eager), 4)).tokens == want
        assert got.stats.accepted_lengths and all(len(d) == 4 for d in got.stats.draft_tokens)


def _long_tiny(context: int = 2048):
    hf = tiny_hf_model("llama", seed=4)
    hf.config.max_position_embeddings = context
    return hf.cuda()


@pytest.mark.parametrize("layer_kernels", ["torch", "auto"])
def test_cuda_long_request_after_a_short_one_for_every_drafter(layer_kernels: str) -> None:
    """The crash the long-context issue reported: a short request, then a 926-token prompt with the
    n-gram graph drafter at K=8 (past the 1,024 positions the cache once started with). Every
    drafter, on captured graphs: plain greedy's tokens, and the CUDA context still alive."""
    from labkit.generate import Speculation
    from labkit.specdec.drafters import ModelDrafter, make_drafter
    from tests.test_eagle import random_head
    from tests.test_heads import random_heads

    hf = _long_tiny()
    # bf16 where the fused layers run (their rows never share a reduction, so a verify gives a
    # decode step's bits); fp32 for the PyTorch layers, whose GEMMs pick kernels by row count
    dtype = "bfloat16" if layer_kernels == "auto" else "float32"
    engine = Engine.from_hf(hf, "cuda", dtype, cuda_graph=True, layer_kernels=layer_kernels)
    self_draft = Engine.from_hf(hf, "cuda", dtype, cuda_graph=True, layer_kernels=layer_kernels)
    drafters = {"ngram": make_drafter("ngram", engine), "ngram-graph": make_drafter("ngram-graph", engine),
                "layerskip": make_drafter("layerskip", engine, layers=2), "truncated": make_drafter("truncated", engine, layers=1),
                "self-model": ModelDrafter(self_draft, 96, name="self"), "heads": make_drafter("heads", engine, heads=random_heads(engine.args.dim, 4)),
                "eagle": make_drafter("eagle", engine, heads=random_head(depth=4))}
    warm_up_steps(engine, 8)
    cfg = GenerationConfig(max_new_tokens=128, stop_at_eos=False)
    g = torch.Generator().manual_seed(0)
    short = torch.randint(3, 96, (30,), generator=g).tolist()
    long = torch.randint(3, 96, (926,), generator=g).tolist()
    for prompt in (short, long):
        want = generate(engine, prompt, cfg).tokens
        for name, drafter in drafters.items():
            k = 4 if name in ("heads", "eagle") else 8
            got = generate(engine, prompt, cfg, Speculation(drafter, k))
            assert got.tokens == want, (name, len(prompt))
    assert engine.graphs_safe and any(key[0] == "lookup" for key in engine.graphs.keys())
    torch.cuda.synchronize()


def test_cuda_one_pass_prefill_is_deterministic_and_close_to_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1,500-token prompt as one captured pass (cuBLAS GEMMs, flash attention, padded to 2,048):
    the same bits run to run, the eager pass's values, and close to the same prompt fed as
    16-token captured steps of the fused layers."""
    import labkit.engine as eng

    hf = _long_tiny()
    engine = Engine.from_hf(hf, "cuda", "bfloat16", cuda_graph=True)
    ids = torch.randint(0, 96, (1, 1500), device="cuda")
    runs = []
    for _ in range(3):
        engine.ensure_capacity(1500)
        runs.append((engine.prefill(ids).clone(), engine.cache.k[:, :, :, :1500].clone()))
    assert all(torch.equal(r[0], runs[0][0]) and torch.equal(r[1], runs[0][1]) for r in runs)
    assert any(key[:2] == ("prefill", 2048) for key in engine.graphs.keys())
    scale = runs[0][0].float().abs().max().item()
    monkeypatch.setattr(eng, "PREFILL_GRAPHS", False)
    engine.ensure_capacity(1500)
    eager = engine.prefill(ids).float()
    assert (eager - runs[0][0].float()).abs().max().item() < 0.02 * scale
    monkeypatch.setattr(eng, "PREFILL_GRAPH_CHUNKS_MAX_T", 10**9)
    engine.ensure_capacity(1500)
    chunked = engine.prefill(ids).float()
    assert (chunked - runs[0][0].float()).abs().max().item() < 0.05 * scale


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cuda_captured_prompt_pass_matches_eager_at_every_bucket(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts of 17 to 200 tokens (buckets 32 to 256, padded) through the captured pass: the
    eager engine's logits at the last token, and its greedy tokens after it. (Prompts of up to 48
    tokens run as captured chunks by default; here every prompt past 16 takes the one pass.)"""
    import labkit.engine as eng
    from labkit.graphs import GRAPH_MAX_T

    monkeypatch.setattr(eng, "PREFILL_GRAPH_CHUNKS_MAX_T", GRAPH_MAX_T)
    hf = tiny_hf_model(arch, seed=12).cuda()
    eager = Engine.from_hf(hf, "cuda", "float32", cuda_graph=False)
    graphed = Engine.from_hf(hf, "cuda", "float32", cuda_graph=True)
    warm_up_steps(graphed, 1, prompt_len=256)
    assert {key[1] for key in graphed.graphs.keys() if key[0] == "prefill"} == {32, 64, 128, 256}
    cfg = GenerationConfig(max_new_tokens=20, stop_at_eos=False)
    for T in (17, 31, 32, 33, 100, 200):
        ids = torch.randint(0, 96, (1, T), device="cuda")
        outs = []
        for engine in (eager, graphed):
            engine.ensure_capacity(T + 20)
            outs.append(engine.prefill(ids).clone())
        assert (outs[0] - outs[1]).abs().max().item() < 1e-3, T
        assert generate(graphed, ids[0].tolist(), cfg).tokens == generate(eager, ids[0].tolist(), cfg).tokens, T


def test_cuda_graphs_are_captured_again_after_a_resize() -> None:
    """Resizing drops every captured graph, their pool included (PyTorch cannot capture into a pool
    whose graphs are all gone): the next requests capture afresh on the new cache and stay lossless,
    also right at the end of the cache, where capture warm-ups use the headroom past max_seq_len."""
    from labkit.generate import Speculation
    from labkit.specdec.drafters import make_drafter

    hf = _long_tiny()
    engine = Engine.from_hf(hf, "cuda", "bfloat16", cuda_graph=True, max_seq_len=512)
    drafter = make_drafter("ngram-graph", engine)
    warm_up_steps(engine, 4)
    cfg = GenerationConfig(max_new_tokens=64, stop_at_eos=False)
    prompt = torch.randint(3, 96, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    want = generate(engine, prompt, cfg).tokens
    assert generate(engine, prompt, cfg, Speculation(drafter, 4)).tokens == want
    engine.resize(2048)
    assert engine.graphs.keys() == []
    warm_up_steps(engine, 4)
    full = torch.randint(3, 96, (2048 - 64,), generator=torch.Generator().manual_seed(2)).tolist()  # fills the cache exactly
    for p in (prompt, full):
        plain = generate(engine, p, cfg)
        assert engine.graphs_safe, "the last positions of the cache still run on graphs"
        assert generate(engine, p, cfg, Speculation(drafter, 4)).tokens == plain.tokens
    assert generate(engine, prompt, cfg).tokens == want  # the same tokens on the new cache
