"""Our forward against transformers' on the same weights (fp32 CPU): max |Δlogit| < 1e-4."""

import pytest
import torch

from labkit.engine import Engine
from labkit.engine_warmup import warm_up_steps
from labkit.errors import LabkitError
from labkit.models.tiny import TINY_ARCHS, tiny_hf_model

TOL = 1e-4


@pytest.fixture(scope="module", params=TINY_ARCHS)
def pair(request: pytest.FixtureRequest):
    hf = tiny_hf_model(request.param, seed=1)
    return request.param, hf


def hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids).logits  # (B, T, V)


def test_full_forward_matches_hf(pair) -> None:
    arch, hf = pair
    engine = Engine.from_hf(hf, "cpu", "float32", batch_size=2, max_seq_len=64)
    ids = torch.randint(0, hf.config.vocab_size, (2, 24))  # > mistral's window of 8
    ours = engine.forward(ids)
    ref = hf_logits(hf, ids)
    assert ref.abs().max() > 1.0  # a real signal, not zeros
    assert (ours - ref).abs().max().item() < TOL, arch


def test_incremental_steps_match_hf(pair) -> None:
    """Prefill, single-token decode steps, then a multi-token verify: every position matches."""
    arch, hf = pair
    engine = Engine.from_hf(hf, "cpu", "float32", batch_size=2, max_seq_len=64)
    ids = torch.randint(0, hf.config.vocab_size, (2, 22))
    parts = [engine.forward(ids[:, :10])]
    parts += [engine.decode(ids[:, i : i + 1])[:, None] for i in range(10, 17)]
    parts.append(engine.verify(ids[:, 17:22]))
    ours = torch.cat(parts, dim=1)
    assert engine.length == 22
    assert (ours - hf_logits(hf, ids)).abs().max().item() < TOL, arch


def test_rollback_forgets_rejected_positions(pair) -> None:
    arch, hf = pair
    engine = Engine.from_hf(hf, "cpu", "float32", max_seq_len=64)
    ids = torch.randint(0, hf.config.vocab_size, (1, 16))
    engine.forward(ids[:, :8])
    engine.verify(torch.randint(0, hf.config.vocab_size, (1, 5)))  # a draft that gets rejected
    engine.rollback(8)
    ours = engine.verify(ids[:, 8:16])
    assert (ours - hf_logits(hf, ids)[:, 8:16]).abs().max().item() < TOL, arch


def test_prefill_returns_last_position_only() -> None:
    hf = tiny_hf_model("llama", seed=2)
    engine = Engine.from_hf(hf, "cpu", "float32")
    ids = torch.randint(0, hf.config.vocab_size, (1, 9))
    last = engine.prefill(ids)
    assert last.shape == (1, hf.config.vocab_size)
    assert (last - hf_logits(hf, ids)[:, -1]).abs().max().item() < TOL


def test_sliding_window_is_applied() -> None:
    """The Mistral test above would pass by luck if the window did nothing: check it bites."""
    hf = tiny_hf_model("mistral", seed=1)
    engine = Engine.from_hf(hf, "cpu", "float32")
    ids = torch.randint(0, hf.config.vocab_size, (1, 20))
    windowed = engine.forward(ids)
    engine.args.sliding_window = None
    engine.reset()
    full = engine.forward(ids)
    assert (windowed - full).abs().max().item() > 1e-2


def test_cache_is_sized_once_for_the_context() -> None:
    """The cache is allocated at load for the whole context (or --max-seq-len) and no request moves
    it; a request past it is one clear error; resize is the one way to move it."""
    hf = tiny_hf_model("llama", seed=2)  # context 256
    engine = Engine.from_hf(hf, "cpu", "float32")
    assert engine.cache is not None and engine.max_seq_len == 256 and engine.cache.max_len == 256 + engine.headroom
    cache = engine.cache
    ids = torch.randint(0, hf.config.vocab_size, (1, 250))
    engine.ensure_capacity(250)
    assert engine.cache is cache and (engine.forward(ids) - hf_logits(hf, ids)).abs().max().item() < TOL
    with pytest.raises(LabkitError, match="context"):
        engine.ensure_capacity(257)
    small = Engine.from_hf(hf, "cpu", "float32", max_seq_len=16)
    with pytest.raises(LabkitError, match="max-seq-len"):
        small.ensure_capacity(100)
    small.resize(128)
    assert small.max_seq_len == 128
    small.ensure_capacity(100)
    assert (small.forward(ids[:, :90]) - hf_logits(hf, ids[:, :90])).abs().max().item() < TOL
    for bad in (0, 1, 257, 2.5, True):
        with pytest.raises(LabkitError, match="max-seq-len"):
            Engine.from_hf(hf, "cpu", "float32", max_seq_len=bad)  # type: ignore[arg-type]


def test_half_precision_runs_close_to_fp32() -> None:
    hf = tiny_hf_model("llama", seed=2)
    ids = torch.randint(0, hf.config.vocab_size, (1, 12))
    ref = hf_logits(hf, ids)
    for dtype in ("bfloat16", "float16"):
        engine = Engine.from_hf(hf, "cpu", dtype)
        out = engine.forward(ids).float()
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert (out - ref).abs().max().item() < 0.1 * ref.abs().max().item(), dtype


def test_amp_keeps_fp32_weights() -> None:
    hf = tiny_hf_model("llama", seed=2)
    engine = Engine.from_hf(hf, "cpu", "bfloat16", amp=True)
    assert next(engine.model.parameters()).dtype == torch.float32
    ids = torch.randint(0, hf.config.vocab_size, (1, 12))
    ref = hf_logits(hf, ids)
    assert (engine.forward(ids).float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


@pytest.mark.slow  # inductor compiles C++ for each step shape: 36 s of a 2-core CI machine (make test-slow runs it)
def test_compiled_static_step_matches_eager() -> None:
    hf = tiny_hf_model("qwen2", seed=4)
    ids = torch.randint(0, hf.config.vocab_size, (1, 14))
    engine = Engine.from_hf(hf, "cpu", "float32", compile=True, max_seq_len=32)
    steps = [engine.forward(ids[:, :6], last_only=True)]  # prefill stays eager
    steps += [engine.decode(ids[:, i : i + 1])[:, None] for i in range(6, 10)]
    steps.append(engine.verify(ids[:, 10:14]))
    ref = hf_logits(hf, ids)
    assert (torch.cat(steps[1:], 1) - ref[:, 6:]).abs().max().item() < TOL


def test_cuda_graph_needs_cuda_device() -> None:
    with pytest.raises(LabkitError, match="CUDA graphs"):
        Engine.from_hf(tiny_hf_model("llama"), "cpu", "float32", cuda_graph=True)


def test_warm_up_leaves_the_engine_ready_and_empty() -> None:
    hf = tiny_hf_model("llama", seed=1)
    engine = Engine.from_hf(hf, "cpu", "float32")
    warm_up_steps(engine, 5)
    assert engine.length == 0
    ids = torch.randint(0, hf.config.vocab_size, (1, 9))
    engine.ensure_capacity(9)
    with torch.no_grad():
        ref = hf(ids).logits
    assert (engine.forward(ids) - ref).abs().max().item() < 1e-4


def greedy_by_policy(engine: Engine, feed: torch.Tensor, eos_mask: torch.Tensor, block_rows: int) -> list[int]:
    """What the loop did before verify_greedy: logits, EOS blocked in the first rows, GreedyMatch."""
    from labkit.config import GenerationConfig
    from labkit.specdec.policies import GreedyMatch

    logits = engine.verify(feed)[0].clone()  # (K+1, V)
    rows = max(0, min(block_rows, logits.shape[0]))
    logits[:rows] = logits[:rows].masked_fill(eos_mask, float("-inf"))
    verdict = GreedyMatch().accept(feed[0, 1:], None, logits, GenerationConfig(), None)
    return [verdict.accepted, verdict.next_token]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA"))])
def test_verify_greedy_decides_like_the_greedy_policy(device: str) -> None:
    """verify_greedy (one captured graph on CUDA) gives GreedyMatch's verdict on the verify
    logits, with EOS blocked in the first block_rows positions, and leaves the cache as verify does."""
    hf = tiny_hf_model("llama", seed=5)
    engine = Engine.from_hf(hf, device, "float32", cuda_graph=device == "cuda")
    prompt = torch.randint(0, hf.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0)).to(device)
    engine.ensure_capacity(40)
    engine.prefill(prompt)
    start = engine.length
    greedy = engine.decode_greedy(prompt[:, -1:], 4)  # (1, 4): drafts that the target accepts in full
    engine.rollback(start)
    feeds = {"all stand": torch.cat([prompt[:, -1:], greedy], 1),
             "first wrong": torch.cat([prompt[:, -1:], (greedy + 1) % hf.config.vocab_size], 1)}
    seen = set()
    for name, feed in feeds.items():
        for eos in (None, int(greedy[0, 0])):  # EOS = the target's first choice: blocking it changes the verdict
            eos_mask = torch.zeros(hf.config.vocab_size, dtype=torch.bool, device=device)
            if eos is not None:
                eos_mask[eos] = True
            for block_rows in (0, 2, -3):
                engine.rollback(start)
                want = greedy_by_policy(engine, feed, eos_mask, block_rows)
                engine.rollback(start)
                got = engine.verify_greedy(feed, eos_mask, block_rows)[0].tolist()
                assert got == want, (name, eos, block_rows)
                assert engine.length == start + feed.shape[1]
                seen.add(tuple(want))
                if name == "all stand" and (eos is None or block_rows <= 0):
                    assert want[0] == 4
                if name == "first wrong" or (eos is not None and block_rows > 0):
                    assert want[0] == 0
    assert len(seen) >= 3  # the cases lead to different verdicts


def test_auto_weights_say_why_a_gguf_model_reads_dense_weights(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A GGUF model on the CPU reads its quantised blocks unless the kernel is unavailable (as
    under SPECDEC_FORCE_PY=1): then the engine reads the dense weights and says why."""
    from labkit.kernels import cpu_quant
    from labkit.models.loading import LoadedModel

    loaded = LoadedModel("tiny", "tiny", tiny_hf_model("llama"), None, gguf_path=tmp_path / "model.gguf")
    monkeypatch.setattr(cpu_quant, "available", lambda: (False, "SPECDEC_FORCE_PY=1"))
    engine = Engine.from_loaded(loaded, "cpu", "float32")
    assert engine.weights == "dense" and "SPECDEC_FORCE_PY=1" in engine.weights_note
    assert Engine.from_loaded(loaded, "cpu", "float32", weights="dense").weights_note == ""  # asked for: nothing to say
    with pytest.raises(LabkitError, match="SPECDEC_FORCE_PY=1"):
        Engine.from_loaded(loaded, "cpu", "float32", weights="gguf")


def test_opt_variants_it_cannot_run_are_refused_clearly() -> None:
    """OPT-350m's projected embeddings and post-LayerNorm layers would run wrong in GPT-2's shape: refused."""
    from transformers import AutoModelForCausalLM

    from labkit.models.tiny import tiny_config

    for change, words in (({"word_embed_proj_dim": 32}, "projected embeddings"), ({"do_layer_norm_before": False}, "LayerNorm after")):
        config = tiny_config("opt")
        for key, value in change.items():
            setattr(config, key, value)
        with pytest.raises(LabkitError, match=words):
            Engine.from_hf(AutoModelForCausalLM.from_config(config), "cpu", "float32")
