"""Acceptance policies: how many draft tokens stand, and which token comes after them.

Terms (as in vLLM's rejection sampler):
- draft tokens: the K tokens a drafter proposed, with their draft probabilities q (K, V) or
  none (a drafter without probabilities is one-hot: q = 1 on its token);
- target probabilities p (K+1, V): the target's distribution at each draft position and one
  past the last;
- accepted: the longest run of draft tokens the policy keeps;
- recovered token: sampled from the residual max(0, p - q) at the first rejected position;
- bonus token: sampled from p at position K when every draft token was accepted.

A lossless policy leaves the output distribution exactly the target's (greedy: identical tokens).

Token trees (specdec/tree.py) are verified by greedy acceptance inside the verify step (a
`fused_greedy` policy, phases not timed apart: labkit/tree_verify.py), and under sampling by
RejectionSampling's multi-draft rule (`accept_tree`, SpecInfer's for drafts without
probabilities). Anywhere else (a lossy policy, timed greedy phases, a tree whose drafts carry
probabilities) a tree draft is cut to its first path and verified as a chain, so every policy
keeps its `lossless` declaration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from labkit.config import GenerationConfig
from labkit.errors import LabkitError
from labkit.kernels import registry
from labkit.sampling import target_probs
from labkit.specdec.tree import TokenTree


@dataclass
class Verdict:
    accepted: int  # how many draft tokens stand
    next_token: int  # the recovered or bonus token that follows them


TYPICAL_THRESHOLD = 0.09  # typical acceptance's posterior threshold (Medusa's default)
TYPICAL_ALPHA = 0.3  # ... and its entropy factor


class Policy(Protocol):
    name: str
    lossless: bool
    fused_greedy: bool  # its verdict is greedy_verdict's: the engine may decide it inside the verify step
    trees: bool  # it verifies a token tree under sampling by its own rule (a TreePolicy: accept_tree)

    def accept(
        self,
        draft_tokens: torch.Tensor,  # (K,) long, on the target's device
        draft_probs: torch.Tensor | None,  # (K, V) or None (one-hot drafter)
        target_logits: torch.Tensor,  # (K+1, V)
        config: GenerationConfig,
        generator: torch.Generator | None,
    ) -> Verdict: ...


class TreePolicy(Policy, Protocol):
    """A policy whose `trees` is True: it picks a token tree's accepted path itself."""

    def accept_tree(
        self,
        tree: TokenTree,
        tokens: list[int],  # the tree's node tokens, node 0 the last context token
        target_logits: torch.Tensor,  # (N, V) the target's logits at every node
        config: GenerationConfig,
        generator: torch.Generator | None,
    ) -> tuple[list[int], int]: ...  # the accepted path's nodes from the root, the next token


class GreedyMatch:
    """Keep draft tokens while they equal the target's argmax; the next argmax is the bonus
    (the registry's verify_prefix kernel; one device sync to read the verdict)."""

    name = "greedy"
    lossless = True
    fused_greedy = True
    trees = False

    def accept(
        self,
        draft_tokens: torch.Tensor,
        draft_probs: torch.Tensor | None,
        target_logits: torch.Tensor,
        config: GenerationConfig,
        generator: torch.Generator | None,
    ) -> Verdict:
        target = target_logits.argmax(-1)  # (K+1,)
        accepted, bonus = registry.get("verify_prefix", target.device)(draft_tokens[None], target[None])  # (1,), (1,)
        n, token = torch.cat([accepted, bonus]).tolist()
        return Verdict(n, token)


def one_hot_probs(tokens: torch.Tensor, vocab: int) -> torch.Tensor:  # (K,) → (K, V)
    return torch.nn.functional.one_hot(tokens, vocab).float()


class RejectionSampling:
    """Speculative sampling (Leviathan et al., Chen et al.): accept x_i with prob min(1, p_i(x)/q_i(x));
    at the first rejection sample from norm(max(0, p_i - q_i)); after K accepts, a bonus from p_K.
    The registry's rejection_sample kernel does the work; the uniforms come from `generator`."""

    name = "rejection"
    lossless = True
    fused_greedy = False
    trees = True

    def accept(
        self,
        draft_tokens: torch.Tensor,
        draft_probs: torch.Tensor | None,
        target_logits: torch.Tensor,
        config: GenerationConfig,
        generator: torch.Generator | None,
    ) -> Verdict:
        K, V = draft_tokens.shape[0], target_logits.shape[-1]
        device = target_logits.device
        p = target_probs(target_logits, config)  # (K+1, V)
        q = draft_probs.float() if draft_probs is not None else one_hot_probs(draft_tokens, V)  # (K, V)
        u = torch.rand(K + 1, device=device, generator=generator)  # K accept tests, 1 for the sampled token
        kernel = registry.get("rejection_sample", device)
        accepted, token = kernel(draft_tokens[None], q[None].contiguous(), p[None].contiguous(), u[None, :K].contiguous(), u[K:])
        n, tok = torch.cat([accepted, token]).tolist()
        return Verdict(n, tok)


    def accept_tree(self, tree: TokenTree, tokens: list[int], target_logits: torch.Tensor, config: GenerationConfig,
                    generator: torch.Generator | None) -> tuple[list[int], int]:
        """Multi-draft speculative sampling over a tree of one-hot drafts (tokens[i] at node i,
        tokens[0] the root's; target_logits (N, V): the target after each node). From the root,
        a node's children are tried in their order: child x stands with probability
        r(x) / sum(r), r the target's distribution after the node less the children already
        rejected there; the first to stand becomes the node, and when none does the next token
        is drawn from r. Every token so comes out with the target's probability (a child tried
        first stands with p(x); one tried after rejections with (1 - p(rejected)) * r(x) / sum(r)
        = p(x)). Returns the accepted nodes in path order and the next token."""
        p = target_probs(target_logits, config).float().cpu()  # (N, V)
        u = iter(torch.rand(p.shape[0] + 1, device=target_logits.device, generator=generator).tolist())  # <= N - 1 tests, 1 draw
        kids = tree.children()
        node, path = 0, list[int]()
        while True:
            r = p[node].clone()  # (V,)
            for child in kids[node]:
                if next(u) * float(r.sum()) < float(r[tokens[child]]):
                    break
                r[tokens[child]] = 0.0
            else:
                cdf = r.cumsum(0)  # (V,)
                return path, int(torch.searchsorted(cdf, next(u) * cdf[-1], right=True).clamp(max=r.numel() - 1))
            path.append(child)
            node = child


def _leading_run(ok: torch.Tensor) -> int:  # (K,) bool → how many stand before the first False
    return int(ok.long().cumprod(0).sum()) if ok.numel() else 0


def _next_token(p_row: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> int:  # (V,)
    if config.temperature == 0:
        return int(p_row.argmax())
    return int(torch.multinomial(p_row, 1, generator=generator).item())


def _policy_probs(target_logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:  # (K+1, V) → (K+1, V)
    """The target's distribution a lossy rule judges drafts by: the request's warped distribution
    when sampling; softmax at temperature 1 for greedy (a one-hot would leave nothing to judge)."""
    if config.temperature == 0:
        return target_logits.float().softmax(-1)
    return target_probs(target_logits, config)


class TypicalAcceptance:
    """Medusa's typical acceptance (lossy): keep draft token x_i while
    p_i(x_i) > min(posterior_threshold, posterior_alpha * exp(-H(p_i))), H the entropy of the
    target's distribution there; then the target's own token (argmax, or a sample when sampling)."""

    lossless = False
    fused_greedy = False
    trees = False

    def __init__(self, posterior_threshold: float = TYPICAL_THRESHOLD, posterior_alpha: float = TYPICAL_ALPHA) -> None:
        if not (0 < posterior_threshold <= 1 and 0 < posterior_alpha <= 1):
            raise LabkitError("typical acceptance needs 0 < posterior_threshold <= 1 and 0 < posterior_alpha <= 1")
        self.posterior_threshold, self.posterior_alpha = posterior_threshold, posterior_alpha
        self.name = f"typical-{posterior_threshold:g}-{posterior_alpha:g}"

    def accept(
        self,
        draft_tokens: torch.Tensor,
        draft_probs: torch.Tensor | None,
        target_logits: torch.Tensor,
        config: GenerationConfig,
        generator: torch.Generator | None,
    ) -> Verdict:
        K = draft_tokens.shape[0]
        p = _policy_probs(target_logits, config)  # (K+1, V)
        entropy = -(p * p.clamp_min(1e-20).log()).sum(-1)  # (K+1,)
        bar = torch.minimum(torch.full_like(entropy, self.posterior_threshold), self.posterior_alpha * (-entropy).exp())  # (K+1,)
        ok = p[:K].gather(1, draft_tokens[:, None]).squeeze(1) > bar[:K]  # (K,)
        n = _leading_run(ok)
        return Verdict(n, _next_token(p[n], config, generator))


class TopKAgreement:
    """Keep draft tokens while each is among the target's top k there (lossy); then the target's own token."""

    lossless = False
    fused_greedy = False
    trees = False

    def __init__(self, k: int = 2) -> None:
        if k < 1:
            raise LabkitError(f"top-k agreement needs k >= 1, got {k}")
        self.k = k
        self.name = f"topk-{k}"

    def accept(
        self,
        draft_tokens: torch.Tensor,
        draft_probs: torch.Tensor | None,
        target_logits: torch.Tensor,
        config: GenerationConfig,
        generator: torch.Generator | None,
    ) -> Verdict:
        K = draft_tokens.shape[0]
        top = target_logits[:K].topk(min(self.k, target_logits.shape[-1]), dim=-1).indices  # (K, k)
        ok = (top == draft_tokens[:, None]).any(-1)  # (K,)
        n = _leading_run(ok)
        return Verdict(n, _next_token(_policy_probs(target_logits[n : n + 1], config)[0], config, generator))


POLICIES = ("greedy", "rejection", "typical", "topk")


def make_policy(name: str, config: GenerationConfig, *, posterior_threshold: float = TYPICAL_THRESHOLD, posterior_alpha: float = TYPICAL_ALPHA,
                top_k: int = 2) -> Policy:
    """greedy | rejection | typical | topk | default (greedy for greedy decoding, else rejection)."""
    if name == "default":
        return default_policy(config)
    if name == "greedy":
        if config.temperature != 0:
            raise LabkitError("the greedy-match policy is for greedy decoding (temperature 0); use rejection when sampling")
        return GreedyMatch()
    if name == "rejection":
        return RejectionSampling()
    if name == "typical":
        return TypicalAcceptance(posterior_threshold, posterior_alpha)
    if name == "topk":
        return TopKAgreement(top_k)
    raise LabkitError(f"unknown policy {name!r}: use {', '.join(POLICIES)}")


def warm_up_kernels(device: torch.device) -> None:
    """Load (and, for CUDA, build) the registry's kernels before anything is timed."""
    g = torch.Generator(device="cpu").manual_seed(0)
    draft = torch.randint(0, 8, (1, 2), generator=g).to(device)  # (1, K)
    target = torch.randint(0, 8, (1, 3), generator=g).to(device)  # (1, K+1)
    registry.get("verify_prefix", device)(draft, target)
    q, p = torch.rand(1, 2, 8, generator=g).softmax(-1), torch.rand(1, 3, 8, generator=g).softmax(-1)
    registry.get("rejection_sample", device)(draft, q.to(device), p.to(device), torch.rand(1, 2, generator=g).to(device), torch.rand(1, generator=g).to(device))


def default_policy(config: GenerationConfig) -> Policy:
    """Greedy match for greedy decoding, rejection sampling otherwise: both lossless."""
    return GreedyMatch() if config.temperature == 0 else RejectionSampling()
