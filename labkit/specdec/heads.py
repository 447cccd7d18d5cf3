"""Medusa-style draft heads: small residual blocks on the target's final hidden state, each
guessing one token further ahead through the target's own LM head (Cai et al. 2024, Medusa-1).

Terms. At position t the target's hidden state h_t (after the final norm) gives the target's
next token t+1 through its LM head. Head j (j = 1..n_heads) maps h_t to a hidden state whose
LM-head argmax guesses token t+1+j. A greedy draft after the target emitted token t+1 is then
[head_1, ..., head_K] read at position t: K tokens from one pass the target already made.

A head is `n_blocks` blocks x + SiLU(W x + b) with W and b starting at zero, so an untrained head
starts as the target's own next-token guess and training moves it from there. The LM head stays
frozen and shared: the heads add n_heads * n_blocks * (dim^2 + dim) weights.

Training (self-distillation): the labels are the target's own greedy continuation, so a head
learns exactly what verification will accept. `head_labels` shifts a token sequence into the
per-head labels; `heads_loss` is the mean cross-entropy over heads and positions.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from labkit.config import EAGLE_KINDS
from labkit.errors import LabkitError

IGNORE = -100  # label where a head looks past the end of the sequence


@dataclass
class HeadsConfig:
    n_heads: int = 4  # tokens a draft can propose (K max)
    n_blocks: int = 1  # residual blocks per head

    def validate(self) -> None:
        if self.n_heads < 1 or self.n_blocks < 1:
            raise LabkitError(f"draft heads need n_heads >= 1 and n_blocks >= 1, got {self.n_heads}, {self.n_blocks}")


class ResBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D)
        return x + F.silu(self.linear(x))


class DraftHeads(nn.Module):
    def __init__(self, dim: int, cfg: HeadsConfig) -> None:
        super().__init__()
        cfg.validate()
        self.dim, self.cfg = dim, cfg
        self.heads = nn.ModuleList(nn.Sequential(*(ResBlock(dim) for _ in range(cfg.n_blocks))) for _ in range(cfg.n_heads))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., n_heads, D)
        return torch.stack([head(hidden) for head in self.heads], dim=-2)

    def logits(self, hidden: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:  # (..., D) -> (..., n_heads, V)
        return lm_head(self(hidden))

    def draft(self, hidden: torch.Tensor, lm_head: nn.Module, k: int) -> torch.Tensor:  # (B, D) -> (B, k) greedy
        if not 1 <= k <= self.cfg.n_heads:
            raise LabkitError(f"these heads draft 1 to {self.cfg.n_heads} tokens, asked for {k}")
        return lm_head(self(hidden)[..., :k, :]).argmax(-1)


def head_labels(tokens: torch.Tensor, n_heads: int) -> torch.Tensor:  # (B, T) -> (B, T, n_heads)
    """labels[b, t, j-1] = tokens[b, t+1+j]: head j at position t guesses the token j after the
    target's next one; IGNORE past the end."""
    B, T = tokens.shape
    labels = torch.full((B, T, n_heads), IGNORE, dtype=torch.long, device=tokens.device)
    for j in range(1, n_heads + 1):
        if T > 1 + j:
            labels[:, : T - 1 - j, j - 1] = tokens[:, 1 + j :]
    return labels


def heads_loss(
    heads: DraftHeads,
    hidden: torch.Tensor,  # (B, T, D) the target's final hidden states
    tokens: torch.Tensor,  # (B, T) the tokens those states were computed on
    lm_head: nn.Module,
) -> tuple[torch.Tensor, list[float]]:
    """Mean cross-entropy over heads and positions, and each head's top-1 accuracy."""
    loss, hits, seen = heads_loss_counts(heads, hidden, tokens, lm_head)
    return loss, (hits / seen.clamp(min=1)).tolist()


def heads_loss_counts(
    heads: DraftHeads,
    hidden: torch.Tensor,  # (B, T, D) the target's final hidden states
    tokens: torch.Tensor,  # (B, T) the tokens those states were computed on (IGNORE: no label)
    lm_head: nn.Module,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy, and per head the top-1 hits and the labels seen: (), (n,), (n,)."""
    labels = head_labels(tokens, heads.cfg.n_heads)  # (B, T, n)
    logits = heads.logits(hidden, lm_head).float()  # (B, T, n, V)
    loss = F.cross_entropy(logits.flatten(0, 2), labels.flatten(), ignore_index=IGNORE)
    with torch.no_grad():
        valid = labels != IGNORE  # (B, T, n)
        hits = ((logits.argmax(-1) == labels) & valid).sum((0, 1)).float()  # (n,)
        seen = valid.sum((0, 1)).float()  # (n,)
    return loss, hits, seen


def fingerprint(lm_head_weight: torch.Tensor) -> dict[str, Any]:
    """What heads must match to be used with a target: the LM head's shape and a few of its
    weights (rows 0, V/2 and V-1, first 16 columns), rounded so that bf16 and fp32 copies agree."""
    V, D = lm_head_weight.shape
    rows = lm_head_weight.detach()[[0, V // 2, V - 1], :16].float()  # (3, 16)
    return {"vocab_size": V, "dim": D, "sample": [round(float(x), 3) for x in rows.flatten()]}


def same_target(a: dict[str, Any], b: dict[str, Any], tol: float = 0.01) -> bool:
    return (a.get("vocab_size"), a.get("dim")) == (b.get("vocab_size"), b.get("dim")) and len(a.get("sample", [])) == len(b["sample"]) \
        and all(abs(x - y) <= tol for x, y in zip(a["sample"], b["sample"], strict=True))


def save_heads(heads: DraftHeads, path: str | Path, target_fingerprint: dict[str, Any], info: dict[str, Any] | None = None) -> Path:
    """A folder with heads.safetensors and heads.json (config, the target's fingerprint, training info)."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}, str(out / "heads.safetensors"))
    meta = {"config": asdict(heads.cfg), "dim": heads.dim, "target": target_fingerprint, "info": info or {}}
    (out / "heads.json").write_text(json.dumps(meta, indent=1))
    return out


def check_heads_option(drafters: list[str], heads: str | None) -> None:
    """A run that lists the heads drafter names a heads folder that holds heads (before any loading)."""
    if "heads" in drafters:
        if not heads:
            raise LabkitError("--drafter heads needs heads: --heads, a folder written by `python -m labkit heads train`")
        check_heads_folder(heads)
    for kind in sorted(set(EAGLE_KINDS) & set(drafters)):
        from labkit.specdec.eagle import check_eagle_folder

        if not heads:
            raise LabkitError(f"--drafter {kind} needs --heads, a folder written by `python -m labkit heads train --kind eagle`")
        check_eagle_folder(heads)


def check_heads_folder(path: str | Path) -> Path:
    folder = Path(path)
    if not (folder / "heads.json").is_file() or not (folder / "heads.safetensors").is_file():
        raise LabkitError(f"{folder} holds no draft heads (heads.json and heads.safetensors)")
    return folder


def _read_meta(folder: Path) -> dict[str, Any]:
    """heads.json, checked: a file that is not what save_heads wrote is one clear error."""
    try:
        meta = json.loads((folder / "heads.json").read_text())
        HeadsConfig(**meta["config"]).validate()
        int(meta["dim"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise LabkitError(f"{folder / 'heads.json'} is not a heads description written by `labkit heads train` "
                          f"({type(err).__name__}: {str(err)[:120]}); train the heads again") from None
    if not isinstance(meta, dict):
        raise LabkitError(f"{folder / 'heads.json'} is not a heads description written by `labkit heads train`")
    return meta


def load_heads_config(path: str | Path) -> HeadsConfig:
    """The configuration of the heads in a folder (before any model loads)."""
    return HeadsConfig(**_read_meta(check_heads_folder(path))["config"])


def load_heads(path: str | Path, target_fingerprint: dict[str, Any]) -> DraftHeads:
    """Heads saved by `save_heads`; refuses heads trained for another target, and files that are
    not what save_heads wrote."""
    from safetensors.torch import load_file

    folder = check_heads_folder(path)
    meta = _read_meta(folder)
    if not same_target(meta.get("target", {}), target_fingerprint):
        raise LabkitError(f"the draft heads in {folder} were trained for another target model "
                          f"(vocab {meta.get('target', {}).get('vocab_size')}, dim {meta.get('target', {}).get('dim')}; "
                          f"this one: vocab {target_fingerprint['vocab_size']}, dim {target_fingerprint['dim']})")
    heads = DraftHeads(int(meta["dim"]), HeadsConfig(**meta["config"]))
    try:
        heads.load_state_dict(load_file(str(folder / "heads.safetensors")))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own errors for a damaged file
        raise LabkitError(f"{folder / 'heads.safetensors'} cannot be read as these heads ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:120]}); train the heads again") from None
    return heads
