"""The launches one device step makes, per drafter (diagnostic; runs on the CPU, no GPU needed).

    TRITON_INTERPRET=1 python3 scripts/step_launches.py

At batch 1 on a GPU a kernel in a captured graph costs ~2-4 us whatever it computes
(results/gpu/graph-op-cost-NVIDIA-H200.txt), so the number of launches, not their work, is most
of what separates two drafters' steps. This counts them without a GPU: a tiny Llama on the fused
Triton layers (the interpreter), each drafter's device steps (ngram-graph, eagle-mix, eagle-lazy) run eagerly
under a dispatch mode that logs every PyTorch operation that makes a kernel (views left out) and
every Triton launch. eagle-mix's hook is run in its IF-node form (graphs.only_where; eagerly the
body runs, so its launches are counted apart: a copy step skips them on a GPU).

On the CPU the registry's small kernels (lookup_draft, greedy_verdict, lookup_commit) run as their
PyTorch twins, dozens of operations each, where a GPU launches one Triton kernel each: compare the
hook's own launches (printed in order), not whole steps.
"""

import collections
import os
import sys
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labkit.config import GenerationConfig  # noqa: E402
from labkit.engine import Engine  # noqa: E402
from labkit.generate import Speculation, generate  # noqa: E402
from labkit.models.tiny import tiny_hf_model  # noqa: E402
from labkit.specdec import eagle_hooks, eagle_mix  # noqa: E402
from labkit.specdec.drafters import make_drafter  # noqa: E402
from labkit.specdec.eagle import EagleDims, random_eagle_head  # noqa: E402

DIMS = EagleDims(dim=128, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256)  # the tiny llama's (tests/test_eagle.py's)
VIEWS = {"view", "_unsafe_view", "unsqueeze", "squeeze", "slice", "select", "expand", "transpose", "t", "alias", "as_strided",
         "permute", "detach", "reshape", "unbind", "split", "chunk", "narrow", "item", "_local_scalar_dense", "lift_fresh",
         "empty", "empty_like", "empty_strided"}  # no kernel of their own
log: list[str] = []  # every launch, in order
inside_triton = [0]  # the interpreter's own PyTorch calls are not launches


class Launches(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWS and not inside_triton[0]:
            log.append(name)
        return func(*args, **(kwargs or {}))


def count_triton() -> None:
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        log.append(self.fn.__name__)
        inside_triton[0] += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            inside_triton[0] -= 1

    InterpretedFunction.run = counted


def spans(cls, name: str, into: list) -> None:
    """Log (start, end) into `into` around every call of cls.name."""
    fn = getattr(cls, name)

    def wrapped(self, *args, **kwargs):
        start = len(log)
        out = fn(self, *args, **kwargs)
        into.append((start, len(log)))
        return out

    setattr(cls, name, wrapped)


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (the Triton layers on the CPU)")
    count_triton()
    hooks: list = []
    bodies: list = []
    eagle_mix.if_nodes = lambda: True  # the IF-node form of the hook
    spans(eagle_hooks.ChainOf, "chain_from", bodies)
    spans(eagle_mix.MixOf, "caught_up_chain", bodies)  # eagle-lazy's catch-up and chain: the IF node's body
    spans(eagle_mix.MixOf, "draft_after", hooks)
    engine = Engine.from_hf(tiny_hf_model("llama", seed=4), "cpu", "float32", max_seq_len=160, layer_kernels="triton")
    prompt = [5, 6, 7, 8, 9, 10, 11] * 3 + [40, 41, 5, 6]
    cfg = GenerationConfig(max_new_tokens=24, stop_at_eos=False)
    for name in ("ngram-graph", "eagle-mix", "eagle-lazy"):
        lazy = eagle_mix.LAZY_WINDOW if name == "eagle-lazy" else 0
        drafter = (make_drafter(name, engine) if name == "ngram-graph"
                   else eagle_mix.EagleMixDrafter(engine, random_eagle_head(DIMS), lazy=lazy, device_steps=True))
        generate(engine, prompt, cfg, Speculation(drafter, 8))  # warm: the steps built, the kernels seen once
        log.clear()
        hooks.clear()
        bodies.clear()
        with Launches():
            result = generate(engine, prompt, cfg, Speculation(drafter, 8))
        n = max(1, len(result.stats.accepted_lengths))
        in_body = sum(e - s for s, e in bodies)
        print(f"{name}: {len(log) / n:.1f} launches a step over {n} steps (prefill and host proposals included)"
              + (f", {in_body / n:.1f} of them the chain's (an IF node's body)" if bodies else ""))
        if hooks:
            s, e = hooks[-1]
            inner = [b for b in bodies if s <= b[0] < e]  # the chain (eagle-lazy: its catch-up, then the chain)
            bs, be = inner[0][0], inner[-1][1]
            print(f"  the hook before its body ({bs - s}): {', '.join(log[s:bs])}")
            print(f"  the body: {be - bs}: {', '.join(f'{k}x{v}' for k, v in collections.Counter(log[bs:be]).most_common())}")
            print(f"  the hook after its body ({e - be}): {', '.join(log[be:e])}")


if __name__ == "__main__":
    main()
