"""Which rule for choosing between EAGLE's chain and prompt lookup's copy drafts keeps the most
tokens a step (diagnostic; tau only, so any device serves: the drafts are the same rule's anywhere).

    python3 scripts/eagle_mix_rules.py EAGLE_FOLDER [rows] [K] [new tokens] [prompts]

Every rule runs the suite's prompts (the first `prompts`, every category in turn) through batched
device steps (batch/lookup.py with batch/eagle.py's hook, `rows` rows, K drafts, every request
`new tokens` long, EOS blocked as bench batch does), one run per rule; prints tau (the tokens a
row takes a verify step) overall and per category. The rules, per row and step:

    chain        EAGLE's chain alone (eagle-device)
    copy2        lookup's copy where the context ends in a 2-gram seen before, else the chain (eagle-mix, copy_after 2)
    copy3        the same after a 3-gram
    agree2       the copy where a 2-gram matched and its first token is the chain's first, else the chain
    agree2|copy3 the copy where a 3-gram matched, or a 2-gram matched and it agrees with the chain's first
    agree1       the copy where the last token was seen before and the copy's first is the chain's first
    agree1|copy2 the copy where a 2-gram matched, or agree1
"""

import collections
import sys

import torch

from batch_setup import engine_and_suite
from labkit.batch.eagle import BatchEagle
from labkit.batch.engine import BatchConfig, BatchEngine
from labkit.batch.lookup import BatchLookup
from labkit.batch.scheduler import ContinuousBatcher
from labkit.bench.batch import categories_in_turn
from labkit.config import GenerationConfig
from labkit.kernels import registry
from labkit.prompts import load_suite
from labkit.specdec.drafters import NgramDrafter
from labkit.specdec.eagle import load_eagle
from labkit.specdec.heads import fingerprint


class Rule(BatchEagle):
    """BatchEagle whose choice between the chain and the copy is `rule` (copy_after 2: the lookup runs)."""

    rule = "copy2"

    def _choose(self, chain, start, stop, only=None):  # noqa: ANN001, ANN202
        cols = torch.cat((chain, chain[:, -1:].expand(-1, self.k - self.depth)), 1) if self.k > self.depth else chain  # (n, K)
        assert self.history is not None and self.n_ctx is not None
        match_n = self.match_n[start:stop]
        copied = registry.get("lookup_draft", chain.device)(self.history[start:stop], self.n_ctx[start:stop], self.k, match_n)  # (n, K)
        agree = copied[:, 0] == cols[:, 0]
        use = {"chain": match_n < 0, "copy2": match_n >= 2, "copy3": match_n >= 3, "agree2": (match_n >= 2) & agree,
               "agree2|copy3": (match_n >= 3) | ((match_n >= 2) & agree), "agree1": (match_n >= 1) & agree,
               "agree1|copy2": (match_n >= 2) | ((match_n >= 1) & agree)}[self.rule]
        cols = torch.where(use[:, None], copied, cols)
        self.cols[start:stop] = cols if only is None else torch.where(only[:, None], cols, self.cols[start:stop])


folder = sys.argv[1]
rows = int(sys.argv[2]) if len(sys.argv) > 2 else 4
K = int(sys.argv[3]) if len(sys.argv) > 3 else 3
new = int(sys.argv[4]) if len(sys.argv) > 4 else 128
n_prompts = int(sys.argv[5]) if len(sys.argv) > 5 else 40
engine, suite, gpu = engine_and_suite(new)
listed = load_suite(None, None)  # suite[i] is listed[i]'s tokens
cats = [p.category for p in listed]
order = [listed.index(p) for p in categories_in_turn(listed)][:n_prompts]
head = load_eagle(folder, fingerprint(engine.model.lm_head.weight))
batch = BatchEngine(engine, BatchConfig(slots=rows, max_seq_len=1024, cuda_graph=gpu))
for rule in (sys.argv[6].split(",") if len(sys.argv) > 6 else ("chain", "copy2", "copy3", "agree2", "agree2|copy3", "agree1", "agree1|copy2")):
    hook = Rule(batch, head, K, copy_after=2)
    hook.rule = rule
    steps = BatchLookup(batch, K, hook=hook)
    steps.capture_all()
    hook.capture_all()
    batcher = ContinuousBatcher(batch, lambda: NgramDrafter(3, 1), K, lookup=[steps])
    asks = [(cats[i], batcher.submit(suite[i], GenerationConfig(max_new_tokens=new, min_new_tokens=new))) for i in order]
    batcher.run()
    by = collections.defaultdict(lambda: [0, 0])
    for cat, r in asks:
        by[cat][0] += len(r.tokens) - 1  # (the first token is the prefill's)
        by[cat][1] += r.verify_steps
    total = [sum(v[0] for v in by.values()), sum(v[1] for v in by.values())]
    print(f"{rule:13s} tau {total[0] / total[1]:.3f}  " + "  ".join(f"{c} {t / s:.2f}" for c, (t, s) in by.items()), flush=True)
