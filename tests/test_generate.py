import pytest
import torch

from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.errors import LabkitError
from labkit.generate import generate
from labkit.models.tiny import TINY_ARCHS, tiny_hf_model
from labkit.sampling import warp_logits


def hf_greedy(hf, prompt: list[int], n: int, **kw) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_greedy_matches_hf_generate(arch: str) -> None:
    hf = tiny_hf_model(arch, seed=5)
    hf.generation_config.eos_token_id = None  # random weights: let both run the full length
    engine = Engine.from_hf(hf, "cpu", "float32")
    for seed in range(3):
        prompt = torch.randint(3, hf.config.vocab_size, (7 + seed,), generator=torch.Generator().manual_seed(seed)).tolist()
        ours = generate(engine, prompt, GenerationConfig(max_new_tokens=20)).tokens
        assert ours == hf_greedy(hf, prompt, 20), arch


def test_stops_at_eos_and_never_exceeds_max_tokens() -> None:
    hf = tiny_hf_model("llama", seed=5)
    engine = Engine.from_hf(hf, "cpu", "float32")
    prompt = [5, 6, 7, 8]
    free = generate(engine, prompt, GenerationConfig(max_new_tokens=12, stop_at_eos=False)).tokens
    assert len(free) == 12
    eos = free[4]  # pretend the fifth token is EOS: output must end right there
    first = free.index(eos)
    stopped = generate(engine, prompt, GenerationConfig(max_new_tokens=12, eos_token_ids=(eos,)))
    assert stopped.tokens == free[: first + 1]
    assert stopped.stats.stop_reason == "eos"
    for n in (1, 3, 7):
        result = generate(engine, prompt, GenerationConfig(max_new_tokens=n, stop_at_eos=False))
        assert len(result.tokens) == n and result.stats.stop_reason == "max_new_tokens"


def test_min_new_tokens_suppresses_eos_like_hf() -> None:
    hf = tiny_hf_model("llama", seed=5)
    engine = Engine.from_hf(hf, "cpu", "float32")
    prompt = [5, 6, 7, 8]
    free = generate(engine, prompt, GenerationConfig(max_new_tokens=12, stop_at_eos=False)).tokens
    eos = free[2]
    hf.generation_config.eos_token_id = eos
    ours = generate(engine, prompt, GenerationConfig(max_new_tokens=12, min_new_tokens=12, eos_token_ids=(eos,))).tokens
    assert len(ours) == 12 and eos not in ours
    assert ours == hf_greedy(hf, prompt, 12, min_new_tokens=12, eos_token_id=eos)


def test_context_limits() -> None:
    hf = tiny_hf_model("llama", seed=5)  # context 256
    engine = Engine.from_hf(hf, "cpu", "float32")
    with pytest.raises(LabkitError, match="context"):
        generate(engine, list(range(3, 259)), GenerationConfig(max_new_tokens=4))
    with pytest.raises(LabkitError, match="empty"):
        generate(engine, [], GenerationConfig(max_new_tokens=4))
    near_end = generate(engine, [7] * 250, GenerationConfig(max_new_tokens=50, stop_at_eos=False))
    assert len(near_end.tokens) == 6 and near_end.stats.stop_reason == "context"


def test_sampling_is_seeded_and_reproducible() -> None:
    hf = tiny_hf_model("llama", seed=5)
    engine = Engine.from_hf(hf, "cpu", "float32")
    cfg = dict(max_new_tokens=24, temperature=1.0, top_k=40, top_p=0.95, stop_at_eos=False)
    a = generate(engine, [5, 6, 7], GenerationConfig(seed=11, **cfg)).tokens
    b = generate(engine, [5, 6, 7], GenerationConfig(seed=11, **cfg)).tokens
    c = generate(engine, [5, 6, 7], GenerationConfig(seed=12, **cfg)).tokens
    assert a == b
    assert a != c


def test_top_k_one_is_greedy() -> None:
    hf = tiny_hf_model("gpt2", seed=5)
    engine = Engine.from_hf(hf, "cpu", "float32")
    greedy = generate(engine, [5, 6, 7], GenerationConfig(max_new_tokens=16, stop_at_eos=False)).tokens
    sampled = generate(engine, [5, 6, 7], GenerationConfig(max_new_tokens=16, temperature=0.7, top_k=1, seed=3, stop_at_eos=False)).tokens
    assert sampled == greedy


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(warp_logits(logits, 1.0, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(warp_logits(logits, 1.0, top_p=0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(warp_logits(logits, 1.0, top_p=0.81))
    assert kept.tolist() == [[True, True, True, False]]
    kept = torch.isfinite(warp_logits(logits, 1.0, top_k=3))
    assert kept.tolist() == [[True, True, True, False]]


def test_rows_sampled_together_draw_what_each_draws_alone() -> None:
    """sample_rows warps every row of a (temperature, top-k, top-p) group at once, yet row i's
    token is sample(row i, its config, its generator)'s, draw after draw, whatever else it is
    batched with (rows of two groups interleaved, in a different order the second time)."""
    from labkit.sampling import sample, sample_rows

    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(1)) * 3  # (n, V)
    configs = [GenerationConfig(temperature=0.9, top_p=0.95, seed=10 + i) if i % 2 else
               GenerationConfig(temperature=1.3, top_k=40, seed=10 + i) for i in range(6)]
    alone = [torch.Generator().manual_seed(c.seed) for c in configs]
    together = [torch.Generator().manual_seed(c.seed) for c in configs]
    for order in (list(range(6)), [5, 0, 3, 2, 1, 4]):
        for _ in range(20):
            want = [int(sample(logits[i : i + 1], configs[i], alone[i])[0]) for i in order]
            got = sample_rows(logits[order], [configs[i] for i in order], [together[i] for i in order]).tolist()
            assert got == want
    assert len(set(want)) > 2  # they do sample


def test_sampled_frequencies_follow_the_distribution() -> None:
    """Temperature-1 sampling of a fixed distribution: empirical frequencies within 4 sigma."""
    from labkit.sampling import sample

    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    logits = probs.log().expand(20000, 4)
    gen = torch.Generator().manual_seed(0)
    draws = sample(logits, GenerationConfig(temperature=1.0), gen)
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    sigma = (probs * (1 - probs) / draws.numel()).sqrt()
    assert ((freq - probs).abs() < 4 * sigma).all()


def test_stats_are_filled() -> None:
    hf = tiny_hf_model("llama", seed=5)
    engine = Engine.from_hf(hf, "cpu", "float32")
    s = generate(engine, [5, 6, 7], GenerationConfig(max_new_tokens=8, stop_at_eos=False)).stats
    assert s.new_tokens == 8 and s.prompt_tokens == 3
    assert len(s.token_latencies_ms) == 7 and all(x > 0 for x in s.token_latencies_ms)
    assert 0 < s.ttft_s < s.total_s and s.tok_per_s > 0
    assert s.peak_memory_bytes > 0 and s.memory_kind == "process_peak_rss"


def test_greedy_chunks_match_single_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several greedy steps per host sync (the GPU path) give the tokens of one step at a time,
    stop at an EOS inside a chunk, and keep EOS blocked for min_new_tokens."""
    hf = tiny_hf_model("llama", seed=5)
    engine = Engine.from_hf(hf, "cpu", "float32")
    prompt = [5, 6, 7, 8]
    free = generate(engine, prompt, GenerationConfig(max_new_tokens=20, stop_at_eos=False)).tokens
    eos = free[6]
    cfgs = [GenerationConfig(max_new_tokens=20, stop_at_eos=False), GenerationConfig(max_new_tokens=20, eos_token_ids=(eos,)),
            GenerationConfig(max_new_tokens=20, min_new_tokens=9, eos_token_ids=(eos,))]
    singles = [generate(engine, prompt, c) for c in cfgs]
    monkeypatch.setattr(Engine, "greedy_chunk", property(lambda self: 5))
    for cfg, single in zip(cfgs, singles, strict=True):
        chunked = generate(engine, prompt, cfg)
        assert chunked.tokens == single.tokens
        assert chunked.stats.stop_reason == single.stats.stop_reason
        assert chunked.stats.tau == 1.0 or chunked.stats.stop_reason == "eos"
    assert singles[1].tokens == free[: free.index(eos) + 1]
    assert eos not in singles[2].tokens[:9] and len(singles[2].tokens) > 9


def test_detailed_metrics_time_each_phase_and_cost_nothing_when_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from labkit.generate import Speculation
    from labkit.metrics import phases
    from labkit.specdec import make_drafter

    syncs = []
    monkeypatch.setattr(phases, "synchronize", lambda device: syncs.append(device))
    hf = tiny_hf_model("llama", seed=5)
    engine = Engine.from_hf(hf, "cpu", "float32")
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]  # repeats: the n-gram drafter proposes
    cfg = GenerationConfig(max_new_tokens=12, stop_at_eos=False)
    spec = Speculation(make_drafter("layerskip", engine, layers=1), 2)
    off = generate(engine, prompt, cfg, spec, detailed_metrics=False)
    assert off.stats.phases is None and syncs == []
    monkeypatch.setenv("SPECDEC_DETAILED_METRICS", "1")
    on = generate(engine, prompt, cfg, spec)
    assert on.tokens == off.tokens and syncs
    p = on.stats.phases
    assert p is not None and {"prefill", "draft", "verify", "accept", "kv_update", "sampling"} <= set(p["host_s"])
    assert p["count"]["verify"] + p["count"].get("decode", 0) == on.stats.target_steps and all(v >= 0 for v in p["host_s"].values())
    assert p["device_s"] == {}  # CUDA events only on a CUDA device


def test_two_threads_on_one_engine_each_get_their_own_answer() -> None:
    """Two threads calling generate on one engine (and one drafter) at once: each answer is the one
    a lone call gives (the engine lets one request in at a time), five times over."""
    import threading

    from labkit.generate import Speculation
    from labkit.specdec import make_drafter

    engine = Engine.from_hf(tiny_hf_model("llama", seed=6), "cpu", "float32")
    drafter = make_drafter("layerskip", engine, layers=1)
    cfg = GenerationConfig(max_new_tokens=40, stop_at_eos=False)
    prompts = [[5, 6, 7, 8, 9, 10], [40, 41, 42, 43, 40, 41, 42]]
    alone = [generate(engine, p, cfg).tokens for p in prompts]
    for _ in range(5):
        got: dict[int, list[int]] = {}

        def run(i: int, got: dict[int, list[int]] = got) -> None:
            got[i] = generate(engine, prompts[i], cfg, Speculation(drafter, 3) if i else None).tokens

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [got[0], got[1]] == alone


@pytest.mark.parametrize("bad", [
    dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature=1e-45), dict(temperature=-1.0),
    dict(max_new_tokens=2.5), dict(max_new_tokens=True), dict(top_k=1.5), dict(top_p=float("nan")),
])
def test_generation_config_refuses_what_it_cannot_sample(bad: dict) -> None:
    with pytest.raises(LabkitError):
        GenerationConfig(**bad).validate()


def test_bad_prompts_are_one_clear_error() -> None:
    """Token ids the model does not have, chat messages without a role, text that is not UTF-8,
    a depth of 0 layers, K past the limit: each a LabkitError, none a raw IndexError or a silent default."""
    from labkit.generate import Speculation, encode_prompt
    from labkit.specdec import make_drafter

    engine = Engine.from_hf(tiny_hf_model("llama", seed=1), "cpu", "float32")
    cfg = GenerationConfig(max_new_tokens=2)
    for ids in ([5, 96], [5, -1], [5, 2.0]):
        with pytest.raises(LabkitError, match="token ids"):
            generate(engine, ids, cfg)  # type: ignore[arg-type]
    for messages in ([{"content": "hi"}], [{"role": "user"}], ["hi"], [{"role": "user", "content": "a\udcff"}]):
        with pytest.raises(LabkitError):
            encode_prompt(None, messages)  # type: ignore[arg-type]
    with pytest.raises(LabkitError, match="UTF-8"):
        encode_prompt(None, "caf\udce9")
    with pytest.raises(LabkitError, match="layers"):
        make_drafter("layerskip", engine, layers=0)
    with pytest.raises(LabkitError, match="at most 64"):
        generate(engine, [5, 6], cfg, Speculation(make_drafter("ngram", engine), 1000))


def test_damaged_heads_files_are_explained(tmp_path) -> None:
    from labkit.specdec.heads import fingerprint, load_heads, save_heads
    from tests.test_heads import random_heads

    engine = Engine.from_hf(tiny_hf_model("llama", seed=1), "cpu", "float32")
    print_ = fingerprint(engine.model.lm_head.weight)
    folder = save_heads(random_heads(engine.args.dim, 2), tmp_path / "h", print_)
    assert load_heads(folder, print_) is not None
    (folder / "heads.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(LabkitError, match="heads.safetensors"):
        load_heads(folder, print_)
    (folder / "heads.json").write_text("{ broken")
    with pytest.raises(LabkitError, match="heads.json"):
        load_heads(folder, print_)
