"""Why an eagle-mix step costs more than an EAGLE step at K 3 (diagnostic; prints medians).

    python3 scripts/eagle_mix_gap.py EAGLE_FOLDER [rows] [K]

On the H200 eagle-mix-device-3 replayed at 4 rows 45-76 us a step slower than eagle-device-3
(batch_eagle_costs.py, either order), at K 5 only 7-14 us, though its graph adds three small
kernels (the lookup, a compare, a where). Variants of BatchEagle's choice of drafts, each captured
on one batch and replayed from the same rows' state (the same prompts, admitted and stepped alike):

    eagle          the chain's drafts
    mix            eagle-mix: lookup's copy where an n-gram of 2 matched, else the chain
    mix-copy3      eagle-mix after a 3-gram only (fewer copies: does the drafts' content cost?)
    lookup-unused  the lookup run and its result dropped: the chain's drafts (do the kernels cost?)
    where-only     the chain's drafts through the where, no lookup

For each: us a step (a chunk of replays, median of 9) and the tokens a row took a step there.
"""

import sys

import torch

from batch_setup import engine_and_suite
from labkit.batch.eagle import BatchEagle
from labkit.batch.engine import BatchConfig, BatchEngine
from labkit.batch.lookup import CHUNK, BatchLookup
from labkit.batch.scheduler import ContinuousBatcher
from labkit.config import GenerationConfig
from labkit.kernels import registry
from labkit.metrics import timers
from labkit.specdec.drafters import NgramDrafter
from labkit.specdec.eagle import load_eagle
from labkit.specdec.heads import fingerprint


class LookupUnused(BatchEagle):
    def _choose(self, chain, start, stop, only=None):  # noqa: ANN001, ANN202
        assert self.history is not None and self.n_ctx is not None
        registry.get("lookup_draft", chain.device)(self.history[start:stop], self.n_ctx[start:stop], self.k, self.match_n[start:stop])
        self.cols[start:stop] = chain if only is None else torch.where(only[:, None], chain, self.cols[start:stop])


class WhereOnly(BatchEagle):
    def _choose(self, chain, start, stop, only=None):  # noqa: ANN001, ANN202
        cols = torch.where((self.match_n[start:stop] >= 99)[:, None], self.cols[start:stop], chain)
        self.cols[start:stop] = cols if only is None else torch.where(only[:, None], cols, self.cols[start:stop])


folder = sys.argv[1]
r = int(sys.argv[2]) if len(sys.argv) > 2 else 4
K = int(sys.argv[3]) if len(sys.argv) > 3 else 3
engine, suite, gpu = engine_and_suite(128)
head = load_eagle(folder, fingerprint(engine.model.lm_head.weight))
batch = BatchEngine(engine, BatchConfig(slots=r, max_seq_len=1024, cuda_graph=gpu))
variants = {"eagle": BatchEagle(batch, head, K), "mix": BatchEagle(batch, head, K, copy_after=2),
            "mix-copy3": BatchEagle(batch, head, K, copy_after=3), "lookup-unused": LookupUnused(batch, head, K, copy_after=2),
            "where-only": WhereOnly(batch, head, K)}
systems = {name: BatchLookup(batch, K, hook=hook) for name, hook in variants.items()}
for steps in systems.values():
    steps.capture_all()
for hook in variants.values():
    hook.capture_all()
gen = GenerationConfig(max_new_tokens=600, min_new_tokens=600)
for _ in range(2):
    line = f"rows {r}, K {K}:"
    for name, steps in systems.items():
        batcher = ContinuousBatcher(batch, lambda: NgramDrafter(3, 1), K, lookup=[steps])
        asks = [batcher.submit(suite[i % len(suite)], gen) for i in range(r)]
        for _ in range(3):
            batcher.step()
        torch.cuda.synchronize() if gpu else None
        start = steps.n_ctx[:r].clone()
        replayed = [0]

        def replays(steps: BatchLookup = steps, replayed: list[int] = replayed) -> None:
            steps.run_on(r, CHUNK)  # a chunk of the rows' steps (replays of the bucket's graph where captured)
            replayed[0] += CHUNK
            torch.cuda.synchronize() if gpu else None

        us = timers.median_us(replays, 9, warm=1) / CHUNK
        tokens = (steps.n_ctx[:r] - start).float().mean().item() / replayed[0]
        line += f"  {name} {us:6.1f} us ({tokens:.2f} tok)"
        for a in asks:
            batcher.cancel(a)
        batcher.run()
    print(line)
