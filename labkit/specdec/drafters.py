"""Drafters: cheap guesses at the next K tokens.

Every drafter answers `propose(context, k)`, where `context` is every token so far (prompt and
output; the target's cache holds all but the last). It returns up to k tokens and, where it has
them, the draft probabilities they were sampled from. Drafters with their own KV cache keep it
consistent by themselves: they remember which tokens their cache holds and roll back to the
common prefix with the new context, so a partial acceptance costs no extra call.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
import torch.nn as nn

from labkit.config import DRAFTERS, EAGLE_KINDS, GenerationConfig
from labkit.engine import Engine
from labkit.errors import LabkitError
from labkit.sampling import warp_logits
from labkit.specdec.draft import Draft, Drafter
from labkit.specdec.ngram import NgramDrafter, NgramTreeDrafter


def _pick(
    logits: torch.Tensor, vocab: int, config: GenerationConfig, generator: torch.Generator | None, stop_below: float = 0.0
) -> tuple[int | None, torch.Tensor | None]:
    """Draft token from draft logits (1, V_draft) and its distribution over the target vocab, or
    (None, None) when the draft's confidence, the largest probability of its distribution, is below
    `stop_below` (the confidence early stop; softmax at T=1 for greedy). The stop is decided from
    the distribution before anything is sampled, never from the token it would have drawn: a stop
    that looked at the drawn token would skew which tokens get drafted away from q, and rejection
    sampling against q would then no longer return the target's distribution."""
    logits = logits[0]
    if logits.shape[-1] > vocab:  # padded draft vocabulary: ids the target cannot have never drafted
        logits = logits[:vocab]
    if config.temperature == 0:
        if stop_below > 0 and float(logits.float().softmax(-1).max()) < stop_below:
            return None, None
        return int(logits.argmax().item()), None
    q = warp_logits(logits, config.temperature, config.top_k, config.top_p).softmax(-1)  # (V_draft,)
    if stop_below > 0 and float(q.max()) < stop_below:
        return None, None
    token = int(torch.multinomial(q, 1, generator=generator).item())
    if q.shape[-1] < vocab:
        q = torch.nn.functional.pad(q, (0, vocab - q.shape[-1]))
    return token, q


def _stack(probs: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if not probs or probs[0] is None else torch.stack([p for p in probs if p is not None])


class ModelDrafter(Drafter):
    """A separate, smaller model with its own cache (e.g. distilgpt2 for gpt2, or a truncated target)."""

    replayable = True  # greedy drafts are a function of the context: its own cache follows it

    def __init__(self, engine: Engine, target_vocab: int, name: str = "model", stop_below: float = 0.0) -> None:
        self.engine, self.vocab = engine, target_vocab
        self.stop_below = stop_below  # draft-confidence early stop (lossless: it only proposes less)
        self.name = name + (f"+conf{stop_below:g}" if stop_below > 0 else "")
        self.draft_vocab = int(engine.args.vocab_size)
        self.cached: list[int] = []  # tokens whose keys and values the draft cache holds

    def start(self, prompt_ids: list[int], capacity: int) -> None:
        self.engine.ensure_capacity(capacity)
        self.cached = []

    def propose(self, context: list[int], k: int, config: GenerationConfig, generator: torch.Generator | None) -> Draft:
        keep = 0
        limit = min(len(self.cached), len(context) - 1)
        while keep < limit and self.cached[keep] == context[keep]:
            keep += 1
        self.engine.rollback(keep)
        device = self.engine.device
        # catch-up: at least the last token. An id past a smaller draft vocabulary cannot be
        # embedded; the draft sees id 0 there (worse guesses, still verified, still lossless).
        catch_up = [t if t < self.draft_vocab else 0 for t in context[keep:]]
        feed = torch.tensor([catch_up], device=device)
        tokens: list[int] = []
        probs: list[torch.Tensor | None] = []
        for i in range(k):
            logits = self.engine.forward(feed, last_only=True)[:, -1]  # (1, V_draft)
            token, q = _pick(logits, self.vocab, config, generator, self.stop_below)
            self.cached = context + tokens  # what the draft cache holds now
            if token is None:  # not confident enough: stop drafting (decided before sampling)
                break
            tokens.append(token)
            probs.append(q)
            if i + 1 < k:
                feed = torch.tensor([[token]], device=device)
        return Draft(tokens, _stack(probs))


class LayerSkipDrafter(Drafter):
    """The target's own first L layers, then its final norm and head: no extra weights, and the
    target's cache serves those layers (their keys and values are the same computation)."""

    def __init__(self, target: Engine, n_layers: int, stop_below: float = 0.0) -> None:
        if not 1 <= n_layers < target.args.n_layers:
            raise LabkitError(f"layer-skip needs 1 <= layers < {target.args.n_layers}, got {n_layers}")
        self.engine, self.n_layers = target, n_layers
        self.stop_below = stop_below  # draft-confidence early stop (lossless: it only proposes less)
        self.name = f"layerskip-{n_layers}" + (f"+conf{stop_below:g}" if stop_below > 0 else "")
        self.vocab = target.args.vocab_size

    def propose(self, context: list[int], k: int, config: GenerationConfig, generator: torch.Generator | None) -> Draft:
        start = self.engine.length  # the target's cache holds context[:-1]
        device = self.engine.device
        token = context[-1]
        tokens: list[int] = []
        probs: list[torch.Tensor | None] = []
        for _ in range(k):
            logits = self.engine.forward(torch.tensor([[token]], device=device), n_layers=self.n_layers)[:, -1]
            picked, q = _pick(logits, self.vocab, config, generator, self.stop_below)
            if picked is None:  # not confident enough: stop drafting (decided before sampling)
                break
            token = picked
            tokens.append(token)
            probs.append(q)
        self.engine.rollback(start)  # draft positions are rewritten by the verify pass
        return Draft(tokens, _stack(probs))


class HeadsDrafter(Drafter):
    """Medusa-style draft heads (specdec/heads.py): K tokens from the target's own final hidden
    state at the position before the last context token, the one that predicted that token.
    No draft model runs: the target's last pass (prefill, decode or verify) left that state, and
    the heads add K small blocks and one LM-head product. Greedy drafts (one-hot).

    It is its own verify hook: under greedy acceptance the heads draft inside the verify step
    (`draft_after`, captured with it), and the draft comes back with the verdict (`take`)."""

    def __init__(self, target: Engine, heads: Any) -> None:
        target.keep_hidden_states()
        self.target, self.heads = target, heads.to(device=target.device, dtype=target.dtype).eval()
        self.name = f"heads-{heads.cfg.n_heads}"
        self.max_t = heads.cfg.n_heads + 1  # the widest verify whose next draft it makes
        self.verify_hook = self
        self._prepared: tuple[int, list[int]] | None = None  # (context length, draft) the last verify made

    def start(self, prompt_ids: list[int], capacity: int) -> None:
        self._prepared = None

    def draft_after(self, hidden: torch.Tensor, verdict: torch.Tensor, lm_head: nn.Module,
                    tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """hidden (B, K+1, D) of the verify pass, verdict (B, 2) -> (B, n_heads): the heads' draft
        from the hidden state that predicted the verdict's next token (row `accepted`: row 0 is
        the last token before the drafts). The same tokens as propose after the step."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)  # (B,)
        return self.heads.draft(hidden[rows, verdict[:, 0]], lm_head, self.heads.cfg.n_heads)

    def take(self, tokens: list[int], context_len: int) -> None:
        """The draft draft_after made in the verify step that just ran, for the next proposal
        (of a context of context_len tokens: after a step of another kind it is stale)."""
        self._prepared = (context_len, tokens)

    @torch.inference_mode()
    def propose(self, context: list[int], k: int, config: GenerationConfig, generator: torch.Generator | None) -> Draft:
        k = min(k, self.heads.cfg.n_heads)  # one token per head: a larger K drafts what the heads have
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared[0] == len(context):
            return Draft(prepared[1][:k])
        hidden = self.target.hidden_at(self.target.length - 1)  # (B, D): it predicted context[-1]
        return Draft(self.heads.draft(hidden, self.target.model.lm_head, k)[0].tolist())


def truncated_model(model: nn.Module, n_layers: int) -> nn.Module:
    """A smaller model from the target's embeddings, first n layers, final norm and head (weights shared)."""
    args: Any = cast(Any, model).args
    total = args.n_layers
    if not 1 <= n_layers < total:
        raise LabkitError(f"a truncated draft needs 1 <= layers < {total}, got {n_layers}")
    small: Any = copy.copy(model)  # shallow: every submodule and weight is the target's
    small._modules = dict(model._modules)
    small.layers = nn.ModuleList(list(cast(Any, model).layers)[:n_layers])
    small.args = copy.copy(args)
    small.args.n_layers = n_layers
    return cast(nn.Module, small)


def truncated_engine(target: Engine, n_layers: int) -> Engine:
    """An Engine over the truncated model, with its own (smaller) cache."""
    engine = Engine(truncated_model(target.model, n_layers), device=target.device, dtype=target.dtype, amp=target.amp,
                    cuda_graph=target.cuda_graph, batch_size=target.batch_size, max_seq_len=target.max_seq_len)
    engine.eos_token_ids = target.eos_token_ids
    return engine


def check_draft_pair(target: Engine, draft: Engine, target_tokenizer: Any = None, draft_tokenizer: Any = None) -> None:
    """A separate draft model must sit on the target's device and dtype and share its tokenizer."""
    if draft.device != target.device:
        raise LabkitError(f"the draft model is on {draft.device} but the target is on {target.device}; put both on one device")
    if draft.dtype != target.dtype:
        raise LabkitError(f"the draft model runs in {draft.dtype} but the target in {target.dtype}; use one dtype")
    if target_tokenizer is not None and draft_tokenizer is not None and target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise LabkitError("the draft model's tokenizer differs from the target's; a draft model must share the target's tokenizer")


def check_drafter_options(kinds: list[str], draft_model: str | None, heads_path: str | None) -> None:
    """What the listed drafters need, checked before any model loads: the model drafter a draft
    model, the heads drafter a folder of heads."""
    from labkit.specdec.heads import check_heads_option

    if "model" in kinds and not draft_model:
        raise LabkitError("--drafter model needs --draft-model (a draft model sharing the target's tokenizer)")
    check_heads_option(kinds, heads_path)


NGRAM_TREE_BRANCHES = 3  # earlier occurrences an ngram-tree draft follows at most
EAGLE_LOOKUP_OVER = 3  # eagle-ngram: lookup's copy replaces the chain after a match of this many tokens


def build_drafter(
    kind: str,
    target: Engine,
    *,
    layers: int | None = None,
    draft_model: str | None = None,
    target_tokenizer: Any = None,
    stop_below: float = 0.0,
    heads_path: str | None = None,
) -> Drafter:
    """make_drafter, loading the draft model first for kind "model" (same device, dtype, graphs)
    and the draft heads for kind "heads" (checked against the target)."""
    draft_engine = None
    if kind == "model":
        if not draft_model:
            raise LabkitError("--drafter model needs --draft-model")
        from labkit.models.loading import load_model

        draft = load_model(draft_model)
        draft_engine = Engine.from_loaded(draft, target.device, target.dtype, weights="dense", cuda_graph=target.cuda_graph)
        check_draft_pair(target, draft_engine, target_tokenizer, draft.tokenizer)
    heads: Any = None
    if kind in ("heads", *EAGLE_KINDS) and heads_path:  # without a path make_drafter says what is missing
        from labkit.specdec.eagle import load_eagle
        from labkit.specdec.heads import fingerprint, load_heads

        load = load_heads if kind == "heads" else load_eagle
        heads = load(heads_path, fingerprint(target.model.lm_head.weight))
    return make_drafter(kind, target, layers=layers, draft_engine=draft_engine, stop_below=stop_below, heads=heads)


def make_drafter(
    kind: str,
    target: Engine,
    *,
    layers: int | None = None,
    draft_engine: Engine | None = None,
    ngram_max: int = 3,
    ngram_min: int = 2,
    stop_below: float = 0.0,
    heads: Any = None,
) -> Drafter:
    """ngram | ngram-graph (prompt lookup whose greedy steps run on the device, specdec/lookup_steps.py) |
    layerskip | truncated | model | heads (trained DraftHeads, see labkit/heads_train.py) | eagle (a trained
    EagleHead, labkit/eagle_train.py; `heads` carries either) | eagle-tree (the same head drafting EAGLE-2's
    dynamic trees, specdec/eagle_tree.py, DynamicTreeConfig.depth deep whatever K) | eagle-ngram (EAGLE
    chains that give way to prompt lookup's copy after an n-gram of EAGLE_LOOKUP_OVER tokens; device steps choose per
    chunk) | eagle-mix (the same rule after an n-gram of MIX_MIN_N tokens, chosen at every device step) | eagle-agree
    (eagle-mix copying where lookup's first token is the chain's first draft or the head is unsure of it) | eagle-lazy
    (eagle-mix whose copy steps leave the draft cache's catch-up to the next chain step) | ngram-tree (prompt
    lookup's token trees, K deep). Default depth for layerskip/truncated: a third of the target.
    stop_below > 0: draft-confidence early stop (the drafter stops at its first token below it)."""
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
        raise LabkitError(f"--layers must be a whole number of at least 1, got {layers!r}")
    depth = layers if layers is not None else max(1, target.args.n_layers // 3)
    if not 0.0 <= stop_below < 1.0:
        raise LabkitError(f"the confidence threshold must be in [0, 1), got {stop_below}")
    if kind in ("ngram", "ngram-graph", "ngram-tree") and stop_below > 0:
        raise LabkitError("the n-gram drafter has no probabilities: a confidence stop needs layerskip, truncated or model")
    if kind == "ngram-graph":
        from labkit.specdec.lookup_steps import LookupGraphDrafter

        return LookupGraphDrafter(target)
    if kind == "ngram":
        return NgramDrafter(max_n=ngram_max, min_n=ngram_min)
    if kind == "ngram-tree":  # on a GPU that captures: one tree shape per K
        # 1-grams too: their several continuations are what a tree verifies at once
        return NgramTreeDrafter(max_n=ngram_max, min_n=1, branches=NGRAM_TREE_BRANCHES, fixed=target.cuda_graph)
    if kind == "layerskip":
        return LayerSkipDrafter(target, depth, stop_below)
    if kind == "truncated":
        return ModelDrafter(truncated_engine(target, depth), target.args.vocab_size, name=f"truncated-{depth}", stop_below=stop_below)
    if kind == "model":
        if draft_engine is None:
            raise LabkitError("--drafter model needs --draft-model")
        check_draft_pair(target, draft_engine)
        return ModelDrafter(draft_engine, target.args.vocab_size, name="model", stop_below=stop_below)
    if kind in ("heads", *EAGLE_KINDS):  # trained weights on the target's features: greedy drafts, no confidence stop
        how = "`python -m labkit heads train" + (" --kind eagle`" if kind != "heads" else "`")
        if heads is None:
            raise LabkitError(f"--drafter {kind} needs --heads (a folder written by {how})")
        if stop_below > 0:
            raise LabkitError(f"the {kind} drafter proposes greedy tokens: a confidence stop needs layerskip, truncated or model")
        from labkit.specdec.eagle_drafter import EagleDrafter

        if kind == "heads":
            return HeadsDrafter(target, heads)
        if kind == "eagle-tree":
            from labkit.specdec.eagle_tree import DynamicTreeConfig

            return EagleDrafter(target, heads, tree=DynamicTreeConfig(depth=min(DynamicTreeConfig.depth, heads.cfg.depth)))
        if kind in ("eagle-mix", "eagle-agree", "eagle-lazy"):
            from labkit.specdec.eagle_mix import AGREE_UNSURE, LAZY_WINDOW, EagleMixDrafter

            return EagleMixDrafter(target, heads, unsure=AGREE_UNSURE if kind == "eagle-agree" else None,
                                   lazy=LAZY_WINDOW if kind == "eagle-lazy" else 0)
        return EagleDrafter(target, heads, lookup_over=EAGLE_LOOKUP_OVER if kind == "eagle-ngram" else 0)
    raise LabkitError(f"unknown drafter {kind!r}: use {', '.join(DRAFTERS)}")
