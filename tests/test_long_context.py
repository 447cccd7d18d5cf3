"""Long prompts: the one-pass prefill against transformers, the cache sized once, captured state
dropped with the cache, and greedy speculation identical to plain decoding on a long request that
follows a short one, for every drafter."""

import os

import pytest
import torch

from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.errors import LabkitError
from labkit.generate import Speculation, generate
from labkit.models.kvcache import CAUSAL
from labkit.models.tiny import tiny_hf_model
from labkit.specdec import ModelDrafter, make_drafter
from tests.test_eagle import random_head
from tests.test_heads import random_heads

CONTEXT = 1536


def long_model(arch: str = "llama", seed: int = 5):
    hf = tiny_hf_model(arch, seed=seed)
    hf.config.max_position_embeddings = CONTEXT
    if arch == "mistral":
        hf.config.sliding_window = 64
    return hf


def long_prompt(n: int, seed: int = 0) -> list[int]:
    """Random tokens with a repeated passage in the middle, so prompt lookup has something to copy."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (n,), generator=g).tolist()
    passage = ids[100:160]
    ids[n - 200 : n - 140] = passage
    ids[n - 60 :] = passage
    return ids


@torch.no_grad()
def hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    return hf(ids).logits


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_one_pass_prefill_matches_transformers(arch: str) -> None:
    """A 1,000-token prompt in one pass (flash attention from position 0), and a second long input
    appended after it (a masked pass), against transformers' forward over the whole text."""
    hf = long_model(arch) if arch != "gpt2" else tiny_hf_model("gpt2", seed=5)
    n = 1000 if arch != "gpt2" else 200
    engine = Engine.from_hf(hf, "cpu", "float32")
    ids = torch.randint(0, 96, (1, n + 40))
    want = hf_logits(hf, ids)
    engine.ensure_capacity(n + 40)
    first = engine.forward(ids[:, :n])
    second = engine.forward(ids[:, n:])  # 40 new tokens after 1,000: queries at positions 1000..1039
    got = torch.cat([first, second], 1)
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(), reason="Triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("T", [20])
def test_a_prompt_pass_through_the_fused_kernels_has_their_16_token_steps_bits(T: int) -> None:
    """A prompt's causal pass of up to the kernels' PROMPT_MAX_T tokens runs through the fused layers
    (in one pass, eager or captured and padded): its last logits, the keys and values it leaves in the
    cache and every position's kept hidden state are what 16-token fused steps over the prompt give,
    to the bit (so batched admission's staged rows, which run such steps, keep batch-1 prefill's bits)."""
    from labkit.graphs import GRAPH_MAX_T, prefill_bucket
    from labkit.kernels import layer_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = Engine.from_hf(long_model(), device, "float32", max_seq_len=512, layer_kernels="triton")
    engine.keep_hidden_states(every_position=True)  # (EAGLE's loads read them)
    assert T <= layer_triton.PROMPT_MAX_T and engine.prefills_fused(T) and not engine.prefills_fused(layer_triton.PROMPT_MAX_T + 1)
    ids = torch.randint(3, 96, (1, T), generator=torch.Generator().manual_seed(T)).to(device)  # (1, T)
    engine.ensure_capacity(T + 1)
    hidden = []
    for c0 in range(0, T, GRAPH_MAX_T):  # 16-token steps, as captured chunks and staged rows run
        want = engine.forward(ids[:, c0 : c0 + GRAPH_MAX_T])[:, -1]  # (1, V)
        hidden.append(engine.model.last_hidden)
    want_hidden, keys, values = torch.cat(hidden, 1), engine.cache.k[:, :, :, :T].clone(), engine.cache.v[:, :, :, :T].clone()
    engine.ensure_capacity(T + 1)
    assert torch.equal(engine.prefill(ids), want)  # one eager pass from position 0
    assert torch.equal(engine.hidden_span(0, T), want_hidden)
    assert torch.equal(engine.cache.k[:, :, :, :T], keys) and torch.equal(engine.cache.v[:, :, :, :T], values)
    bucket = prefill_bucket(T)  # what graphs.PrefillGraph captures: the prompt padded with junk, its last row picked
    padded = torch.cat([ids, torch.randint(3, 96, (1, bucket - T), device=device)], 1)
    engine.ensure_capacity(bucket)
    assert torch.equal(engine.prompt_pass(padded, torch.arange(bucket, device=device), torch.tensor([T - 1], device=device))[:, 0], want)
    assert torch.equal(engine.model.last_hidden[:, :T], want_hidden)
    assert torch.equal(engine.cache.k[:, :, :, :T], keys) and torch.equal(engine.cache.v[:, :, :, :T], values)


def test_prompts_from_position_zero_are_plain_causal() -> None:
    engine = Engine.from_hf(long_model(), "cpu", "float32")
    pos = torch.arange(0, 300)
    assert engine.cache is not None
    assert engine.cache.mask(pos, 300, None, start=0) == CAUSAL
    assert isinstance(engine.cache.mask(pos + 5, 305, None, start=5), torch.Tensor)  # after a cached prefix
    assert isinstance(engine.cache.mask(pos, 300, 64, start=0), torch.Tensor)  # a window that bites


def test_long_inputs_run_in_chunks_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past PREFILL_CHUNK tokens an input runs as several passes: the same logits."""
    import labkit.engine as eng

    hf = long_model()
    engine = Engine.from_hf(hf, "cpu", "float32")
    ids = torch.randint(0, 96, (1, 700))
    engine.ensure_capacity(700)
    whole = engine.forward(ids)
    monkeypatch.setattr(eng, "PREFILL_CHUNK", 256)
    engine.ensure_capacity(700)
    assert (engine.forward(ids) - whole).abs().max().item() < 1e-4
    engine.ensure_capacity(700)
    assert (engine.prefill(ids) - whole[:, -1]).abs().max().item() < 1e-4


def drafters(target: Engine) -> dict:
    self_draft = Engine.from_hf(long_model(), "cpu", "float32")  # the target's own weights: drafts stand
    return {
        "ngram": make_drafter("ngram", target),
        "ngram-graph": make_drafter("ngram-graph", target),
        "layerskip": make_drafter("layerskip", target, layers=2),
        "truncated": make_drafter("truncated", target, layers=1),
        "self-model": ModelDrafter(self_draft, 96, name="self"),
        "heads": make_drafter("heads", target, heads=random_heads(target.args.dim, 4)),
        "layerskip+confidence": make_drafter("layerskip", target, layers=2, stop_below=0.3),
        "ngram-tree": make_drafter("ngram-tree", target),  # token trees whose slots lie deep in the cache
        "eagle-tree": make_drafter("eagle-tree", target, heads=random_head(depth=4)),  # EAGLE-2's expansion after 1,250 elements
    }


@pytest.mark.parametrize("k", [1, 8])
def test_long_request_after_a_short_one_is_lossless_for_every_drafter(k: int) -> None:
    """A short request, then one of 1,300 positions (past the 1,024 the cache once started with):
    every drafter's greedy output is plain greedy's, and drafts were proposed (and, from the
    target's own weights, stood: rollbacks deep in a long context are exercised)."""
    target = Engine.from_hf(long_model(), "cpu", "float32")
    cfg = GenerationConfig(max_new_tokens=32, stop_at_eos=False)
    short, long = long_prompt(40)[:40], long_prompt(1250, seed=1)
    for name, drafter in drafters(target).items():
        kk = min(k, 4) if name in ("heads", "eagle-tree") else k
        for prompt in (short, long):
            want = generate(target, prompt, cfg).tokens
            got = generate(target, prompt, cfg, Speculation(drafter, kk))
            assert got.tokens == want, (name, k, len(prompt))
            assert sum(got.stats.drafted_lengths) > 0, (name, "nothing was drafted")
        if name == "self-model":
            assert got.stats.acceptance_rate == 1.0, (name, got.stats.acceptance_rate)


def test_resize_drops_every_captured_step() -> None:
    """Whatever holds addresses into the cache lives in the engine and goes with it: after a resize
    the drafter's device steps are built again, on the new cache, and stay lossless."""
    target = Engine.from_hf(long_model(), "cpu", "float32", max_seq_len=512)
    drafter = make_drafter("ngram-graph", target)
    cfg = GenerationConfig(max_new_tokens=40, stop_at_eos=False)
    prompt = long_prompt(400, seed=2)
    want = generate(target, prompt, cfg).tokens
    assert generate(target, prompt, cfg, Speculation(drafter, 4)).tokens == want
    before = drafter.steps_for(4)
    assert any(key[0] == "lookup" for key in target.graphs.keys())
    with pytest.raises(LabkitError, match="max-seq-len"):
        generate(target, long_prompt(600), cfg)
    target.resize(1200)
    assert target.graphs.keys() == []
    long = long_prompt(1100, seed=3)
    want = generate(target, long, cfg).tokens
    got = generate(target, long, cfg, Speculation(drafter, 4))
    after = drafter.steps_for(4)
    assert got.tokens == want and after is not before and after.history.shape[0] > before.history.shape[0]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(), reason="Triton needs CUDA or TRITON_INTERPRET=1")
def test_fused_layers_on_a_long_prompt_match_torch_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused engine prefills through the PyTorch layers and then decodes with the split-K
    attention (six splits over a 330-token context): the same tokens as the
    PyTorch layers, plain and with prompt lookup."""
    from labkit.kernels import layer_triton as tri

    monkeypatch.setitem(tri.TUNE, "attn_split_s", 64)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = long_model()
    torch_layers = Engine.from_hf(hf, device, "float32", layer_kernels="torch")
    fused = Engine.from_hf(hf, device, "float32", layer_kernels="triton")
    cfg = GenerationConfig(max_new_tokens=6, stop_at_eos=False)
    prompt = long_prompt(330, seed=4)
    want = generate(torch_layers, prompt, cfg).tokens
    assert generate(fused, prompt, cfg).tokens == want
    assert generate(fused, prompt, cfg, Speculation(make_drafter("ngram-graph", fused), 4)).tokens == want


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_padded_prompt_pass_gives_the_prompts_logits(arch: str) -> None:
    """What a captured prompt pass does (graphs.PrefillGraph): the prompt padded to a power of two
    with junk, logits taken at its last real row: the same as the prompt alone, and the cache
    holds the prompt's own keys and values."""
    hf = long_model(arch) if arch != "gpt2" else tiny_hf_model("gpt2", seed=5)
    engine = Engine.from_hf(hf, "cpu", "float32")
    ids = torch.randint(0, 96, (1, 100))
    engine.ensure_capacity(128)
    want = engine.prefill(ids)
    assert engine.cache is not None
    keys = engine.cache.k[:, :, :, :100].clone()
    padded = torch.cat([ids, torch.randint(0, 96, (1, 28))], 1)  # (1, 128)
    engine.ensure_capacity(128)
    got = engine.prompt_pass(padded, torch.arange(128), torch.tensor([99]))  # (1, 1, V)
    assert got.shape == (1, 1, 96) and (got[:, 0] - want).abs().max().item() < 1e-4
    assert (engine.cache.k[:, :, :, :100] - keys).abs().max().item() < 1e-5
