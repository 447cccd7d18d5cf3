"""A token tree verified in one target pass, and the accepted path committed (specdec/tree.py
defines the terms).

`TreeVerify` is one tree shape's greedy verify on an engine: its N nodes run at cache slots
start..start+N-1 and rotary positions start + depth, each attending to the context and its own
ancestors (the fused layers' tree mask, or a boolean mask for the PyTorch layers), and the
target's greedy token after every node comes back (EOS blocked at depths the request asks). On
a GPU that captures graphs it is one captured graph per shape, like the chain's verify.

`commit_path` then moves the accepted nodes' keys and values (every layer) to the slots right
after the root, so the cache holds the accepted text in order, and keeps their hidden states
for drafters that read them.
"""

from __future__ import annotations

import torch

from labkit.engine import Engine
from labkit.errors import LabkitError
from labkit.graphs import capture
from labkit.models.kvcache import TreeAttention
from labkit.specdec.tree import TokenTree


class TreeVerify:
    def __init__(self, engine: Engine, tree: TokenTree) -> None:
        if getattr(engine.model, "family", "") != "llama" or engine.batch_size != 1:
            raise LabkitError("token trees run on Llama-family models at batch size 1")
        self.engine, self.tree = engine, tree
        N, device = tree.size, engine.device
        self.tokens = torch.zeros(1, N, dtype=torch.long, device=device)  # (1, N) root's token, then the drafts
        self.slots = torch.arange(N, device=device)  # (N,) start + i
        self.depth = torch.tensor(tree.depths(), device=device)  # (N,)
        self.attn = TreeAttention(torch.zeros(N, dtype=torch.long, device=device),  # start + depth
                                  torch.zeros(1, dtype=torch.long, device=device),  # start
                                  tree.ancestor_mask().to(torch.int8).to(device))
        self.eos_mask = torch.zeros(engine.args.vocab_size, dtype=torch.bool, device=device)  # (V,)
        self.block = torch.zeros(1, dtype=torch.long, device=device)  # EOS blocked at depths < this
        self.targets = torch.empty(0)  # (N,) the target's greedy token after each node
        self.hidden: torch.Tensor | None = None  # (1, N, D) the pass's final hidden states (kept ones)
        self.captured = engine.graphs_safe and engine.device.type == "cuda"
        self.graph = capture(engine, self._body, lambda: self._place(engine.cache.max_len - N)) if self.captured else None

    def _place(self, start: int) -> None:
        torch.arange(start, start + self.tree.size, out=self.slots)
        torch.add(self.depth, start, out=self.attn.rope_pos)
        self.attn.base.fill_(start)

    def _mask(self, attend_len: int) -> torch.Tensor | None:
        """(N, attend_len) bool for the PyTorch layers (None where the fused layers read the tree)."""
        model = self.engine.model
        if model.layer_ops is not None and getattr(model.layer_ops, "TREES", False) and model.runs_fused(self.tree.size):
            return None
        keys = torch.arange(attend_len, device=self.slots.device)  # (S,)
        node = keys - self.attn.base  # (S,) the tree node at each key, negative before the tree
        in_tree = (node >= 0) & (node < self.tree.size)
        allowed = self.attn.mask.bool()[:, node.clamp(0, self.tree.size - 1)]  # (N, S)
        return (keys[None, :] <= self.slots[:, None]) & (~in_tree[None, :] | allowed)

    def _body(self) -> None:
        engine = self.engine
        attend_len = engine.attend_len if self.captured else int(self.slots[-1]) + 1
        logits = engine.model(self.tokens, self.slots, engine.cache, attend_len, self._mask(attend_len), False, None,
                              tree=self.attn)  # (1, N, V)
        blocked = (self.depth < self.block)[:, None] & self.eos_mask[None, :]  # (N, V)
        self.targets = logits[0].masked_fill(blocked, float("-inf")).argmax(-1)  # (N,)
        self.hidden = engine.model.last_hidden if engine.model.keep_hidden else None

    @torch.inference_mode()
    def run(self, tokens: list[int], eos_mask: torch.Tensor, block: int) -> list[int]:
        """The tree's tokens (N,: the root's, then the drafts) at the next cache slots -> the
        target's greedy token after each node. Leaves the cache length at the root (+1)."""
        engine = self.engine
        start = engine.length
        if start + self.tree.size > engine.cache.max_len:
            raise LabkitError(f"a tree of {self.tree.size} nodes does not fit after {start} cached positions")
        self.tokens.copy_(torch.tensor([tokens], device=engine.device), non_blocking=True)
        self.eos_mask.copy_(eos_mask, non_blocking=True)
        self.block.fill_(block)
        self._place(start)
        with engine.autocast():
            if self.graph is not None:
                self.graph.replay()
            else:
                self._body()
        engine.set_length(start + 1)
        return self.targets.tolist()


@torch.inference_mode()
def commit_path(engine: Engine, verify: TreeVerify, start: int, path: list[int]) -> None:
    """After `verify` ran at `start`: the accepted nodes `path` (root excluded, in order) move to
    slots start+1.. in every layer's cache, the cache length becomes start + 1 + len(path), and
    their hidden states (the root's first) are kept for drafters."""
    n = len(path)
    if path != list(range(1, n + 1)):  # a chain's prefix is in place already
        cache = engine.cache
        src = torch.tensor(path, device=engine.device) + start  # (n,) nodes' slots; src >= dst, in order
        dst = torch.arange(start + 1, start + 1 + n, device=engine.device)  # (n,)
        cache.k[:, :, :, dst] = cache.k[:, :, :, src]  # (L, B, H, n, D): gathered, then written
        cache.v[:, :, :, dst] = cache.v[:, :, :, src]
    engine.set_length(start + 1 + n)
    if verify.hidden is not None:
        rows = torch.tensor([0, *path], device=engine.device)
        engine.kept_hidden.keep(verify.hidden.index_select(1, rows), start + 1 + n)


def tree_verify(engine: Engine, tree: TokenTree) -> TreeVerify:
    """The engine's TreeVerify for this tree shape, made once per shape, attention span and
    capture mode (a new request may change either: then it is captured again)."""
    return engine.captured(("tree", tuple(tree.parents), engine.graphs_safe), lambda: TreeVerify(engine, tree))
