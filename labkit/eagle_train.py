"""Training the EAGLE-lite head by self-distillation (specdec/eagle.py): the target writes its own
texts (heads_train.self_written_texts: chat answers to self-written user turns, never the prompt
suite), and the head learns to continue the target's greedy answer from its features.

Loss per depth d of the unrolled chain (the training-time test): cross-entropy of the draft
logits (over the reduced vocabulary) against the target's token x_{c+d+1}, plus a smooth-L1 pull
of the predicted feature towards the target's own h_{c+d} (EAGLE-1's feature regression), weighted
down by `depth_decay` per depth. Only greedy tokens are labels.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from labkit.engine import Engine
from labkit.errors import LabkitError
from labkit.heads_train import Deadline, SelfDistillConfig, write_texts_for_model
from labkit.specdec.eagle import EagleConfig, EagleDims, EagleHead, draft_head_weight, top_tokens, vocab_index

IGNORE = -100
FEATURE_BATCH = 32  # texts a features pass prefills at once on a GPU


@dataclass
class EagleTrainConfig(SelfDistillConfig):
    eagle: EagleConfig = field(default_factory=EagleConfig)
    texts: int = 512  # texts the target writes for training (and held-out)
    steps: int = 1500  # optimiser steps; the learning rate peaks after a 5% warm-up, then a cosine to a tenth (of the steps, or
    # of the time where time_limit_s runs out first)
    feature_weight: float = 1.0  # smooth-L1 feature regression beside the token loss
    depth_decay: float = 0.8  # weight of depth d: depth_decay ** (d - 1)

    def validate(self) -> None:
        self.eagle.validate()
        self.check("EAGLE training (greedy_tokens > train_depth + 1)", self.eagle.train_depth + 2)
        if self.feature_weight < 0:
            raise LabkitError(f"EAGLE training needs feature_weight >= 0, got {self.feature_weight}")


def dims_of(args: Any) -> EagleDims:
    """The draft layer's shapes from the target's (LlamaArgs, GPT2Args, ...)."""
    n_heads = int(args.n_heads)
    return EagleDims(dim=int(args.dim), n_heads=n_heads, n_kv_heads=int(getattr(args, "n_kv_heads", n_heads)),
                     head_dim=int(getattr(args, "head_dim", args.dim // n_heads)), hidden_dim=int(args.hidden_dim),
                     norm_eps=float(getattr(args, "norm_eps", 1e-5)))


class FrozenEmbedding(torch.nn.Module):
    """The target's token embedding, in fp32, outside autograd (training reads it, never fits it)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        from labkit.specdec.eagle_ops import token_embedding

        table: Any = token_embedding(model)
        self.weight = table.weight.detach().float()  # (V, D)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, D)
        return F.embedding(tokens, self.weight)


def shifted_labels(tokens: torch.Tensor, firsts: torch.Tensor, lengths: torch.Tensor, shift: int) -> torch.Tensor:  # (B, T) -> (B, T)
    """labels[b, c] = tokens[b, c + shift] where that position is one of text b's greedy ones
    (firsts[b] <= c + shift < lengths[b]), else IGNORE. firsts, lengths: (B,)."""
    B, T = tokens.shape
    out = torch.full_like(tokens, IGNORE)
    if T > shift:
        out[:, : T - shift] = tokens[:, shift:]
    at = torch.arange(T, device=tokens.device)[None, :] + shift  # (1, T)
    return out.masked_fill((at < firsts[:, None]) | (at >= lengths[:, None]), IGNORE)


@dataclass
class TextBatch:
    """Texts right-padded to one length: a causal pass never lets padding reach a real position."""

    feats: torch.Tensor  # (B, T, D) the target's features (zeros past a text's end)
    tokens: torch.Tensor  # (B, T) the tokens they were computed on (0 past the end)
    firsts: torch.Tensor  # (B,) each text's first greedy position: labels only from there
    lengths: torch.Tensor  # (B,) each text's length

    @staticmethod
    def of(items: list[tuple[torch.Tensor, list[int], int]]) -> TextBatch:
        """items: (features (T_i, D), tokens, first greedy index) per text."""
        feats = torch.nn.utils.rnn.pad_sequence([f for f, _, _ in items], batch_first=True)  # (B, T, D)
        device = feats.device
        tokens = torch.nn.utils.rnn.pad_sequence([torch.tensor(t, device=device) for _, t, _ in items], batch_first=True)  # (B, T)
        return TextBatch(feats, tokens, torch.tensor([f for _, _, f in items], device=device),
                         torch.tensor([len(t) for _, t, _ in items], device=device))


def eagle_loss_counts(
    head: EagleHead,
    batch: TextBatch,
    embed: torch.nn.Module,
    weight: torch.Tensor,  # (N, D) the LM head's rows for the draft vocabulary
    index: torch.Tensor,  # (V,) target id -> draft row, -1 outside the draft vocabulary
    depth: int,
    cfg: EagleTrainConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss, and per depth the top-1 hits and the labels seen: (), (depth,), (depth,). A label
    outside the draft vocabulary counts as seen and missed (the draft can never propose it)."""
    feats, tokens = batch.feats, batch.tokens
    outs = head.unrolled(feats, tokens, embed, depth)
    loss = feats.new_zeros(())
    hits, seen = [], []
    T = tokens.shape[1]
    at = torch.arange(T, device=feats.device)[None, :]  # (1, T)
    for d, out in enumerate(outs, start=1):
        labels = shifted_labels(tokens, batch.firsts, batch.lengths, d + 1)  # (B, T): x_{c+d+1}
        valid = labels != IGNORE
        rows = torch.where(valid, index[labels.clamp(min=0)], IGNORE)  # (B, T) draft rows, IGNORE
        rows = torch.where(rows < 0, IGNORE, rows)
        logits = (out @ weight.t()).float()  # (B, T, N)
        ce = F.cross_entropy(logits.flatten(0, 1), rows.flatten(), ignore_index=IGNORE) if (rows != IGNORE).any() else loss
        real = (at[:, : T - d] + d < batch.lengths[:, None]).float()  # (B, T - d): f_{c+d} is a real feature
        gap = F.smooth_l1_loss(out[:, : T - d].float(), feats[:, d:], reduction="none").mean(-1)  # (B, T - d)
        reg = (gap * real).sum() / real.sum().clamp(min=1)
        loss = loss + cfg.depth_decay ** (d - 1) * (ce + cfg.feature_weight * reg)
        with torch.no_grad():
            hits.append(((logits.argmax(-1) == rows) & valid & (rows != IGNORE)).sum().float())
            seen.append(valid.sum().float())
    return loss, torch.stack(hits), torch.stack(seen)


def lr_at(progress: float, lr: float) -> float:
    """The learning rate at this share of the fit (of its steps or its time, whichever is further): a linear warm-up
    over the first 5%, then a cosine from lr down to a tenth of it."""
    if progress < 0.05:
        return lr * progress / 0.05
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(min(1.0, (progress - 0.05) / 0.95) * math.pi)))


def engine_features(engine: Engine, texts: list[list[int]]) -> list[torch.Tensor]:  # -> (T_i, D) fp32 each
    """The target's features for each text, from the engine that serves the drafts (the same
    kernels and dtype as at inference: a bf16 target's features differ from fp32 ones by more than
    a head trained on the fp32 ones tolerates; measured on a tiny target, live acceptance fell from
    55% to 21%). An engine built for batch B prefills B texts at once, right-padded: causal
    attention keeps padding out of every real position."""
    B, out = engine.batch_size, []
    engine.keep_hidden_states(every_position=True)  # once: it also drops the engine's captured steps
    for i in range(0, len(texts), B):
        group = texts[i : i + B]
        T = max(map(len, group))
        rows = [t + [0] * (T - len(t)) for t in group] + [[0] * T] * (B - len(group))  # (B, T)
        with torch.inference_mode():
            engine.reset()
            engine.ensure_capacity(T)
            engine.prefill(torch.tensor(rows, device=engine.device))
            feats = engine.hidden_span(0, T).float()  # (B, T, D)
            engine.reset()
        out += [feats[j, : len(t)].clone() for j, t in enumerate(group)]  # outside inference mode: tensors training may save for backward
    return out


def train_eagle(engine: Engine, texts: list[tuple[list[int], int]], cfg: EagleTrainConfig,
                dims: EagleDims | None = None, features: Engine | None = None,
                deadline: Deadline | None = None) -> tuple[EagleHead, dict[str, Any]]:
    """Fit the head on the texts (all but a held-out share), on the features the engine's target
    makes (`features`: the same target in an engine of a larger batch, to prefill many texts at once); the report has the held-out top-1 at each depth up to cfg.eagle.depth, before and after
    training, and the vocabulary's coverage."""
    cfg.validate()
    dims = dims or dims_of(engine.args)
    lm_weight = engine.model.lm_head.weight.detach().float()  # (V, D)
    embed = FrozenEmbedding(engine.model)
    device = lm_weight.device
    V = lm_weight.shape[0]
    rng = random.Random(cfg.seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    n_held = max(1, round(len(texts) * cfg.held_out))
    held_texts, train_texts = [texts[i] for i in order[:n_held]], [texts[i] for i in order[n_held:]]
    vocab_ids = top_tokens(train_texts, cfg.eagle.draft_vocab, V)  # from training texts only
    torch.manual_seed(cfg.seed)
    head = EagleHead(dims, cfg.eagle, vocab_ids).to(device)
    weight, index = draft_head_weight(head, lm_weight), vocab_index(head.vocab_ids, V)

    def encode(items: list[tuple[list[int], int]]) -> list[tuple[torch.Tensor, list[int], int]]:
        feats = engine_features(features or engine, [t for t, _ in items])
        return [(f, t, first) for f, (t, first) in zip(feats, items, strict=True)]

    t0 = time.perf_counter()
    held, train = encode(held_texts), encode(train_texts)
    features_s = time.perf_counter() - t0

    def accuracy() -> list[float]:
        hits = torch.zeros(cfg.eagle.depth, device=device)
        seen = torch.zeros(cfg.eagle.depth, device=device)
        with torch.no_grad():
            for i in range(0, len(held), cfg.batch_size):
                _, h, n = eagle_loss_counts(head, TextBatch.of(held[i : i + cfg.batch_size]), embed, weight, index, cfg.eagle.depth, cfg)
                hits, seen = hits + h, seen + n
        return (hits / seen.clamp(min=1)).tolist()

    deadline = deadline or Deadline()
    before, seconds = deadline.before_fit(accuracy, cfg.texts_file)
    t0 = time.perf_counter()
    losses = _fit(head, lambda batch: eagle_loss_counts(head, batch, embed, weight, index, cfg.eagle.train_depth, cfg)[0], train, cfg, rng,
                  seconds, deadline.clock)
    train_s = time.perf_counter() - t0
    held_labels = [t[first:] for t, first in held_texts]
    inside = set(head.vocab_ids.tolist())
    coverage = sum(x in inside for toks in held_labels for x in toks) / max(1, sum(map(len, held_labels)))
    report = {"texts": len(texts), "train_texts": len(train), "held_out_texts": len(held),
              "label_tokens": sum(len(t) - f for t, f in texts), "steps": len(losses), "steps_asked": cfg.steps,
              "features_s": features_s, "train_s": train_s,
              "draft_vocab": int(head.vocab_ids.numel()), "held_out_vocab_coverage": coverage,
              "loss_first": losses[0], "loss_last": sum(losses[-10:]) / len(losses[-10:]),
              "held_out_top1_before": before, "held_out_top1": accuracy()}
    return head, report


def _fit(head: EagleHead, loss_of: Any, train: list[tuple[torch.Tensor, list[int], int]], cfg: EagleTrainConfig,
         rng: random.Random, seconds: float = math.inf, clock: Any = time.perf_counter) -> list[float]:
    """AdamW over random batches of cfg.batch_size training texts, one padded pass each (bf16
    autocast on a GPU), for cfg.steps steps or `seconds` (by `clock`), whichever ends first; the loss per step."""
    device = next(head.parameters()).device
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=0.0)
    low = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="training EAGLE", disable=not cfg.progress)
    start = clock()
    for step in bar:
        spent = (clock() - start) / seconds  # (a share of the time)
        if losses and spent >= 1:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(max((step + 1) / cfg.steps, spent), cfg.lr)
        batch = TextBatch.of([train[rng.randrange(len(train))] for _ in range(cfg.batch_size)])
        with low:
            loss = loss_of(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return losses


def expected_accepted(top1: list[float]) -> float:
    """Drafts accepted per step if depth d is accepted with probability top1[d-1] given the ones
    before it (what the held-out accuracies measure): sum over d of their running product."""
    total, run = 0.0, 1.0
    for p in top1:
        run *= p
        total += run
    return total


def train_eagle_for_model(loaded: Any, device: torch.device, dtype: torch.dtype, cfg: EagleTrainConfig,
                          chat: bool | None = None) -> tuple[EagleHead, dict[str, Any], dict[str, Any]]:
    """The whole recipe for a loaded model (heads_train.write_texts_for_model, then train_eagle on
    the features of the engine that wrote the texts). Returns the head, the report and the target's fingerprint."""
    from labkit.specdec.heads import fingerprint

    cfg.validate()
    deadline = Deadline(cfg.time_limit_s)
    t0 = time.perf_counter()
    engine, texts, frame = write_texts_for_model(loaded, device, dtype, cfg, chat, deadline)
    write_s = time.perf_counter() - t0
    features = None
    if device.type == "cuda":  # prefill FEATURE_BATCH texts a pass (a CPU gains little: one at a time, on the writing engine)
        longest = max(len(t) for t, _ in texts)
        features = Engine.from_loaded(loaded, device, dtype, weights="dense", batch_size=FEATURE_BATCH, max_seq_len=-(-longest // 64) * 64)
    head, report = train_eagle(engine, texts, cfg, features=features, deadline=deadline)
    report = {**report, "chat": frame is not None, "write_s": write_s,
              "expected_accepted": expected_accepted(report["held_out_top1"])}
    return head, report, fingerprint(engine.model.lm_head.weight)
