"""Medusa-style draft heads: labels, the untrained start, training on a learnable pattern, files."""

import pytest
import torch
from torch import nn

from labkit.errors import LabkitError
from labkit.specdec.draft import Drafter
from labkit.specdec.heads import IGNORE, DraftHeads, HeadsConfig, fingerprint, head_labels, heads_loss, load_heads, save_heads


def test_head_labels_shift_each_head_one_token_further() -> None:
    tokens = torch.tensor([[10, 11, 12, 13, 14]])  # (1, 5)
    labels = head_labels(tokens, 2)  # (1, 5, 2)
    # position t: the target guesses t+1; head 1 guesses t+2, head 2 guesses t+3
    assert labels[0, :, 0].tolist() == [12, 13, 14, IGNORE, IGNORE]
    assert labels[0, :, 1].tolist() == [13, 14, IGNORE, IGNORE, IGNORE]
    assert (head_labels(tokens[:, :2], 3) == IGNORE).all()


def test_untrained_heads_repeat_the_targets_own_guess() -> None:
    torch.manual_seed(0)
    lm_head = nn.Linear(8, 20, bias=False)
    heads = DraftHeads(8, HeadsConfig(n_heads=3))
    hidden = torch.randn(2, 8)  # (B, D)
    want = lm_head(hidden).argmax(-1)  # (B,)
    assert heads.draft(hidden, lm_head, 3).tolist() == [[t] * 3 for t in want.tolist()]
    with pytest.raises(LabkitError, match="1 to 3"):
        heads.draft(hidden, lm_head, 4)


def test_heads_learn_a_pattern_the_next_token_head_cannot_see() -> None:
    """Sequences count up by a step that the hidden state encodes: token t+1+j = token t+1 + j*step.
    The LM head only reads token t+1 out of h_t; the heads must learn to add j*step."""
    torch.manual_seed(0)
    V, D, n = 24, 32, 2
    table = torch.randn(V + 4, D)  # embedding of (next token, step)
    lm_head = nn.Linear(D, V, bias=False)
    with torch.no_grad():
        lm_head.weight.copy_(table[:V])
    lm_head.requires_grad_(False)

    def batch(B: int = 64, T: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.randint(0, V, (B, 1))
        step = torch.randint(1, 3, (B, 1))
        tokens = (start + step * torch.arange(T)) % V  # (B, T)
        nxt = torch.roll(tokens, -1, dims=1)  # (B, T): the target's next token at each position
        hidden = 3 * table[nxt] + table[V + step]  # (B, T, D): the next token, plus the step
        return hidden, tokens  # (B, T, D), (B, T)

    heads = DraftHeads(D, HeadsConfig(n_heads=n, n_blocks=1))
    opt = torch.optim.AdamW(heads.parameters(), lr=1e-2)
    _, before = heads_loss(heads, *batch(), lm_head)
    for _ in range(300):
        loss, _ = heads_loss(heads, *batch(), lm_head)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, after = heads_loss(heads, *batch(256), lm_head)
    assert max(before) < 0.2 and min(after) > 0.9


def test_heads_files_round_trip_and_refuse_another_target(tmp_path) -> None:
    torch.manual_seed(1)
    lm_head = nn.Linear(8, 20, bias=False)
    heads = DraftHeads(8, HeadsConfig(n_heads=2))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_()
    save_heads(heads, tmp_path / "h", fingerprint(lm_head.weight), {"steps": 3})
    back = load_heads(tmp_path / "h", fingerprint(lm_head.weight.to(torch.bfloat16)))  # a bf16 copy is the same target
    hidden = torch.randn(3, 8)
    assert torch.equal(back(hidden), heads(hidden))
    other = nn.Linear(8, 20, bias=False)
    with pytest.raises(LabkitError, match="another target"):
        load_heads(tmp_path / "h", fingerprint(other.weight))
    with pytest.raises(LabkitError, match="holds no draft heads"):
        load_heads(tmp_path / "nothing", fingerprint(lm_head.weight))


def test_self_distilled_training_learns_the_targets_continuation() -> None:
    """A tiny random model writes its own texts; the heads, trained on most of them, guess its
    greedy continuation on the held-out ones better than untrained heads (which repeat the
    target's next token). The final hidden states are what the LM head reads: greedy argmax."""
    from labkit.config import GenerationConfig
    from labkit.engine import Engine
    from labkit.generate import generate
    from labkit.heads_train import HeadsTrainConfig, final_hidden, self_written_texts, train_heads
    from labkit.models.tiny import tiny_hf_model

    hf = tiny_hf_model("llama", seed=3)
    engine = Engine.from_hf(hf, "cpu", "float32")
    cfg = HeadsTrainConfig(heads=HeadsConfig(n_heads=2), texts=60, sampled_tokens=3, greedy_tokens=40, steps=200, batch_size=8,
                           lr=3e-3, held_out=0.2)
    texts = self_written_texts(engine, 1, cfg)
    tokens, first = texts[0]
    assert len(texts) == 60 and first == 4 and len(tokens) == 4 + 40
    assert generate(engine, tokens[:first], GenerationConfig(max_new_tokens=40, stop_at_eos=False)).tokens == tokens[first:]
    greedy = hf.get_output_embeddings()(final_hidden(hf, tokens)).argmax(-1)[0]  # (T,)
    assert greedy[first - 1 : -1].tolist() == tokens[first:]
    heads, report = train_heads(hf, texts, cfg)
    assert report["held_out_texts"] == 12 and report["loss_last"] < report["loss_first"] / 2
    # a random model's continuation is hard to guess (chance: 1 in 96); measured 1.5% -> 14%
    assert report["held_out_top1"][0] > report["held_out_top1_before"][0] + 0.06
    assert report["steps"] == report["steps_asked"] == 200
    from labkit.heads_train import Deadline

    t = [0.0]
    deadline = Deadline(100, lambda: t[0])

    def slow_steps(*args):  # each step's loss takes 8 s of this clock: 200 steps would take 1,600
        t[0] += 1.0
        return real(*args)

    real = __import__("labkit.heads_train", fromlist=["heads_loss_counts"]).heads_loss_counts
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("labkit.heads_train.heads_loss_counts", slow_steps)
        _, limited = train_heads(hf, texts, cfg, deadline)
    assert 5 <= limited["steps"] < 200 and t[0] <= 100 + 12 + 8  # stopped in time (a step's and the check's time past it at most)
    with pytest.raises(LabkitError, match="greedy_tokens > n_heads"):
        HeadsTrainConfig(greedy_tokens=3).validate()


def random_heads(dim: int, n_heads: int, seed: int = 0) -> DraftHeads:
    """Heads with small random weights: they draft something other than the last token again."""
    torch.manual_seed(seed)
    heads = DraftHeads(dim, HeadsConfig(n_heads=n_heads))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.02)
    return heads


class _CheckedHeads(Drafter):
    """A HeadsDrafter that also checks, at every proposal, that the hidden state it reads is the
    one that predicted the last context token (the target's greedy argmax of it). No verify hook:
    the heads draft after each verify step."""

    def __init__(self, drafter) -> None:
        self.inner, self.name, self.checked = drafter, drafter.name, 0
        self.proposals: list[tuple[int, int, list[int]]] = []  # (last context token, k asked, draft)

    def start(self, prompt_ids, capacity) -> None:
        self.inner.start(prompt_ids, capacity)
        self.prepared = 0  # drafts the verify step made (through the verify hook)

    def propose(self, context, k, config, generator):
        target, heads = self.inner.target, self.inner.heads
        with torch.inference_mode():
            hidden = target.hidden_at(target.length - 1)  # (B, D)
            assert int(target.model.lm_head(hidden).argmax(-1)[0]) == context[-1]
            separate = heads.draft(hidden, target.model.lm_head, min(k, heads.cfg.n_heads))[0].tolist()
        self.checked += 1
        draft = self.inner.propose(context, k, config, generator)
        assert draft.tokens == separate  # a draft made inside the verify step is the one made after it
        self.proposals.append((context[-1], k, draft.tokens))
        return draft


class _CheckedFusedHeads(_CheckedHeads):
    """The same checks while the verify step drafts (the inner drafter's verify hook, passed on)."""

    def __init__(self, drafter) -> None:
        super().__init__(drafter)
        self.verify_hook, self.max_t = self, drafter.max_t

    def draft_after(self, hidden, verdict, lm_head, tokens, input_pos):
        return self.inner.draft_after(hidden, verdict, lm_head, tokens, input_pos)

    def take(self, tokens, context_len) -> None:
        self.prepared += 1
        self.inner.take(tokens, context_len)


@pytest.mark.parametrize("arch,fused", [("llama", False), ("gpt2", False), ("llama", True), ("gpt2", True)])
def test_heads_drafter_reads_the_right_hidden_state_and_stays_lossless(arch: str, fused: bool) -> None:
    """Drafts from the hidden state that predicted the last token, whether the heads run after the
    verify step or inside it (fused: their draft comes back with the verdict)."""
    from labkit.config import GenerationConfig
    from labkit.engine import Engine
    from labkit.generate import Speculation, generate
    from labkit.models.tiny import tiny_hf_model
    from labkit.specdec.drafters import HeadsDrafter

    engine = Engine.from_hf(tiny_hf_model(arch, seed=4), "cpu", "float32")
    prompt = list(range(3, 40))  # longer than one step, so the prompt's pass is the first one read
    cfg = GenerationConfig(max_new_tokens=30, stop_at_eos=False)
    want = generate(engine, prompt, cfg).tokens
    heads = random_heads(engine.args.dim, 3)
    drafter = (_CheckedFusedHeads if fused else _CheckedHeads)(HeadsDrafter(engine, heads))
    result = generate(engine, prompt, cfg, Speculation(drafter, 3))
    assert result.tokens == want and drafter.checked >= 10
    # every proposal but the first (after the prompt's pass) was made in the verify before it; the last verify's goes unused
    assert drafter.prepared in ((drafter.checked - 1, drafter.checked) if fused else (0,))
    assert drafter.name == "heads-3" and sum(result.stats.drafted_lengths) > 0


def test_untrained_heads_propose_the_last_token_again() -> None:
    """Zero-initialised heads map the hidden state to itself, so every head repeats what it
    predicted: the last context token. (Training moves them from there.)"""
    from labkit.config import GenerationConfig
    from labkit.engine import Engine
    from labkit.generate import Speculation, generate
    from labkit.models.tiny import tiny_hf_model
    from labkit.specdec.drafters import HeadsDrafter

    engine = Engine.from_hf(tiny_hf_model("llama", seed=4), "cpu", "float32")
    with pytest.raises(LabkitError, match="attach draft heads"):
        engine.hidden_at(0)
    drafter = _CheckedHeads(HeadsDrafter(engine, DraftHeads(engine.args.dim, HeadsConfig(n_heads=2))))
    generate(engine, [5, 6, 7], GenerationConfig(max_new_tokens=12, stop_at_eos=False), Speculation(drafter, 4))
    assert drafter.proposals and all(draft == [last] * min(k, 2) for last, k, draft in drafter.proposals)  # the heads have 2


def test_chat_texts_answer_self_written_user_turns(embedded) -> None:
    """The chat frame is the template around a user's words (the same ids as encoding a prompt);
    each training text is a sampled user turn in it and a greedy answer of full length, EOS
    blocked, and only the answer is labelled."""
    from labkit.config import GenerationConfig
    from labkit.engine import Engine
    from labkit.generate import encode_prompt, generate
    from labkit.heads_train import HeadsTrainConfig, chat_frame, self_written_texts
    from labkit.models.tiny import tiny_hf_model

    tok = embedded.tokenizer
    before, after = chat_frame(tok)
    words = tok("Why is the sky blue?", add_special_tokens=False).input_ids
    assert before + words + after == encode_prompt(tok, "Why is the sky blue?")
    hf = tiny_hf_model("llama", seed=3, vocab_size=len(tok))
    hf.config.eos_token_id = embedded.hf_model.config.eos_token_id
    engine = Engine.from_hf(hf, "cpu", "float32")
    cfg = HeadsTrainConfig(heads=HeadsConfig(n_heads=2), texts=3, user_tokens=6, greedy_tokens=10)
    texts = self_written_texts(engine, 1, cfg, (before, after))
    users = set()
    for tokens, first in texts:
        assert tokens[: len(before)] == before and tokens[first - len(after) : first] == after
        assert len(before) + len(after) <= first <= len(before) + 6 + len(after) and len(tokens) == first + 10
        users.add(tuple(tokens[len(before) : first - len(after)]))
        answer = GenerationConfig(max_new_tokens=10, min_new_tokens=10, stop_at_eos=False)
        assert generate(engine, tokens[:first], answer).tokens == tokens[first:]
    assert len(users) == 3  # sampled with a different seed each
    # with request openers, user turn i starts with opener i (cycled); the target writes the rest
    from labkit.heads_train import REQUEST_OPENERS

    openers = [tok(text, add_special_tokens=False).input_ids for text in REQUEST_OPENERS[:2]]
    for i, (tokens, first) in enumerate(self_written_texts(engine, 1, cfg, (before, after), openers)):
        opener = openers[i % 2]
        assert tokens[len(before) : len(before) + len(opener)] == opener and tokens[first - len(after) : first] == after
        assert first <= len(before) + len(opener) + 6 + len(after)
    assert chat_frame(type("NoTemplate", (), {"chat_template": None})()) is None


def test_texts_written_across_runs_are_the_texts_written_in_one_go(tmp_path, monkeypatch) -> None:
    """With a texts file the texts are saved in parts; a run stopped after the first part and a
    second run that reads them back and writes the rest give the one-go texts; a file written with
    other settings is refused in one line."""
    import json

    from labkit import texts_store
    from labkit.engine import Engine
    from labkit.errors import LabkitError
    from labkit.heads_train import HeadsTrainConfig, self_written_texts
    from labkit.models.tiny import tiny_hf_model

    engine = Engine.from_hf(tiny_hf_model("llama", seed=3), "cpu", "float32")
    frame = ([1, 5, 6], [7, 8])
    cfg = HeadsTrainConfig(heads=HeadsConfig(n_heads=2), texts=5, user_tokens=5, greedy_tokens=6, progress=False)
    one_go = self_written_texts(engine, 1, cfg, frame)
    monkeypatch.setattr(texts_store, "SAVE_EVERY", 2)
    path = tmp_path / "texts.json"
    cfg.texts_file = str(path)
    cfg.texts = 3  # the first run: stopped after 3 texts (saved as 2, then 1)
    assert self_written_texts(engine, 1, cfg, frame) == one_go[:3]
    assert len(json.loads(path.read_text())["texts"]) == 3
    cfg.texts = 5
    written, built = [], []
    heads_train = __import__("labkit.heads_train", fromlist=["_write_texts"])
    real, real_batch = heads_train._write_texts, heads_train.writing_batch
    monkeypatch.setattr("labkit.heads_train._write_texts", lambda *a: written.append(list(a[-1])) or real(*a))
    monkeypatch.setattr("labkit.heads_train.writing_batch", lambda *a: built.append(a[1]) or real_batch(*a))
    assert self_written_texts(engine, 1, cfg, frame) == one_go
    assert written == [[3, 4]]  # only what was missing
    assert len(built) == 1  # one batch for both phases (and every part): its graphs captured once
    cfg.seed = 1
    with pytest.raises(LabkitError, match="other settings"):
        self_written_texts(engine, 1, cfg, frame)
    # a time limit (heads_train.Deadline): past it, writing stops after a saved part, the texts kept, in one line
    from labkit.heads_train import Deadline

    cfg.seed, cfg.texts_file = 0, str(tmp_path / "limited.json")
    clock = iter(range(0, 1000, 10)).__next__  # ten seconds a reading: made at 0, past a 5 s limit at the first check
    with pytest.raises(LabkitError, match=r"time limit \(5 s\) passed while writing \(2 of 5 texts written\); the texts are kept in"):
        self_written_texts(engine, 1, cfg, frame, deadline=Deadline(5, clock))
    assert len(json.loads((tmp_path / "limited.json").read_text())["texts"]) == 2
    assert self_written_texts(engine, 1, cfg, frame) == one_go  # the next run goes on from them
