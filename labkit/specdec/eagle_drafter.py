"""The EAGLE-lite drafter (specdec/eagle.py): a chain of `depth` drafts, one draft-layer pass each,
from the target's features.

Its draft cache holds one element per context position: element p = (h_p, x_{p+1}), true while
p is below `done`. A proposal first catches up the elements the target's last pass made true
(its kept hidden states), then runs the chain from the last of them (the anchor).

Like the draft heads it is its own verify hook: under greedy acceptance the catch-up and the chain
run inside the verify step (captured with it on a GPU), from the verify's hidden states and its
verdict, all on the device: the catch-up feeds every verify row (row j's token is the draft after
it, or the target's next token at the accepted row), and the chain starts from the accepted row.
Rows past it write elements that are stale, never read: each chain position is written again
before any query at or past it looks (the draft's attention sees positions up to its own).

Where the target has CUDA graphs a chain drafter is also its own DeviceSteps (`run_steps`): CHUNK
greedy steps per host read, each verifying the chain the step before drafted inside its verify
(LookupSteps with a hook that drafts chains K deep: catch-up and chain one launch where fused).

eagle-ngram (`lookup_over` n > 0): where the context ends in an n-gram of at least n tokens seen
before, prompt lookup's copy (specdec/lookup.py) is verified instead of the chain: what the head
drafts worst (a RAG answer, a summary quoting its source) and lookup best; the verify keeps it
lossless either way. On the host the rule is per step (on a CPU the verify then only catches up,
and a chain is drafted only where no copy is taken); device steps choose per chunk (a graph
replays one kind of step) between chain steps and copy steps (lookup's drafts, at least COPY_K
wide, each verify's hidden states kept by position: the chain after them catches the draft cache
up over their span in one go), by their measured rates (specdec/copy_or_chain.py).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.errors import LabkitError
from labkit.graphs import GRAPH_MAX_T
from labkit.kernels.reference import LOOKUP_MAX_N
from labkit.models.kvcache import COUNTER_ROWS, KVCache, TreeAttention
from labkit.specdec.copy_or_chain import CopyOrChain
from labkit.specdec.draft import Draft, Drafter, Step
from labkit.specdec.eagle import EagleHead, draft_head_weight
from labkit.specdec.eagle_chain import FusedChain, fused_chain_default
from labkit.specdec.eagle_hooks import CatchUpOnly, ChainOf, KeepHidden
from labkit.specdec.eagle_ops import OnlyIf, after_verify_inputs, draft_layer, target_runs_triton, token_embedding
from labkit.specdec.eagle_tree import DynamicTreeConfig, chain_with_siblings, dynamic_tree
from labkit.specdec.lookup_steps import CHUNK, LookupSteps
from labkit.specdec.tree import TokenTree

COPY_K = 8  # eagle-ngram's copy steps draft at least this many tokens (lookup's best K on the H200 suite)
# The draft layer attends at most this many positions back: its head trains on texts of a few hundred tokens (attention
# further back is untrained); a window bounds a long prompt's catch-up (elements further back are never read) and each pass.
WINDOW = 512


class EagleDrafter(Drafter):
    chunk = CHUNK  # device steps per host read (run_steps)

    def __init__(self, target: Engine, head: EagleHead, dtype: torch.dtype | None = None, width: int = 1,
                 tree: DynamicTreeConfig | None = None, device_steps: bool | None = None, lookup_over: int = 0,
                 window: int = WINDOW, batch_rows: int = 1) -> None:
        """device_steps: chains run CHUNK greedy steps per host read (run_steps); None: where the
        target has CUDA graphs. lookup_over > 0: chains give way to prompt lookup's copy where the
        context ends in an n-gram of at least that many tokens seen before (eagle-ngram). batch_rows: chains drafted at once (batch/eagle.py)."""
        if head.dims.dim != target.args.dim:
            raise LabkitError(f"this EAGLE head has width {head.dims.dim}, the target {target.args.dim}: train it for this target")
        target.keep_hidden_states(every_position=True)
        self.target = target
        if window < 1:
            raise LabkitError(f"EAGLE's attention window is at least one position, got {window}")
        self.window = window  # the draft layer's attention reaches this many positions back (WINDOW)
        # The head drafts in the target's dtype (it trains under bf16 autocast on a GPU), with fp32
        # rotary tables. fp32 drafting on an H200 cost 1.4 ms a step through the fused kernels
        # (their fp32 dots run without tensor cores), against ~0.55 ms for the verify itself.
        self.dtype = dtype or (torch.float32 if target.amp else target.dtype)
        self.head = head.cast(target.device, self.dtype).eval()
        self.depth = head.cfg.depth
        n_vocab = int(head.vocab_ids.numel())
        reduced = n_vocab < target.args.vocab_size
        self.name = f"eagle-{self.depth}" + (f"-v{n_vocab}" if reduced else "")
        self.embed = token_embedding(target.model)
        self.weight = draft_head_weight(self.head, target.model.lm_head.weight.to(self.dtype))  # (N, D)
        self.ids = self.head.vocab_ids.to(target.device)  # (N,) draft row -> target id
        self.max_t = self.depth + 1  # the widest verify whose next draft it makes
        self.pass_t = max(1, COUNTER_ROWS // (head.dims.n_heads // head.dims.n_kv_heads))  # elements per draft-layer pass
        if width < 1:
            raise LabkitError(f"EAGLE's tree width is the candidates per depth (>= 1), got {width}")
        self.width = width  # > 1: token trees (a chain and width-1 leaf siblings at every depth)
        self.tree = tree  # dynamic trees (EAGLE-2): the draft layer expands its best candidates (eagle_tree.py)
        self.verify_hook: Any = self
        self.name += f"-w{width}" if width > 1 else ""
        self.head, self.ops, self.draft_head = draft_layer(target, self.head, self.weight)  # (on a CPU's blocks: a copy of the head)
        # a draft pass's ends in the fused operations (draft_triton.py) where the embedding is a table
        self.embed_weight = self.embed.weight if isinstance(self.embed, torch.nn.Embedding) else None  # (V, D) a table, or a CPU's blocks
        rows = max(16, target.batch_size, batch_rows)
        self._counting = torch.arange(max(GRAPH_MAX_T, rows) + 1, device=target.device)  # 0, 1, ...: sliced, not launched in every step
        self._pick_scratch = (torch.zeros(rows, dtype=torch.long, device=target.device), torch.zeros(rows // 16 + 1, dtype=torch.int32, device=target.device))  # draft_argmax's
        self.fused_chain, self._fused = fused_chain_default(), FusedChain(self)  # chains in one launch where the ops are Triton's (eagle_chain.py)
        self._triton = target_runs_triton(target)  # the ops are the Triton kernels: compile their widths before a request
        if tree is not None:
            tree.validate(self.depth)
            if self.ops is None:
                raise LabkitError("dynamic EAGLE trees need the fused draft layer: a CPU, or a GPU target on Triton layers")
            self.name += f"-tree{tree.nodes}"
        if lookup_over and (not 1 <= lookup_over <= LOOKUP_MAX_N or width > 1 or tree is not None):
            raise LabkitError(f"eagle-ngram takes lookup's copy after an n-gram of 1 to {LOOKUP_MAX_N} tokens, "
                              f"for chains only; got n = {lookup_over}, width {width}, tree {tree is not None}")
        self.name += f"+ngram{lookup_over}" if lookup_over else ""
        self.lookup_over = lookup_over
        self.copying = False  # eagle-ngram's device steps: the next chunk runs copy steps
        self._copied_from, self._copied_to = -1, -1  # copy steps ran from, to these positions: their hidden states wait in _hist for the chain
        self._hist: torch.Tensor | None = None  # (B, S, D) the target's hidden states by position, kept by copy steps (eagle-ngram)
        self._watch = KeepHidden(self)
        self._anchor_len = -1  # a catch-up-only verify made the draft cache true for this context length ...
        self.anchor_feat = torch.zeros(target.batch_size, head.dims.dim, dtype=self.dtype, device=target.device)  # ... (B, D) its anchor's feature
        if lookup_over and target.device.type == "cpu":  # a verify's work costs what a proposal's does: chains only where no copy is taken
            self.verify_hook = CatchUpOnly(self)
        self.choice = CopyOrChain(max(1, lookup_over))  # copy or chain steps, per chunk (its rates and switch time: read-only outside)
        if (target.cuda_graph if device_steps is None else device_steps) and width == 1 and tree is None:
            self.device_steps = self
        self._steps_used: set[tuple[int, int]] = set()  # (width, copy steps?) whose device steps ran in this request (eagle-mix: (width, depth))
        self.done = 0  # the draft cache holds the true elements 0..done-1
        self.chain_depth = self.depth  # the chain a verify drafts: on the host's steps, as deep as the last proposal asked
        self._prepared: tuple[int, list[int]] | None = None  # (context length, draft) the last verify made
        self._draft_cache: KVCache | None = None
        self._warm = False  # the draft layer's Triton kernels compiled for every kind of width (_warm_up)
        self._cache(target.batch_size)

    # -- the draft cache ----------------------------------------------------------------------
    def _cache(self, B: int) -> KVCache:
        """One layer's keys and values, (B, nkv, S, hd), S past the target cache's end by the widest
        verify and chain (captures write there), and the rotary table over them. Reallocated (at
        start, on the host) only when the target's cache was resized, which drops every captured
        graph that read the old buffers."""
        S = self.target.cache.max_len + self.max_t + self.depth + 1 + (self.tree.slots if self.tree is not None else 0)
        cache = self._draft_cache
        if cache is None or cache.max_len != S or cache.batch_size != B:
            dims = self.head.dims
            cache = KVCache(1, B, dims.n_kv_heads, S, dims.head_dim, dtype=self.dtype, device=self.target.device)
            self.head.rope_table(S, self.target.device)
            self._draft_cache = cache
            if self.lookup_over:
                self._hist = torch.zeros(B, S, self.head.dims.dim, dtype=self.dtype, device=self.target.device)
        return cache

    def elements(self, feats: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor, tree: TreeAttention | None = None,
                 cache: KVCache | None = None, clamped: bool = False) -> torch.Tensor:
        """feats (B, T, D), tokens (B, T), pos (B, T) or (T,) (clamped: within the cache already) -> predicted features (B, T, D),
        the draft cache (or `cache`: another draft cache's rows, batch/eagle.py) written at pos (a tree's: at their slots)."""
        cache = self._draft_cache if cache is None else cache
        assert cache is not None
        T = tokens.shape[1]
        if tree is None and T > self.pass_t:  # a long prompt's catch-up: passes the attention's counters cover
            return torch.cat([self.elements(feats[:, i : i + self.pass_t], tokens[:, i : i + self.pass_t], pos[..., i : i + self.pass_t], cache=cache)
                              for i in range(0, T, self.pass_t)], dim=1)
        return self._pass(feats, tokens, pos if clamped else pos.clamp(max=cache.max_len - 1), tree, cache=cache)

    def _pass(self, feats: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor, tree: TreeAttention | None = None,
              ops: Any = None, cache: KVCache | None = None) -> torch.Tensor:
        """One draft-layer pass of elements at pos (within the draft cache) -> (B, T, D) predicted features."""
        cache, ops = self._draft_cache if cache is None else cache, ops or self.ops
        assert cache is not None
        fused = self.embed_weight is not None and hasattr(ops, "embed_fc")  # the embedding gathered inside the fc's kernel
        emb = None if fused else self.embed(tokens).to(self.dtype)  # (B, T, D)
        return self.head.forward_cached(feats.to(self.dtype), emb, pos, cache, ops, tree, tokens=tokens, embed=self.embed_weight, window=self.window)

    def _logits(self, feat: torch.Tensor) -> torch.Tensor:  # (M, D) -> (M, N) over the draft vocabulary
        return feat @ self.weight.t() if self.draft_head is None else self.draft_head(feat)

    def log_probs(self, feat: torch.Tensor) -> torch.Tensor:  # (M, D) -> (M, N) over the draft vocabulary
        return torch.log_softmax(self._logits(feat).float(), dim=-1)

    def first_draft(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, D) anchor -> (B,) the chain's first draft (its own pick), (B,) the head's probability of it
        return self._pick(feat)[:, 0], torch.softmax(self._logits(feat).float(), dim=-1).amax(-1)

    def _pick(self, feat: torch.Tensor, width: int = 1, ops: Any = None) -> torch.Tensor:  # (B, D) -> (B, width) target ids, best first
        if width == 1 and self.draft_head is None and hasattr(ops := ops or self.ops, "draft_argmax"):  # one launch: product, argmax, id
            return ops.draft_argmax(feat.contiguous(), self.weight, self.ids, self._pick_scratch)[:, None]
        logits = self._logits(feat)  # (B, N)
        return self.ids[logits.argmax(-1, keepdim=True) if width == 1 else logits.topk(width, dim=-1).indices]

    def chain(self, feat: torch.Tensor, anchor: torch.Tensor | None, width: int = 1, depth: int | None = None,
              only_if: torch.Tensor | None = None, cache: KVCache | None = None, pos: torch.Tensor | None = None) -> torch.Tensor:
        """feat (B, D) the anchor's predicted feature, anchor (B,) its position (or pos (depth - 1, B), the chain's) -> (B, depth,
        width) the best `width` drafts at each depth of the chain (default: the head's depth), which follows the best.
        only_if (1,) bool: where false the fused ops' launches may be called off (the drafts are then
        anything, the draft cache past the anchor unwritten; eagle_ops.OnlyIf)."""
        depth, cache = depth or self.depth, self._draft_cache if cache is None else cache  # (cache: another draft cache's rows, batch/eagle.py)
        ops = self.ops if only_if is None or not getattr(self.ops, "TAKES_ONLY_IF", False) else OnlyIf(self.ops, only_if)
        assert cache is not None
        if pos is None:  # (depth - 1, B): depth d's element sits at anchor + d - 1 (a row each, so each depth's is contiguous)
            assert anchor is not None
            pos = (anchor[None, :] + self._counting[1:depth, None]).clamp_(max=cache.max_len - 1)
        if cache is self._draft_cache and self._fused.serves(self.ops, width):  # one launch (eagle_chain.py), the same drafts
            return self._fused(feat, pos, cache, only_if)[:, :, None]
        top = self._pick(feat, width, ops)  # (B, width)
        drafts = [top]
        for d in range(2, depth + 1):
            feat = self._pass(feat[:, None], top[:, :1], pos[d - 2][:, None], ops=ops, cache=cache)[:, 0]
            top = self._pick(feat, width, ops)
            drafts.append(top)
        return torch.stack(drafts, dim=1)

    # -- the drafter --------------------------------------------------------------------------
    def start(self, prompt_ids: list[int], capacity: int) -> None:
        self.done, self._prepared, self._steps_used = 0, None, set()
        self.copying, self._copied_from, self._copied_to, self._anchor_len = False, -1, -1, -1
        self.choice.start(prompt_ids, capacity)
        self._cache(self.target.batch_size)  # the target's cache may have grown since
        if self._triton and not self._warm:
            self._warm_up()

    def tree_shapes(self, max_k: int) -> list[TokenTree]:
        if self.tree is not None:  # any structure of `nodes` nodes: one step per depth (the tree's own, whatever K)
            n = self.tree.nodes
            return [TokenTree([-1, *range(d), *[0] * (n - d)]) for d in range(1, self.tree.depth + 1)]
        if self.width == 1:
            return []
        return [chain_with_siblings([[0] * self.width] * k).tree() for k in range(1, min(max_k, self.depth) + 1)]

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Compile the draft layer's Triton kernels for each kind of width they are specialised on
        (1, a multiple of 16, any other; rows at shared or own positions) before a request is timed:
        a new kind met mid-request stalled it 2.1 s on the H200. The elements it writes are
        rewritten before any is read (a request's first proposal catches up from position 0)."""
        B, D, device = self.target.batch_size, self.head.dims.dim, self.target.device
        for n in (1, 2, 16):
            feats = torch.zeros(B, n, D, dtype=self.dtype, device=device)
            tokens = torch.zeros(B, n, dtype=torch.long, device=device)
            self.elements(feats, tokens, torch.arange(n, device=device))
        self.chain(torch.zeros(B, D, dtype=self.dtype, device=device), torch.zeros(B, dtype=torch.long, device=device))
        self._warm = True

    @torch.inference_mode()
    def draft_after(self, hidden: torch.Tensor, verdict: torch.Tensor, lm_head: torch.nn.Module,
                    tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Inside the verify step: hidden (B, T, D), verdict (B, 2), tokens (B, T) at input_pos (T,)
        -> (B, depth * width) the next step's candidates (a tree step hands its path as these rows)."""
        if self.tree is not None:
            return dynamic_tree(self, self.catch_up(hidden, verdict, tokens, input_pos), input_pos[:1] + verdict[:, 0], self.tree)[None]  # (1, 2 * nodes)
        depth = self.depth if hidden.is_cuda and torch.cuda.is_current_stream_capturing() else self.chain_depth  # a captured step replays at any K
        return self.catch_up_chain(hidden, verdict, tokens, input_pos, depth, width=self.width)  # (B, depth * width)

    def catch_up(self, hidden: torch.Tensor, verdict: torch.Tensor, tokens: torch.Tensor, input_pos: torch.Tensor,
                 cache: KVCache | None = None, inputs: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """Inside the verify step: the draft cache's (or `cache`'s) elements for every verified row (row j's token is the draft after
        it, or the target's next token at the accepted row; inputs: after_verify_inputs') -> (B, D) the accepted row's predicted feature."""
        after, at, _ = inputs or self.verify_inputs(tokens, verdict, input_pos, 1, cache)  # (B, T), positions
        feats = self.elements(hidden, after, at, cache=cache, clamped=True)  # (B, T, D)
        return feats.gather(1, verdict[:, 0:1, None].expand(hidden.shape[0], 1, feats.shape[2]))[:, 0]

    def catch_up_chain(self, hidden: torch.Tensor, verdict: torch.Tensor, tokens: torch.Tensor, input_pos: torch.Tensor, depth: int,
                       only_if: torch.Tensor | None = None, cache: KVCache | None = None, width: int = 1) -> torch.Tensor:  # -> (B, depth * width)
        """catch_up, then the chain from the accepted row (only_if false: the catch-up only) in the draft cache (or
        `cache`'s rows, batch/eagle.py), one launch where fused (eagle_chain.py), else their inputs in one (after_verify_inputs)."""
        if cache is None and self._fused.serves(self.ops, width, hidden):
            return self._fused.after_verify(hidden, verdict, tokens, input_pos, self._draft_cache, depth, only_if)
        inputs = self.verify_inputs(tokens, verdict, input_pos, depth, cache)
        feat = self.catch_up(hidden, verdict, tokens, input_pos, cache, inputs)  # (B, D)
        return self.chain(feat, None, width, depth, only_if=only_if, cache=cache, pos=inputs[2]).flatten(1)

    def verify_inputs(self, tokens: torch.Tensor, verdict: torch.Tensor, input_pos: torch.Tensor, depth: int,
                      cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """after_verify_inputs (eagle_ops.py) of a verify, within the draft cache (or `cache`): the catch-up's and the chain's inputs."""
        cache = self._draft_cache if cache is None else cache
        assert cache is not None
        return after_verify_inputs(self.ops, tokens, verdict, input_pos, depth, cache.max_len - 1, self._counting)

    def take(self, tokens: list[int], context_len: int) -> None:
        self._prepared = (context_len, tokens)

    def keep_hidden(self, hidden: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D) a verify's states at input_pos (T,), kept for the catch-up after copy steps -> (B, S, D) all kept, by position."""
        kept = self._hist
        assert kept is not None
        return kept.index_copy_(1, input_pos.clamp(max=kept.shape[1] - 1), hidden.to(kept.dtype))  # (B, S, D) at the T positions

    def anchored(self, context_len: int) -> None:  # a catch-up-only verify made the draft cache true for this length (anchor_feat: its anchor's)
        self._anchor_len = context_len

    def _steps(self, k: int, copy: bool) -> tuple[LookupSteps, bool]:
        """The device steps of width k (chain or copy steps), and whether this request is new to them."""
        key, hook = ("eagle-copy-steps", self._watch) if copy else ("eagle-steps", ChainOf(self, k))
        steps = self.target.captured((key, self, k), lambda: LookupSteps(self.target, k, hook=hook, n_cols=0 if copy else k))
        fresh = (k, copy) not in self._steps_used
        self._steps_used.add((k, copy))
        return steps, fresh

    @torch.inference_mode()
    def run_steps(self, context: list[int], k: int, m: int, eos_mask: torch.Tensor, eos_until: int) -> list[Step]:
        """m greedy steps on the device per host read (DeviceSteps): each step verifies the chain
        the step before drafted inside its verify (LookupSteps with this drafter as its hook), the
        first the host's draft; the last step's chain is kept for the next proposal. eagle-ngram
        runs copy steps instead where they rate faster (module docstring)."""
        k_chain, k_copy = min(k, self.depth), self.copy_width(len(context), k, m)
        if self.lookup_over:  # both kinds captured on the first chunk, before either is needed mid-request
            copy_steps, copy_fresh = self._steps(k_copy, copy=True)
        chain_steps, chain_fresh = self._steps(k_chain, copy=False)
        switch_s = None  # a chain chunk's proposal after copy steps (copy_or_chain.py weighs it apart from the steps)
        if self.lookup_over and self.copying:
            if self._copied_from < 0:  # the first copy step's pass holds the first hidden state past the true elements
                self._copied_from = len(context) - 1
            t0 = time.perf_counter()
            out = copy_steps.run(context, m, eos_mask, eos_until, copy_fresh)
            self._copied_to = len(context) + sum(len(new) for _, new in out)
        else:
            t_propose, after_copy = time.perf_counter(), self._copied_from >= 0
            first = self.propose(context, k_chain, GenerationConfig(), None).tokens
            t0 = time.perf_counter()
            switch_s = t0 - t_propose if after_copy else None
            out = chain_steps.run(context, m, eos_mask, eos_until, chain_fresh, cols=first)
            self.take(chain_steps.last_cols, len(context) + sum(len(new) for _, new in out))
        if self.lookup_over:
            self.copying = self.next_copying(context, out, time.perf_counter() - t0, k_copy, switch_s)
        return out

    def copy_width(self, context_len: int, k: int, m: int) -> int:
        """m copy steps' width from a context of context_len tokens: COPY_K at least; near the cache's end as wide as asked."""
        return k if context_len - 1 + m * (max(k, COPY_K) + 1) > self.target.max_seq_len else max(k, COPY_K)

    def next_copying(self, context: list[int], steps: list[Step], seconds: float, k_copy: int,
                     switch_s: float | None = None) -> bool:
        """Whether the next chunk runs copy steps, after this one's steps from `context` (seconds of
        device steps; switch_s: the proposal's time when it followed copy steps)."""
        return self.choice.after_chunk(context, steps, self.copying, seconds, k_copy, switch_s)

    @torch.inference_mode()
    def propose(self, context: list[int], k: int, config: GenerationConfig, generator: torch.Generator | None) -> Draft:
        copy = self.choice.copy(context, min(k, self.depth)) if self.lookup_over else None
        if copy is None:
            return self._propose(context, k)
        prepared, self._prepared = self._prepared, None  # the context ends in a match: lookup's copy, the draft cache
        if prepared is not None and prepared[0] == len(context):  # kept true (a verify that drafted a chain caught it up)
            self.done = len(context) - 1
        else:
            self._catch_up_to(context)
        return Draft(copy)

    def _propose(self, context: list[int], k: int) -> Draft:
        k = min(k, self.depth)
        if self.width == 1 and self.tree is None:  # the next verify drafts a chain as deep as this proposal (a pass per depth)
            self.chain_depth = k
        L = len(context)  # the target's cache holds context[:-1]: true elements 0..L-2
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared[0] == L and len(prepared[1]) >= k * self.width:  # the verify step caught up and drafted
            self.done = L - 1
            return self._draft(prepared[1], k)
        anchor_feat = self._catch_up_to(context)  # (B, D)
        anchor = torch.full((self.target.batch_size,), L - 2, device=self.target.device)
        if self.tree is not None:
            return self._draft(dynamic_tree(self, anchor_feat, anchor, self.tree).tolist(), k)
        return self._draft(self.chain(anchor_feat, anchor, self.width, self.chain_depth)[0].flatten().tolist(), k)

    def _catch_up_to(self, context: list[int]) -> torch.Tensor:  # -> (B, D)
        """The draft cache's elements true up to the context's last position but one -> the
        predicted feature there, the anchor of the next chain."""
        L = len(context)  # the target's cache holds context[:-1]: true elements 0..L-2
        if self._anchor_len == L:  # a catch-up-only verify did it (CatchUpOnly)
            self.done, self._anchor_len = L - 1, -1
            return self.anchor_feat
        first = self.first_needed(L)
        if self._copied_from >= 0:  # copy steps ran: catch up over their span from the hidden states they kept
            start, end = min(max(self._copied_from, first), L - 2), min(self._copied_to, L) - 1
            self._copied_from = -1
            assert self._hist is not None
            if end > start:  # (a span wholly before the window: never read)
                anchor_feat = self.elements_at(context, self._hist[:, start:end], start)
                if end == L - 1:
                    return anchor_feat
            # steps after them that kept no hidden states here (a plain step): from the last pass, below
        # Elements the last pass made true. One not in it (a step that proposed nothing, then
        # another) keeps a stale element: worse drafts there, never a wrong output.
        start = min(max(self.done, self.target.kept_hidden.start, first), L - 2)
        return self.elements_at(context, self.target.hidden_span(start, L - 1), start)

    def first_needed(self, L: int) -> int:
        """The first position a chain from a context of L tokens reads (L - 2, `window` back): catch-ups start there at the earliest."""
        return max(0, L - 1 - self.window)

    def elements_at(self, context: list[int], feats: torch.Tensor, start: int, cache: KVCache | None = None) -> torch.Tensor:
        """feats (B, n, D) the target's hidden states at positions start.. -> the draft cache's (or `cache`'s) elements there
        written (tokens from the context), done moved past them -> (B, D) the last's predicted feature."""
        B, n, _ = feats.shape
        device = self.target.device
        tokens = torch.tensor([context[start + 1 : start + 1 + n]], device=device).expand(B, -1)  # (B, n)
        pos = torch.arange(start, start + n, device=device)  # (n,)
        self.done = start + n
        return self.elements(feats, tokens, pos, cache=cache)[:, -1]

    def _draft(self, flat: list[int], k: int) -> Draft:
        """(depth * width,) candidates, best first at each depth -> the first k depths' chain or tree; dynamic trees (2 * nodes,)
        tokens and parents -> the whole tree, the drafter's depth whatever K (one captured size; generate cuts it at the budget)."""
        if self.tree is not None:
            n = self.tree.nodes
            return Draft(flat[:n], parents=flat[n:])
        top = [flat[d * self.width : (d + 1) * self.width] for d in range(k)]
        return Draft([row[0] for row in top]) if self.width == 1 else chain_with_siblings(top)
