"""eagle-mix: EAGLE's chain or prompt lookup's copy, chosen at every step on the device.

eagle-ngram's device steps choose per chunk of CHUNK steps (a captured graph replays one kind of
step), from the rates the chunks before showed. A text that copies for a few tokens and then
writes (a summary quoting its source, an answer citing a passage) changes kind inside a chunk,
and a chunk spent on the wrong kind costs its whole length. Here every step chooses, with the
host rule of eagle-ngram's proposals (specdec/eagle_drafter.py), on the device:

    after the verify:  the draft cache caught up over the verified rows (every step, so a chain
                       can start anywhere);
                       copy = the context now ends in an n-gram of at least `min_n` tokens seen
                       before (the lookup_draft kernel's match_n >= min_n: the twin of
                       NgramDrafter.match is not None, with no launch of its own);
                       the next step's K columns: lookup's copy (that kernel's draft) if copy,
                       else EAGLE's chain (`depth` deep, its last draft repeated to K).

eagle-agree (`unsure`, AGREE_UNSURE): the same steps, the choice asking the chain's first draft too (one
more draft pass's pick and the head's probability of it, on every step): copy where the context ends in
an n-gram of any length seen before and lookup's first token is that draft, or the head gives that
draft less than `unsure`; else the chain. The chain's passes past the first still sit in the IF node.
Simulated (scripts/copy_chain_sim.py ... copycost): +2% over eagle-mix's rule at the copy step's cost
the H200 implies (~700 us), +3.5% at lookup's own (~600); measured on an H100, the suite, K 8: 1.824x against
eagle-mix's 1.822x (one run). The host's
proposals (a CPU; a chunk's first step) keep eagle-mix's rule.

eagle-lazy (`lazy`, LAZY_WINDOW; IF nodes, eagle-mix's rule): copy steps leave the draft cache alone. Every
verify keeps its hidden states by position (one copy), and a chain step, inside the IF node, catches the
draft cache up over the `lazy` positions before its anchor, from those states and the context's tokens,
before drafting: a copy step then costs lookup's own plus ~4 launches (eagle-mix's caught up every step:
~975 us against lookup's ~670 on the H200, rag-5). Positions further back than the window after a long
copy keep stale elements: worse drafts there, never a wrong output (the suite's acceptance measured unchanged on
the CPU). On an H100, the suite, K 8: 1.862x / 1.787x plain against eagle-mix's 1.822x / 1.784x (two runs); on an
H200 with session 49's head 2.019x / 1.996x against 2.001x / 1.949x.

The chain's draft passes (most of a chain step's drafting time) run only where the step takes no
copy. In a captured graph they sit in a CUDA graph IF node (graphs.only_where, on by default where
one builds: PyTorch's own, or labkit's kernels/graph_if.cu where PyTorch has none, as 2.11 has not;
LABKIT_IF_NODES=0 turns them off). Without one, each of the chain's fused Triton launches is still
made but returns right after its inputs' wait where the flag says copy (`only_if`, eagle_ops.OnlyIf,
which the IF branch passes too: its eager runs have no node); on other layers the chain runs and the
copy is picked over it. Every step verifies K columns (at least COPY_K), so one graph serves both
kinds; the verify keeps the output plain greedy's whatever it holds.

Simulated on the suite's texts with the H200's step costs (scripts/copy_chain_sim.py): the
per-chunk choice 1.61x plain, this rule 1.70x (n >= 2; n >= 3 1.67x), a per-step oracle 2.0x.
Measured on the H200, whole suite, batch 1, K 8 (docs/speculation.md): 1.87x / 1.88x plain with
IF nodes, 1.81x without in the same lease (session 47); ngram-graph 1.79x.
"""

from __future__ import annotations

from typing import Any

import torch

from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.errors import LabkitError
from labkit.graphs import if_nodes, only_where
from labkit.kernels import registry
from labkit.kernels.reference import LOOKUP_MAX_N
from labkit.specdec.draft import Step
from labkit.specdec.eagle import EagleHead
from labkit.specdec.eagle_drafter import EagleDrafter
from labkit.specdec.eagle_hooks import ChainOf
from labkit.specdec.lookup_steps import LookupSteps

MIX_MIN_N = 2  # copy after an n-gram of this many tokens seen before (prompt lookup's own default, NgramDrafter.min_n)
AGREE_UNSURE = 0.5  # eagle-agree: copy where lookup's first token is the chain's first draft, or the head gives its first draft less
LAZY_WINDOW = 32  # eagle-lazy: a chain step catches the draft cache up over this many positions (a copy run of 3-4 steps at K 8)


class MixOf(ChainOf):
    """Mixed steps' verify hook (module docstring): the catch-up, the choice, then lookup's copy or
    ChainOf's chain as the next step's k columns. unsure (eagle-agree): the choice also asks the
    chain's first draft; lazy (eagle-lazy): the catch-up only in chain steps, over that many positions
    (module docstring)."""

    def __init__(self, drafter: EagleDrafter, depth: int, k: int, min_n: int, unsure: float | None = None, lazy: int = 0) -> None:
        super().__init__(drafter, depth)
        self.k, self.min_n, self.unsure, self.lazy = k, min_n, unsure, lazy
        self.max_t = k + 1
        self.history: torch.Tensor | None = None  # (Lh,) the steps' context, n_ctx (1,) its length: bind_history
        self.n_ctx: torch.Tensor | None = None
        device = drafter.target.device
        self.match_n = torch.zeros(1, dtype=torch.long, device=device)  # (1,) the n-gram lookup matched (0: none)
        self.chain_cols = torch.zeros(1, depth, dtype=torch.long, device=device)  # (1, depth) the last chain drafted
        self.first = torch.zeros(1, dtype=torch.long, device=device)  # eagle-lazy: (1,) the request's first verified position
        # (lazy + depth - 1,) offsets from the context's length: the window's positions up to the anchor (n_ctx - 2), then the chain's
        self.offsets = torch.arange(-lazy - 1, depth - 2, device=device)

    def bind_history(self, history: torch.Tensor, n_ctx: torch.Tensor) -> None:
        """The device steps' context buffers (LookupSteps), read after each step's commit."""
        self.history, self.n_ctx = history, n_ctx

    def caught_up_chain(self, kept: torch.Tensor, only_if: torch.Tensor) -> torch.Tensor:  # (1, S, D) -> (1, depth)
        """eagle-lazy, inside the IF node: the draft cache's elements at the `lazy` positions up to the anchor (the context's
        last but one; none before this request's first verified position) from the kept states (the drafter's
        keep_hidden), then the chain from the anchor's feature. Positions from one launch (the draft cache runs past the
        context by the chain)."""
        assert self.history is not None and self.n_ctx is not None
        pos = torch.maximum(self.n_ctx + self.offsets, self.first)  # (lazy + depth - 1,): the first repeated where short
        window = pos[: self.lazy]  # (lazy,)
        feats = kept.index_select(1, window)  # (1, lazy, D)
        tokens = self.history[1:].index_select(0, window)[None]  # (1, lazy): each position's next token, committed
        anchor_feat = self.drafter.elements(feats, tokens, window, clamped=True)[:, -1]  # (1, D)
        return self.drafter.chain(anchor_feat, None, 1, self.depth, only_if=only_if, pos=pos[self.lazy :, None]).flatten(1)

    def takes_chain(self, anchor_feat: torch.Tensor | None, copied: torch.Tensor) -> torch.Tensor:  # (1, D), (1, k) -> (1,) bool
        """The rule: a chain where the context ends in no n-gram of min_n tokens seen before; with
        `unsure`, a copy where it ends in one of any length and lookup's first token is the chain's
        first draft or the head gives that draft less than `unsure`."""
        if self.unsure is None:
            return self.match_n < self.min_n
        assert anchor_feat is not None
        first, prob = self.drafter.first_draft(anchor_feat)  # (1,) each
        copies = (self.match_n >= 1) & ((copied[:, 0] == first) | (prob < self.unsure))
        return ~copies

    def draft_after(self, hidden: torch.Tensor, verdict: torch.Tensor, lm_head: torch.nn.Module,
                    tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:  # -> (1, k)
        assert self.history is not None and self.n_ctx is not None
        copied = registry.get("lookup_draft", hidden.device)(self.history[None], self.n_ctx, self.k, self.match_n)  # (1, k)
        if self.lazy and (if_nodes() or not hidden.is_cuda):  # the states kept every step; the catch-up and the chain only in a chain
            # step (the IF node; without one on a GPU, eagle-mix's steps below: a window every step would cost more)
            kept = self.drafter.keep_hidden(hidden, input_pos)  # (1, S, D)
            chains = self.takes_chain(None, copied)
            if hidden.is_cuda:
                with only_where(chains):
                    self.chain_cols.copy_(self.caught_up_chain(kept, chains))
            elif bool(chains[0]):  # eager steps (a CPU, tests) skip it as the IF node does: copy steps leave the draft cache alone
                self.chain_cols.copy_(self.caught_up_chain(kept, chains))
        elif if_nodes() or self.unsure is not None:  # the catch-up every step, copy or chain; the chain's passes inside an IF node
            inputs = self.drafter.verify_inputs(tokens, verdict, input_pos, self.depth)  # the catch-up's and the chain's, one launch
            anchor_feat = self.drafter.catch_up(hidden, verdict, tokens, input_pos, inputs=inputs)  # (1, D)
            chains = self.takes_chain(anchor_feat, copied)  # (1,) bool
            with only_where(chains):
                self.chain_cols.copy_(self.chain_from(anchor_feat, verdict, input_pos, only_if=chains, pos=inputs[2]))
        else:  # the chain's launches called off where it copies (one launch for both where fused)
            chains = self.takes_chain(None, copied)
            self.chain_cols.copy_(self.drafter.catch_up_chain(hidden, verdict, tokens, input_pos, self.depth, only_if=chains))
        chain = torch.cat((self.chain_cols, self.chain_cols[:, -1:].expand(1, self.k - self.depth)), dim=1)  # (1, k)
        return torch.where(chains[:, None], chain, copied)


class EagleMixDrafter(EagleDrafter):
    """eagle-mix (module docstring): eagle-ngram's per-step rule in its device steps too. On the host
    (a CPU, sampling) it is eagle-ngram with copies after min_n tokens."""

    def __init__(self, target: Engine, head: EagleHead, min_n: int = MIX_MIN_N, unsure: float | None = None, lazy: int = 0,
                 **kwargs: Any) -> None:
        if not 1 <= min_n <= LOOKUP_MAX_N:
            raise LabkitError(f"eagle-mix copies after an n-gram of 1 to {LOOKUP_MAX_N} tokens seen before, got {min_n}")
        if unsure is not None and not 0.0 <= unsure <= 1.0:
            raise LabkitError(f"eagle-agree's threshold is a probability in [0, 1], got {unsure}")
        if lazy < 0 or (lazy and unsure is not None):
            raise LabkitError(f"eagle-lazy's window is a number of positions, and its rule eagle-mix's; got {lazy}, unsure {unsure}")
        super().__init__(target, head, lookup_over=min_n, **kwargs)
        if lazy > self.pass_t:
            raise LabkitError(f"eagle-lazy's window is one draft-layer pass of at most {self.pass_t} positions, got {lazy}")
        self.unsure, self.lazy = unsure, lazy
        self.name = self.name.replace("+ngram", "+mix") + (f"+agree{unsure:g}" if unsure is not None else "") + (f"+lazy{lazy}" if lazy else "")

    def _mixed(self, k: int, depth: int) -> tuple[LookupSteps, bool]:
        """The mixed device steps of k columns (chains depth deep), and whether this request is new to them."""
        steps = self.target.captured(("eagle-mix-steps", self, k, depth),
                                     lambda: LookupSteps(self.target, k, hook=MixOf(self, depth, k, self.lookup_over, self.unsure, self.lazy),
                                                         n_cols=k))
        fresh = (k, depth) not in self._steps_used  # (it runs no chain or copy steps of its own: the keys are its (k, depth))
        self._steps_used.add((k, depth))
        return steps, fresh

    @torch.inference_mode()
    def run_steps(self, context: list[int], k: int, m: int, eos_mask: torch.Tensor, eos_until: int) -> list[Step]:
        """m mixed steps per host read (DeviceSteps): the first verifies the host's proposal (or the
        columns the last chunk's final step made for this context), padded to the steps' width."""
        depth, width = min(k, self.depth), self.copy_width(len(context), k, m)  # (depth <= k <= width)
        steps, fresh = self._mixed(width, depth)
        L = len(context)
        if fresh and self.lazy:  # eagle-lazy's kept states start at this request's first verified position
            hook = steps.hook
            assert isinstance(hook, MixOf)
            hook.first.fill_(L - 1)
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared[0] == L and len(prepared[1]) == width:  # the last step made it, the draft cache true
            self.done, first = L - 1, prepared[1]
        else:
            first = self.propose(context, depth, GenerationConfig(), None).tokens or [context[-1]]
            first = (first + first[-1:] * width)[:width]
        out = steps.run(context, m, eos_mask, eos_until, fresh, cols=first)
        self.take(steps.last_cols, L + sum(len(new) for _, new in out))
        return out
