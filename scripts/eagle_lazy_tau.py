"""What eagle-lazy's stale elements cost in acceptance, on the CPU (diagnostic; no GPU needed).

    python3 scripts/eagle_lazy_tau.py EAGLE_FOLDER [MAX_TOKENS] [K]

eagle-lazy (specdec/eagle_mix.py) leaves the draft cache alone on copy steps and catches it up over a
window of positions before each chain; after a copy longer than the window, the chain's attention
reads stale elements. Its speed is the GPU's business, but its acceptance is not: here both drafters'
device steps run eagerly on the CPU (each skipping the IF node's body on copy steps, as a captured graph
does) over the suite's prompts, the embedded model (dense fp32) and a trained head, and the report gives tokens per
target step per category and overall, eagle-mix against eagle-lazy (window 32, and 8), every output
checked against plain greedy's.
"""

import sys
from collections import defaultdict

import torch

from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.generate import Speculation, generate
from labkit.models.loading import load_model
from labkit.prompting import encode_prompt
from labkit.prompts import load_suite
from labkit.specdec.eagle import load_eagle
from labkit.specdec.eagle_mix import LAZY_WINDOW, EagleMixDrafter
from labkit.specdec.heads import fingerprint


def main() -> None:
    folder = sys.argv[1]
    max_new = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    k = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    loaded = load_model("default")
    engine = Engine.from_loaded(loaded, "cpu", None, weights="dense")  # the PyTorch layers: the device steps' only_if needs them on a CPU
    head = load_eagle(folder, fingerprint(engine.model.lm_head.weight))
    cfg = GenerationConfig(max_new_tokens=max_new, stop_at_eos=False)
    systems = {"eagle-mix": 0, f"eagle-lazy{LAZY_WINDOW}": LAZY_WINDOW, "eagle-lazy8": 8}
    totals: dict[str, dict[str, list[int]]] = {name: defaultdict(lambda: [0, 0]) for name in systems}
    prompts = load_suite()
    steps: dict[str, int] = {}
    for p in prompts:
        ids = encode_prompt(loaded.tokenizer, p.content)
        want = generate(engine, ids, cfg).tokens
        for name, lazy in systems.items():
            drafter = EagleMixDrafter(engine, head, lazy=lazy, device_steps=True)
            got = generate(engine, ids, cfg, Speculation(drafter, k))
            if got.tokens != want:
                sys.exit(f"{name} on {p.id}: not plain greedy's tokens")
            steps[name] = len(got.stats.accepted_lengths)
            for key in (p.category, "overall"):
                totals[name][key][0] += len(got.tokens)
                totals[name][key][1] += steps[name]
        print(p.id, " ".join(f"{name} {len(want) / max(1, n):.2f}" for name, n in steps.items()), flush=True)
    print(f"tokens per target step, {len(prompts)} prompts, {max_new} tokens, K {k}, CPU {torch.__version__} (every output plain greedy's):")
    for key in [*sorted({p.category for p in prompts}), "overall"]:
        row = {name: totals[name][key][0] / max(1, totals[name][key][1]) for name in systems}
        print(f"  {key:<14}" + "  ".join(f"{name} {tau:.3f}" for name, tau in row.items()))


if __name__ == "__main__":
    main()
