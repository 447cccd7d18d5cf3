"""The embedded SmolLM2-135M-Instruct: our engine against transformers on real weights."""

import pytest
import torch

from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.generate import encode_prompt, generate
from labkit.prompts import load_suite


@pytest.fixture(scope="module")
def engine(embedded):
    return Engine.from_hf(embedded.hf_model, "cpu", "float32")


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


def test_greedy_identical_to_hf_generate_on_the_whole_suite(embedded, engine) -> None:
    mismatches = []
    for prompt in load_suite():
        ids = encode_prompt(embedded.tokenizer, prompt.content)
        ours = generate(engine, ids, GenerationConfig(max_new_tokens=20)).tokens
        t = torch.tensor([ids])
        with torch.no_grad():
            ref = embedded.hf_model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=20, do_sample=False)
        if ours != ref[0, len(ids):].tolist():
            mismatches.append(prompt.id)
    assert mismatches == []


def test_chat_template_is_applied_by_default(embedded) -> None:
    with_chat = encode_prompt(embedded.tokenizer, "Hello")
    without = encode_prompt(embedded.tokenizer, "Hello", chat=False)
    assert len(with_chat) > len(without)
    assert "<|im_start|>" in embedded.tokenizer.decode(with_chat)
