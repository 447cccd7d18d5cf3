"""Speculative decoding: drafters propose, the target verifies K+1 positions in one pass, a
policy decides how many draft tokens stand, a controller picks the next K."""

from labkit.specdec.controllers import FixedK
from labkit.specdec.drafters import Draft, Drafter, LayerSkipDrafter, ModelDrafter, NgramDrafter, make_drafter, truncated_engine
from labkit.specdec.policies import GreedyMatch, RejectionSampling, default_policy

__all__ = [
    "Draft", "Drafter", "FixedK", "GreedyMatch", "LayerSkipDrafter", "ModelDrafter", "NgramDrafter",
    "RejectionSampling", "default_policy", "make_drafter", "truncated_engine",
]
