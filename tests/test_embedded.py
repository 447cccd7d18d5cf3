"""The embedded SmolLM2-135M-Instruct: our engine against transformers on real weights."""

import pytest
import torch

from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.generate import encode_prompt, generate
from labkit.prompts import load_suite


@pytest.fixture(scope="module")
def engine(embedded):
    return Engine.from_loaded(embedded, "cpu", "float32", weights="dense")


@pytest.fixture(scope="module")
def gguf_engine(embedded):
    from labkit.kernels import cpu_quant

    if not cpu_quant.available()[0]:
        pytest.skip(f"cpu_quant kernel: {cpu_quant.available()[1]}")
    return Engine.from_loaded(embedded, "cpu", "float32", weights="gguf")


def test_embedded_model_is_the_real_smollm2(embedded) -> None:
    cfg = embedded.hf_model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert embedded.tokenizer.chat_template is not None


def test_logits_match_hf(embedded, engine) -> None:
    ids = torch.tensor([encode_prompt(embedded.tokenizer, "Why is the sky blue? Answer briefly.")])
    with torch.no_grad():
        ref = embedded.hf_model(ids).logits
    engine.ensure_capacity(ids.shape[1] + 1)
    ours = engine.forward(ids)
    assert (ours - ref).abs().max().item() < 1e-4


def test_gguf_blocks_hold_exactly_hfs_weights(gguf_engine) -> None:
    """Dequantising our blocks (q/k rows un-permuted) gives the fp32 weights transformers loaded."""
    from labkit.models.gguf_weights import QuantLinear, QuantWeight

    layers = [m for m in gguf_engine.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 4 * 30 + 1
    for layer in layers:
        blocks = QuantWeight(layer.kind, layer.qs, layer.d, layer.m).dequantize()
        assert (blocks - layer.weight).abs().max().item() <= 1e-6 * layer.weight.abs().max().item()


def test_gguf_decode_steps_match_hf(embedded, gguf_engine) -> None:
    ids = torch.tensor([encode_prompt(embedded.tokenizer, "Name three rivers in Europe.")])
    with torch.no_grad():
        ref = embedded.hf_model(ids).logits
    gguf_engine.ensure_capacity(ids.shape[1] + 1)
    gguf_engine.forward(ids[:, :4])
    steps = torch.stack([gguf_engine.decode(ids[:, i : i + 1]) for i in range(4, ids.shape[1])], 1)  # the block path
    # Same weights, but summed per block as d*sum(q*x) + m*sum(x): fp32 rounding differs a
    # little more than the dense path's (seen: 1.5e-4 on logits of magnitude ~20).
    assert (steps - ref[:, 4:]).abs().max().item() < 1e-5 * ref.abs().max().item() + 2e-4


@pytest.mark.parametrize("per_category", [1, pytest.param(None, marks=pytest.mark.slow)])  # the whole suite: make test-slow
def test_greedy_identical_to_hf_generate_on_the_suite(embedded, engine, gguf_engine, per_category) -> None:
    mismatches = []
    for prompt in load_suite(per_category=per_category):
        ids = encode_prompt(embedded.tokenizer, prompt.content)
        t = torch.tensor([ids])
        with torch.no_grad():
            ref = embedded.hf_model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
        for name, eng in (("dense", engine), ("gguf", gguf_engine)):
            if generate(eng, ids, GenerationConfig(max_new_tokens=20)).tokens != ref:
                mismatches.append((name, prompt.id))
    assert mismatches == []


def test_chat_template_is_applied_by_default(embedded) -> None:
    with_chat = encode_prompt(embedded.tokenizer, "Hello")
    without = encode_prompt(embedded.tokenizer, "Hello", chat=False)
    assert len(with_chat) > len(without)
    assert "<|im_start|>" in embedded.tokenizer.decode(with_chat)


@pytest.mark.parametrize("ks, other_ks", [((1, 3, 8), (3,)), pytest.param(tuple(range(1, 9)), (1, 3, 8), marks=pytest.mark.slow)])
def test_speculation_is_lossless_on_the_suite(embedded, gguf_engine, ks, other_ks) -> None:
    """Every drafter, one prompt per category of the suite: identical to plain greedy. Prompt lookup
    at K 1, 3, 8 and the layer drafters and n-gram trees (through the C layer operations' tree
    mask) at K 3 in make test; K 1 to 8 and 1, 3, 8 in make test-slow."""
    from labkit.generate import Speculation
    from labkit.specdec import make_drafter

    cfg = GenerationConfig(max_new_tokens=16)
    drafters = {kind: make_drafter(kind, gguf_engine, layers=10) for kind in ("ngram", "layerskip", "truncated", "ngram-tree")}
    mismatches, tree_steps = [], 0
    for prompt in load_suite(per_category=1):
        ids = encode_prompt(embedded.tokenizer, prompt.content)
        plain = generate(gguf_engine, ids, cfg).tokens
        for kind, drafter in drafters.items():
            for k in ks if kind == "ngram" else other_ks:
                result = generate(gguf_engine, ids, cfg, Speculation(drafter, k))
                tree_steps += len(result.stats.tree_steps)
                if result.tokens != plain:
                    mismatches.append((prompt.id, kind, k))
    assert mismatches == [] and tree_steps >= 3


def test_auto_weights_keep_the_path_a_timed_decode_step_finds_faster(embedded, gguf_engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """--weights auto times a decode step reading the GGUF blocks and one reading the dense
    weights, and keeps the faster (never slower than dense): here with the timings made up,
    then the real timing on this CPU."""
    import labkit.engine_choices as choices_module
    from labkit.engine_choices import time_block_weights
    from labkit.models.gguf_weights import QuantLinear

    def uses_blocks(engine: Engine) -> set[bool]:
        return {m.use_blocks for m in engine.model.modules() if isinstance(m, QuantLinear)}

    monkeypatch.setattr(choices_module, "time_block_weights", lambda engine: (2.0, 1.0))
    slower_blocks = Engine.from_loaded(embedded, "cpu", "float32")
    assert slower_blocks.weights == "dense" and uses_blocks(slower_blocks) == {False}
    assert "GGUF blocks 2.0 ms, dense 1.0 ms" in slower_blocks.weights_note
    monkeypatch.setattr(choices_module, "time_block_weights", lambda engine: (1.0, 2.0))
    faster_blocks = Engine.from_loaded(embedded, "cpu", "float32")
    assert faster_blocks.weights == "gguf" and uses_blocks(faster_blocks) == {True}
    blocks_ms, dense_ms = time_block_weights(gguf_engine)
    assert blocks_ms > 0 and dense_ms > 0 and uses_blocks(gguf_engine) == {True} and gguf_engine.length == 0
