"""A token tree verified in one target pass, its accepted path committed, and the drafter's next
draft made, all in one step (specdec/tree.py defines the terms).

`TreeVerify` is one tree shape's greedy step on an engine:
  1. the pass: the N nodes at cache slots start..start+N-1 and rotary positions start + depth,
     each attending to the context and its own ancestors (the fused layers' tree mask, or a
     boolean mask for the PyTorch layers); the target's greedy token after every node (EOS
     blocked at the depths the request asks);
  2. the walk, on the device: a node is accepted when it and every ancestor drafted the target's
     token after its parent; the deepest accepted node ends the path (the first, at equal depth:
     any accepted path is the target's own greedy text), and the target's token after it is the
     step's next token;
  3. the commit: the path's keys and values (every layer) move to the slots right after the
     root, so the cache holds the accepted text in order;
  4. with a verify hook (EAGLE), the drafter's next draft from the path's hidden states, handed
     the path as the chain verify would hand its rows (graphs.VerifyHook).
Sampling runs the same pass and commit with its acceptance rule on the host between them
(`run_host`: multi-draft rejection sampling, policies.RejectionSampling.accept_tree).
The tree's structure (parents, hence depths, ancestors, sibling order) is data in the step's
buffers, copied in when it changes: one TreeVerify (on a GPU that captures graphs, one captured
graph) serves every tree of N nodes and depth at most max_depth, static shapes and dynamic trees
alike, and the host reads one row back: [accepted, next token, the path's nodes by depth (0 past
its end), the hook's columns].
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from labkit.engine import Engine
from labkit.errors import LabkitError
from labkit.graphs import VerifyHook, capture
from labkit.kernels.layer_reference import tree_keys_seen
from labkit.models.kvcache import TreeAttention
from labkit.specdec.tree import TokenTree


class TreeVerify:
    @torch.inference_mode()  # its capture runs the step, which writes the (inference-mode) cache
    def __init__(self, engine: Engine, size: int, max_depth: int, hook: VerifyHook | None = None) -> None:
        if getattr(engine.model, "family", "") != "llama" or engine.batch_size != 1:
            raise LabkitError("token trees run on Llama-family models at batch size 1")
        if hook is not None and not engine.model.keep_hidden:
            raise LabkitError("a verify hook reads the hidden states: call keep_hidden_states first")
        self.engine, self.size, self.max_depth, self.hook = engine, size, max_depth, hook
        N, device = size, engine.device
        self.tokens = torch.zeros(1, N, dtype=torch.long, device=device)  # (1, N) root's token, then the drafts
        self.slots = torch.arange(N, device=device)  # (N,) start + i
        self.structure = torch.zeros(3, N, dtype=torch.long, device=device)  # depth, parent (the root its own), walk rank
        self.depth, self.parent, self.rank = self.structure.unbind(0)  # (N,) each
        self.levels = torch.arange(1, max_depth + 1, device=device)  # (maxD,)
        self.attn = TreeAttention(torch.zeros(N, dtype=torch.long, device=device),  # start + depth
                                  torch.zeros(1, dtype=torch.long, device=device),  # start
                                  torch.zeros(N, N, dtype=torch.int8, device=device))  # ancestor mask
        self.parents: list[int] = []  # the structure in the buffers
        self.set_tree(TokenTree.chain(N - 1) if N - 1 <= max_depth else TokenTree([-1] + [0] * (N - 1)))
        self.eos_mask = torch.zeros(engine.args.vocab_size, dtype=torch.bool, device=device)  # (V,)
        self.block = torch.zeros(1, dtype=torch.long, device=device)  # EOS blocked at depths < this
        self.out = torch.empty(0)  # (2 + maxD + hook columns,) what the host reads
        self.hidden: torch.Tensor | None = None  # (1, 1 + maxD, D) the path's hidden states (root first)
        self.captured = engine.graphs_safe and engine.device.type == "cuda"
        self.graph = capture(engine, self._body, lambda: self._place(engine.cache.max_len - N)) if self.captured else None

    @torch.inference_mode()
    def set_tree(self, tree: TokenTree) -> None:
        """Copy a tree's structure into the buffers (nothing when it is the one there)."""
        if tree.parents == self.parents:
            return
        N, depths = self.size, tree.depths()
        if tree.size != N or max(depths) > self.max_depth:
            raise LabkitError(f"this tree step takes {N} nodes at most {self.max_depth} deep, got {tree.size} nodes {max(depths)} deep")
        depth = torch.tensor(depths)
        rank = depth * N + (N - 1 - torch.arange(N))  # deepest first, then the lowest index: the walk's choice as one argmax
        self.structure.copy_(torch.stack((depth, torch.tensor([max(p, 0) for p in tree.parents]), rank)), non_blocking=True)
        self.attn.mask.copy_(tree.ancestor_mask().to(torch.int8), non_blocking=True)
        self.parents = list(tree.parents)

    def _place(self, start: int) -> None:
        torch.arange(start, start + self.size, out=self.slots)
        torch.add(self.depth, start, out=self.attn.rope_pos)
        self.attn.base.fill_(start)

    def _mask(self, attend_len: int) -> torch.Tensor | None:
        """(N, attend_len) bool for the PyTorch layers (None where the fused layers read the tree)."""
        model = self.engine.model
        if model.layer_ops is not None and getattr(model.layer_ops, "TREES", False) and model.runs_fused(self.size):
            return None
        keys = torch.arange(attend_len, device=self.slots.device)  # (S,)
        return (keys[None, :] <= self.slots[:, None]) & tree_keys_seen(keys, self.attn.base, self.attn.mask)

    def _forward(self) -> torch.Tensor:  # -> (1, N, V) the target's logits after every node
        engine = self.engine
        attend_len = engine.attend_len if self.captured else int(self.slots[-1]) + 1
        return engine.model(self.tokens, self.slots, engine.cache, attend_len, self._mask(attend_len), False, None, tree=self.attn)

    def _commit(self, path: torch.Tensor) -> torch.Tensor:  # path (maxD,) -> rows (1 + maxD,): root, then the path
        """The path's keys and values to the slots after the root (rows past the path: dead
        slots), and the path's hidden states kept for drafters."""
        cache, engine = self.engine.cache, self.engine
        src, dst = self.attn.base + path, self.attn.base + self.levels  # (maxD,) each
        cache.k.index_copy_(3, dst, cache.k.index_select(3, src))  # (L, B, H, maxD, D), gathered before written
        cache.v.index_copy_(3, dst, cache.v.index_select(3, src))
        rows = torch.cat((path.new_zeros(1), path))  # (1 + maxD,)
        hidden = engine.model.last_hidden if engine.model.keep_hidden else None
        self.hidden = None if hidden is None else hidden.index_select(1, rows)  # (1, 1 + maxD, D)
        return rows

    def _body(self) -> None:
        engine = self.engine
        tokens = self.tokens[0]  # (N,)
        logits = self._forward()  # (1, N, V)
        blocked = (self.depth < self.block)[:, None] & self.eos_mask[None, :]  # (N, V)
        targets = logits[0].masked_fill(blocked, float("-inf")).argmax(-1)  # (N,) the target's token after each node
        verdict, path = self.walk(tokens, targets)  # (2,), (maxD,)
        rows = self._commit(path)
        columns = [verdict, path]
        if self.hook is not None:
            assert self.hidden is not None
            columns.append(self.hook.draft_after(self.hidden, verdict[None], engine.model.lm_head, tokens[rows][None],
                                                 self.attn.base + torch.arange(1 + self.max_depth, device=rows.device))[0])
        self.out = torch.cat(columns)

    def walk(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (N,) the nodes' tokens, targets (N,) the target's greedy token after each node ->
        (accepted drafts, next token) (2,) and the path's node at each depth (maxD,; 0 past its
        end): specdec.tree.greedy_walk on the device, with no host read."""
        ancestors = self.attn.mask.bool()  # (N, N)
        match = (tokens == targets[self.parent]) | (self.depth == 0)  # (N,) drafted what its parent's row says
        accepted = ~(ancestors & ~match[None, :]).any(-1)  # (N,) it and every ancestor matched
        # (1,), not a 0-d index: indexing by a 0-d tensor reads it on the host, which capture forbids
        best = torch.where(accepted, self.rank, -1).argmax(0, keepdim=True)  # (1,) the path's last node
        verdict = torch.cat((self.depth[best], targets[best]))  # (2,)
        path = (ancestors[best] & (self.depth[None, :] == self.levels[:, None])).int().argmax(-1)  # (maxD,)
        return verdict, path

    @torch.inference_mode()
    def run(self, tree: TokenTree, tokens: list[int], eos_mask: torch.Tensor, block: int) -> tuple[list[int], int, list[int]]:
        """The tree's tokens (N: the root's, then the drafts) at the next cache slots -> (the
        accepted path's nodes, the next token, the hook's columns). The cache then holds the root
        and the path; their hidden states are kept for drafters."""
        engine = self.engine
        self.eos_mask.copy_(eos_mask, non_blocking=True)
        self.block.fill_(block)
        start = self._load(tree, tokens)
        with engine.autocast():
            if self.graph is not None:
                self.graph.replay()
            else:
                self._body()
        out = self.out.tolist()
        n = out[0]
        self._settle(start, n)
        return out[2 : 2 + n], out[1], out[2 + self.max_depth :]

    def _load(self, tree: TokenTree, tokens: list[int]) -> int:
        """The tree's structure and tokens into the step's buffers, placed after the cache's
        positions; returns that start."""
        start = self.engine.length
        self.set_tree(tree)
        if start + self.size > self.engine.cache.max_len:
            raise LabkitError(f"a tree of {self.size} nodes does not fit after {start} cached positions")
        self.tokens.copy_(torch.tensor([tokens], device=self.engine.device), non_blocking=True)
        self._place(start)
        return start

    def _settle(self, start: int, n: int) -> None:
        """The cache holds the root and the n accepted nodes; their hidden states are kept."""
        self.engine.set_length(start + 1 + n)
        if self.hidden is not None:
            self.engine.kept_hidden.keep(self.hidden[:, : 1 + n], start + 1 + n)

    @torch.inference_mode()
    def run_host(self, tree: TokenTree, tokens: list[int], pick: Callable[[torch.Tensor], tuple[list[int], int]]) -> tuple[list[int], int]:
        """The pass (eagerly), then `pick` (an acceptance rule on the host: the target's logits
        after every node (N, V) -> the accepted path's nodes, the next token), then the commit of
        that path: sampling's multi-draft rejection over the tree (policies.RejectionSampling)."""
        engine = self.engine
        start = self._load(tree, tokens)
        with engine.autocast():
            logits = self._forward()[0]  # (N, V)
        path, next_token = pick(logits)
        with engine.autocast():
            self._commit(torch.tensor(path + [0] * (self.max_depth - len(path)), device=engine.device))
        self._settle(start, len(path))
        return path, next_token


def tree_verify(engine: Engine, size: int, max_depth: int, hook: VerifyHook | None = None) -> TreeVerify:
    """The engine's TreeVerify for trees of `size` nodes at most max_depth deep and this hook, made
    once per attention span and capture mode (a new request may change either: then it is
    captured again)."""
    key = ("tree", size, max_depth, hook, engine.graphs_safe)
    return engine.captured(key, lambda: TreeVerify(engine, size, max_depth, hook))
