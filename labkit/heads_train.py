"""Training draft heads by self-distillation: the target writes its own texts, and the heads learn
to guess its greedy continuation from its final hidden states.

No dataset is needed (and the prompt suite is never used, since it is what the heads are then
measured on). With a chat template (the default where the model has one) the target first writes a
user turn itself (from the first words of a request, REQUEST_OPENERS), sampled at temperature 1
inside the template's user frame, then answers it
greedily in the assistant frame: the heads learn the target's answers to chat requests, which is
what they are used on. Without one, a text starts from the BOS token with a few sampled tokens and
goes on greedily. Only the greedy part is a label: that is what a greedy verify accepts; EOS is
blocked in it, as the benchmarks do, so every text has its full length. Hidden states come from
the transformers model (`base_model(...).last_hidden_state`, after the final norm), so training
works for every architecture the loader takes.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.errors import LabkitError
from labkit.generate import generate
from labkit.specdec.heads import IGNORE, DraftHeads, HeadsConfig, heads_loss_counts

if TYPE_CHECKING:
    from labkit.batch.engine import BatchEngine

CPU_WRITING_ROWS = 8  # texts written at once on the CPU layer operations (writing_batch)


@dataclass
class SelfDistillConfig:
    """What the target writes to train on, and how the fit runs: shared by draft heads and EAGLE."""

    texts: int = 256  # texts the target writes for training (and held-out)
    sampled_tokens: int = 8  # tokens sampled at temperature 1 after BOS, so that texts differ (no chat frame)
    user_tokens: int = 48  # at most this many sampled tokens of a self-written user turn (chat frame)
    greedy_tokens: int = 128  # greedy tokens per text after those: the labels
    steps: int = 400  # optimiser steps
    batch_size: int = 8  # texts per step
    lr: float = 1e-3
    held_out: float = 0.1  # share of texts kept out of training, to report accuracy on
    seed: int = 0
    progress: bool = True  # progress bars for writing the texts and for training (a CPU run takes hours)
    texts_file: str | None = None  # keep the written texts here, and resume from them (writing across runs: texts_store.py)
    time_limit_s: float = 0.0  # 0: none; else the run stops writing and training in time (Deadline), keeping what it wrote

    def check(self, what: str, min_greedy: int) -> None:
        """The shared checks; `what` names the training, min_greedy is the fewest greedy tokens it needs."""
        if self.texts < 2 or self.sampled_tokens < 1 or self.user_tokens < 1 or self.greedy_tokens < min_greedy:
            raise LabkitError(f"{what} needs texts >= 2, sampled_tokens and user_tokens >= 1 and greedy_tokens >= {min_greedy}, "
                              f"got {self.texts}, {self.sampled_tokens}, {self.user_tokens}, {self.greedy_tokens}")
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0 or not 0 < self.held_out < 1:
            raise LabkitError(f"{what} needs steps, batch_size >= 1, lr > 0 and 0 < held_out < 1, "
                              f"got {self.steps}, {self.batch_size}, {self.lr}, {self.held_out}")
        if not self.time_limit_s >= 0:
            raise LabkitError(f"{what}'s time limit is a number of seconds >= 0 (0: none), got {self.time_limit_s}")


@dataclass
class Deadline:
    """A training run's wall-time bound (SelfDistillConfig.time_limit_s), counted from when it is made: writing
    stops between the texts file's saved parts once it has passed (the texts kept, the run stopped with one line),
    and the fit ends before it, its learning-rate schedule following the time where that runs out before the steps.
    A lent GPU or a Kaggle session stops a run at its own limit, and loses whatever the run had not saved."""

    limit_s: float = 0.0  # 0: none
    clock: Callable[[], float] = time.perf_counter
    start: float = field(init=False)  # the clock's reading when made

    def __post_init__(self) -> None:
        self.start = self.clock()

    def left(self) -> float:
        return self.start + self.limit_s - self.clock() if self.limit_s else math.inf

    def passed(self, what: str, texts_file: str | None) -> LabkitError:
        kept = f"; the texts are kept in {texts_file}: run again to go on" if texts_file else ""
        return LabkitError(f"the time limit ({self.limit_s:g} s) passed {what}{kept}")

    def fit_seconds(self, check_s: float, texts_file: str | None) -> float:
        """The fit's time: what is left but the held-out check after it (check_s, as long as the one before it took)."""
        seconds = self.left() - check_s
        if seconds <= 0:
            raise self.passed("before training", texts_file)
        return seconds

    def before_fit(self, check: Callable[[], list[float]], texts_file: str | None) -> tuple[list[float], float]:
        """The held-out check before the fit, timed -> (its accuracies, the fit's seconds: fit_seconds)."""
        t0 = self.clock()
        before = check()
        return before, self.fit_seconds(self.clock() - t0, texts_file)


@dataclass
class HeadsTrainConfig(SelfDistillConfig):
    heads: HeadsConfig = field(default_factory=HeadsConfig)

    def validate(self) -> None:
        self.heads.validate()
        self.check("heads training (greedy_tokens > n_heads + 1)", self.heads.n_heads + 2)


# The first words of the self-written user turns, cycled: a bare sampled turn from a small model
# is rarely a request, and heads trained on answers to those guess answers to real requests badly
# (measured on SmolLM2-135M, EAGLE's held-out top-1 22% on such texts, 8.8% on answers to real
# requests). Generic openings of requests of every kind; never the prompt suite's.
REQUEST_OPENERS = (
    "Write a short", "Write a poem about", "Write an email to", "Explain how", "Explain why", "What is the difference between",
    "How do I", "How can I improve", "What are the best ways to", "Give me a list of", "Summarize the", "Describe",
    "Tell me about", "Can you help me", "I need advice on", "Write a Python function that", "Write a SQL query that",
    "Fix this code:", "What does this code do:", "Solve this problem:", "Calculate", "If a train", "Compare",
    "What are the pros and cons of", "Translate into French:", "Rewrite this sentence:", "Plan a", "Suggest",
    "Create a recipe for", "What happens when", "Why do", "Is it true that", "Pretend you are", "Continue the story:",
    "Answer briefly:", "List the steps to", "Give an example of", "What would happen if", "Outline an essay on", "Define",
)
_MARK = "\u2063labkit-user-turn\u2063"  # stands in for the user's words when the template is split


def chat_frame(tokenizer: Any) -> tuple[list[int], list[int]] | None:
    """The chat template's ids before and after a user's words (system turn and user header; end of
    turn and assistant header), or None when the tokenizer has no chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False, add_generation_prompt=True)
    if text.count(_MARK) != 1:
        raise LabkitError("this chat template does not place the user's words once; train with --no-chat")
    before, after = text.split(_MARK)
    return list(tokenizer(before, add_special_tokens=False).input_ids), list(tokenizer(after, add_special_tokens=False).input_ids)


def self_written_texts(engine: Engine, bos: int, cfg: SelfDistillConfig, frame: tuple[list[int], list[int]] | None = None,
                       openers: list[list[int]] | None = None, deadline: Deadline | None = None) -> list[tuple[list[int], int]]:
    """(tokens, first greedy index) per text, written by the target on `engine`: in the chat
    `frame` (ids before and after the user's words) a sampled user turn and its greedy answer,
    else a few sampled tokens after `bos` and their greedy continuation. With `openers` (ids of
    REQUEST_OPENERS), user turn i starts with opener i (cycled) and the target writes the rest.
    Text i's sampling is seeded cfg.seed + i, and the texts are batched (write_all) exactly as
    `generate` writes them one at a time. With cfg.texts_file the texts are saved as they are
    written and a later run reads them back (texts_store.py); past the deadline, after a saved part, writing stops
    with one line."""
    from labkit.specdec.heads import fingerprint
    from labkit.texts_store import SAVE_EVERY, TextsFile

    settings = {"seed": cfg.seed, "sampled_tokens": cfg.sampled_tokens, "user_tokens": cfg.user_tokens, "greedy_tokens": cfg.greedy_tokens,
                "frame": frame, "openers": openers, "bos": bos, "target": fingerprint(engine.model.lm_head.weight)}
    store = TextsFile(cfg.texts_file, settings) if cfg.texts_file else None
    texts = store.load()[: cfg.texts] if store else []
    if frame:  # the longest text: the frame's opening, the longest opener, a whole user turn, the frame's close, the answer
        longest = len(frame[0] or [bos]) + max(map(len, openers or [[]])) + cfg.user_tokens + len(frame[1]) + cfg.greedy_tokens
    else:
        longest = 1 + cfg.sampled_tokens + cfg.greedy_tokens
    batch = writing_batch(engine, longest) if len(texts) < cfg.texts else None  # one for every part and phase
    while len(texts) < cfg.texts:
        last = min(cfg.texts, len(texts) + SAVE_EVERY) if store else cfg.texts
        texts += _write_texts(engine, bos, cfg, frame, openers, batch, range(len(texts), last))
        if store:
            store.save(texts)
            if deadline is not None and deadline.left() <= 0 and len(texts) < cfg.texts:
                raise deadline.passed(f"while writing ({len(texts)} of {cfg.texts} texts written)", cfg.texts_file)
    return texts


def _write_texts(engine: Engine, bos: int, cfg: SelfDistillConfig, frame: tuple[list[int], list[int]] | None,
                 openers: list[list[int]] | None, batch: BatchEngine | None, indices: range) -> list[tuple[list[int], int]]:
    """Texts `indices` of self_written_texts."""
    eos = set(engine.eos_token_ids)
    starts, user = [], []
    for i in indices:
        if frame is None:
            starts.append([bos])
            user.append(GenerationConfig(max_new_tokens=cfg.sampled_tokens, temperature=1.0, top_p=0.95, seed=cfg.seed + i, stop_at_eos=False))
        else:
            starts.append([*(frame[0] or [bos]), *(openers[i % len(openers)] if openers else [])])
            user.append(GenerationConfig(max_new_tokens=cfg.user_tokens, temperature=1.0, top_p=0.95, seed=cfg.seed + i, stop_at_eos=True))
    prefixes = []
    for start, sampled in zip(starts, write_all(engine, starts, user, "writing user turns" if frame else "sampling starts", cfg.progress, batch), strict=True):
        while sampled and sampled[-1] in eos:
            sampled = sampled[:-1]
        prefixes.append([*start, *sampled, *(frame[1] if frame else [])])
    answer = GenerationConfig(max_new_tokens=cfg.greedy_tokens, min_new_tokens=cfg.greedy_tokens, stop_at_eos=False)
    greedy = write_all(engine, prefixes, [answer] * len(prefixes), "writing answers", cfg.progress, batch)
    return [(prefix + tokens, len(prefix)) for prefix, tokens in zip(prefixes, greedy, strict=True)]


def writing_batch(engine: Engine, longest: int) -> BatchEngine | None:
    """The batch `write_all` writes on, for texts of up to `longest` tokens, where the engine's model
    batches (Llama family): the fused kernels' rows (bitwise a batch-1 step's) with CUDA graphs on a
    GPU (64 at once); the CPU layer operations' rows on the GGUF blocks (row by row, so bitwise a
    batch-1 step's too: tests/test_layer_cpu.py; 8 at once, 16 were no faster on a 2-core EPYC); else
    invariant rows on the PyTorch layers (16 at once). On that EPYC the blocks' rows wrote 0.70 s a text
    against the invariant tiles' 1.34, the same texts (scripts/cpu_writing.py, results/cpu-writing-597d84f.txt).
    Built once for all of a run's texts: its graphs are captured once, not per part and phase."""
    from labkit.batch.engine import TILE, BatchConfig, BatchEngine
    from labkit.graphs import GRAPH_HEADROOM
    from labkit.models.families import family_of_model

    if family_of_model(engine.model).name != "llama":
        return None
    fused = engine.device.type == "cuda" and engine.layer_kernels == "triton"
    rows = 64 if fused else CPU_WRITING_ROWS if engine.layer_kernels == "cpu" else TILE
    slot_len = min(-(-longest // 64) * 64, engine.cache.max_len - GRAPH_HEADROOM)  # a captured step's warm-ups write past a slot
    batch = BatchEngine(engine, BatchConfig(rows, slot_len, invariant=engine.layer_kernels == "torch", cuda_graph=fused and bool(engine.cuda_graph)))
    batch.capture_graphs([1])
    return batch


def write_all(engine: Engine, prompts: list[list[int]], configs: list[GenerationConfig], desc: str, progress: bool,
              batch: BatchEngine | None = None) -> list[list[int]]:
    """generate(engine, prompts[i], configs[i]).tokens for every i, continuously batched on `batch`
    (else on a `writing_batch` of its own) where the engine's model batches; one at a time where not."""
    from labkit.batch.scheduler import ContinuousBatcher

    bar = tqdm(total=len(prompts), desc=desc, disable=not progress)
    if batch is None and len(prompts) >= 2:
        batch = writing_batch(engine, max(len(p) + c.max_new_tokens for p, c in zip(prompts, configs, strict=True)))
    if batch is None or len(prompts) < 2:
        out = []
        for prompt, config in zip(prompts, configs, strict=True):
            out.append(generate(engine, prompt, config).tokens)
            bar.update()
        return out
    batcher = ContinuousBatcher(batch)
    requests = [batcher.submit(p, c) for p, c in zip(prompts, configs, strict=True)]
    done = 0
    while batcher.busy:
        batcher.step()
        now = sum(r.finished for r in requests)
        bar.update(now - done)
        done = now
    return [r.tokens for r in requests]


@torch.no_grad()
def final_hidden(hf_model: Any, tokens: list[int]) -> torch.Tensor:  # -> (1, T, D)
    """The transformers model's last hidden state (after its final norm): what its LM head reads."""
    ids = torch.tensor([tokens], device=hf_model.device)
    return hf_model.base_model(input_ids=ids).last_hidden_state


def _labels_from(tokens: torch.Tensor, first: int) -> torch.Tensor:  # (1, T) -> (1, T) with IGNORE before `first`
    out = tokens.clone()
    out[:, :first] = IGNORE
    return out


def train_heads(hf_model: Any, texts: list[tuple[list[int], int]], cfg: HeadsTrainConfig,
                deadline: Deadline | None = None) -> tuple[DraftHeads, dict[str, Any]]:
    """Fit heads on the texts (all but a held-out share); returns them and a report with each
    head's top-1 accuracy on the held-out texts, before and after training (the fit ended before the deadline)."""
    cfg.validate()
    lm_head = hf_model.get_output_embeddings()
    device = lm_head.weight.device
    data = [(final_hidden(hf_model, toks).float(), _labels_from(torch.tensor([toks], device=device), first)) for toks, first in texts]
    rng = random.Random(cfg.seed)
    rng.shuffle(data)
    n_held = max(1, round(len(data) * cfg.held_out))
    held, train = data[:n_held], data[n_held:]
    torch.manual_seed(cfg.seed)
    heads = DraftHeads(lm_head.weight.shape[1], cfg.heads).to(device)
    head_fp32 = torch.nn.Linear(lm_head.weight.shape[1], lm_head.weight.shape[0], bias=False).to(device)
    head_fp32.weight.data.copy_(lm_head.weight.detach().float())
    head_fp32.requires_grad_(False)

    def accuracy(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
        hits = torch.zeros(cfg.heads.n_heads, device=device)
        seen = torch.zeros(cfg.heads.n_heads, device=device)
        with torch.no_grad():
            for hidden, labels in batch:
                _, h, n = heads_loss_counts(heads, hidden, labels, head_fp32)
                hits += h
                seen += n
        return (hits / seen.clamp(min=1)).tolist()

    deadline = deadline or Deadline()
    before, seconds = deadline.before_fit(lambda: accuracy(held), cfg.texts_file)
    end = deadline.clock() + seconds
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr)
    losses: list[float] = []
    # the LM-head product over every position, head and vocabulary entry is most of the work:
    # bf16 tensor cores on a GPU (about 90 GFLOP per 128-token text and step at 49k vocabulary,
    # which is also why training on a CPU takes hours)
    low = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = tqdm(range(cfg.steps), desc="training heads", disable=not cfg.progress)
    for _ in bar:
        if losses and deadline.clock() >= end:
            break
        batch = [train[rng.randrange(len(train))] for _ in range(cfg.batch_size)]
        with low:
            loss = sum(heads_loss_counts(heads, hidden, labels, head_fp32)[0] for hidden, labels in batch) / len(batch)
        opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        losses.append(float(loss.detach()))  # type: ignore[union-attr]
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    report = {"texts": len(texts), "train_texts": len(train), "held_out_texts": len(held),
              "label_tokens": sum(len(t) - f for t, f in texts), "steps": len(losses), "steps_asked": cfg.steps,
              "loss_first": losses[0], "loss_last": sum(losses[-10:]) / len(losses[-10:]),
              "held_out_top1_before": before, "held_out_top1": accuracy(held)}
    return heads, report


def write_texts_for_model(loaded: Any, device: torch.device, dtype: torch.dtype, cfg: SelfDistillConfig, chat: bool | None = None,
                          deadline: Deadline | None = None) -> tuple[Engine, list[tuple[list[int], int]], tuple[list[int], list[int]] | None]:
    """The target writes the training texts on our engine (CUDA graphs on a GPU; on a CPU its GGUF blocks where
    weights "auto" takes them, the engine then handed on with its dense weights), in its chat
    template unless chat is False (None: where it has one). cfg: a heads or EAGLE training config
    (texts, sampled_tokens, user_tokens, greedy_tokens, seed, progress). Returns the engine, the
    texts and the chat frame (None without one)."""
    from labkit.generate import warm_up

    tokenizer = loaded.tokenizer
    if chat and getattr(tokenizer, "chat_template", None) is None:
        raise LabkitError("this model's tokenizer has no chat template; train with --no-chat")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise LabkitError("the tokenizer has neither a BOS nor an EOS token to start the texts from")
    frame = chat_frame(tokenizer) if chat is not False else None
    openers = [list(tokenizer(text, add_special_tokens=False).input_ids) for text in REQUEST_OPENERS]
    # on a CPU the GGUF blocks through the CPU layer operations where they are faster (weights "auto"), then the
    # dense weights again for what follows (the same values: the fingerprint, EAGLE's features on the PyTorch layers)
    engine = Engine.from_loaded(loaded, device, dtype, weights="auto" if device.type == "cpu" else "dense", cuda_graph=device.type == "cuda")
    if engine.cuda_graph:
        warm_up(engine)
    texts = self_written_texts(engine, int(bos), cfg, frame, openers, deadline)
    if engine.weights != "dense":
        engine.read_blocks(False)
    return engine, texts, frame


def train_for_model(loaded: Any, device: torch.device, dtype: torch.dtype, cfg: HeadsTrainConfig,
                    chat: bool | None = None) -> tuple[DraftHeads, dict[str, Any], dict[str, Any]]:
    """The whole recipe for a loaded model: the target writes the texts (write_texts_for_model),
    and the heads are fitted on the transformers model's hidden states. Returns the heads, the
    training report and the target's fingerprint (for save_heads)."""
    from labkit.specdec.heads import fingerprint

    cfg.validate()
    deadline = Deadline(cfg.time_limit_s)
    engine, texts, frame = write_texts_for_model(loaded, device, dtype, cfg, chat, deadline)
    heads, report = train_heads(loaded.hf_model.to(device=device), texts, cfg, deadline)
    return heads, {**report, "chat": frame is not None}, fingerprint(engine.model.lm_head.weight)
