"""On a CPU: an eager verify's greedy verdict, the masked copy of every logit (reference.greedy_verdict)
against EOS written into the step's own logits then the argmax itself (Engine.verify_greedy since
session 50), interleaved, on logits of the embedded model's vocabulary. python3 scripts/verdict_costs.py [ROUNDS]"""
import sys
import time

import torch

from labkit.graphs import EagerVerdict
from labkit.kernels import reference

V, EOS = 49152, (0, 2)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
g = torch.Generator().manual_seed(0)
eos_mask = torch.zeros(V, dtype=torch.bool)
eos_mask[list(EOS)] = True
eager = EagerVerdict()  # what Engine.verify_greedy runs outside a graph
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
for T in (1, 4, 9):
    logits = torch.randn(1, T, V, generator=g)
    tokens = logits.argmax(-1)[:, [0, *range(T - 1)]]

    def masked(block: int, logits: torch.Tensor = logits, tokens: torch.Tensor = tokens) -> torch.Tensor:
        return reference.greedy_verdict(logits, tokens, eos_mask, torch.tensor([block]))

    def in_place(block: int, logits: torch.Tensor = logits, tokens: torch.Tensor = tokens) -> tuple[torch.Tensor, float]:
        own = logits.clone()  # the step's own logits (the clone is outside the timing below)
        t0 = time.perf_counter()
        out = eager(own, tokens, eos_mask, block)
        return out, time.perf_counter() - t0

    for block in (0, T):
        assert torch.equal(masked(block), in_place(block)[0])
        old, new = [], []
        for _ in range(rounds):
            for _ in range(200):
                t0 = time.perf_counter()
                masked(block)
                old.append(time.perf_counter() - t0)
                new.append(in_place(block)[1])
        o, n = sorted(old)[len(old) // 2] * 1e6, sorted(new)[len(new) // 2] * 1e6
        print(f"T={T} EOS blocked in {block} rows: masked copy {o:.0f} us, in place + argmax {n:.0f} us ({o / n:.2f}x)")
