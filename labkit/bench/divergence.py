"""Why two greedy outputs of the same model differ: in bf16, two candidates whose logits lie
within a few bf16 steps of each other are a near-tie that different kernel orderings may break
either way; anything wider is unexplained (a bug until shown otherwise)."""

from __future__ import annotations

import math
from typing import Any

import torch

from labkit.engine import Engine

TIE_ULPS = 4.0  # logits closer than this many bf16 steps count as a near-tie


def bf16_step(x: float) -> float:
    """The spacing of bf16 numbers around x (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(max(abs(x), 1e-30))) - 7)


@torch.inference_mode()
def explain(engine: Engine, reference: Engine, prompt: list[int], ours: list[int], theirs: list[int]) -> dict[str, Any]:
    """Why two greedy outputs of the same model differ: the logits of both candidates at the
    first differing position, from this dtype's engine and from an fp32 reference engine."""
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
    if first >= min(len(ours), len(theirs)):
        return {"first_diff": first, "kind": "length", "note": "one output is a prefix of the other (EOS)"}
    prefix = torch.tensor([prompt + ours[:first]], device=engine.device)  # (1, T)
    a, b = ours[first], theirs[first]
    out: dict[str, Any] = {"first_diff": first, "token_ref": a, "token_other": b}
    for name, eng in (("low", engine), ("fp32", reference)):
        eng.ensure_capacity(prefix.shape[1])
        logits = eng.prefill(prefix)[0].float()  # (V,)
        top2 = logits.topk(2).values
        out[f"{name}_gap"] = float(logits[a] - logits[b])
        out[f"{name}_top2_gap"] = float(top2[0] - top2[1])
        out[f"{name}_top"] = int(logits.argmax())
        out[f"{name}_logit_ref"] = float(logits[a])
    step = bf16_step(out["fp32_logit_ref"])
    out["bf16_step"] = step
    out["gap_in_bf16_steps"] = abs(out["fp32_gap"]) / step
    out["kind"] = "near-tie" if out["gap_in_bf16_steps"] <= TIE_ULPS else "unexplained"
    return out
