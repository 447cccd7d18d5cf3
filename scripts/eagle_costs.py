"""Where an EAGLE step's draft time goes on this GPU (diagnostic; prints medians in microseconds).

    python3 scripts/eagle_costs.py EAGLE_FOLDER

On the fused engine (bf16, Triton layers, CUDA graphs): the drafter's work inside a verify of
K+1 tokens (catch-up of the K+1 rows, then the chain of `depth` drafts), run eagerly and captured
in a CUDA graph, with the draft layer on the fused Triton kernels and on PyTorch ops; then the
profiler's GPU time per kernel of one captured-form call, run eagerly. Last, whole steps: a
request of 256 new tokens with the chain in device steps at K = 5 and 8 (microseconds per step,
however many drafts stood: a random head's rarely do), against plain decoding's per token and
ngram-graph's per step at K = 8 (medians of 3 requests).

    python3 scripts/eagle_costs.py EAGLE_FOLDER [steps]    (steps: only the whole steps)
    python3 scripts/eagle_costs.py EAGLE_FOLDER calloff    (eagle-mix with its copy steps' chain
        launches called off, against the same steps with the chain run: interleaved requests)
    python3 scripts/eagle_costs.py EAGLE_FOLDER fused      (eagle and eagle-mix with each chain one
        launch, specdec/eagle_chain.py, against its launches one by one: interleaved requests)
    python3 scripts/eagle_costs.py EAGLE_FOLDER chaincost  (a verify's catch-up and chain captured:
        fused, grids of 32..132 programs, against the launches one by one)
    python3 scripts/eagle_costs.py EAGLE_FOLDER long N     (a long prompt of N tokens: each drafter's
        speed, the graphs it captured, and where eagle-mix's host time goes)
    python3 scripts/eagle_costs.py EAGLE_FOLDER kernels    (ngram-graph's and eagle-mix's steps on a
        copying prompt under the profiler: each kernel's launches and GPU time per step, the GPU's busy
        time per step against the step's wall time: where a copy step's extra time goes)
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from labkit.config import GenerationConfig
from labkit.engine import Engine
from labkit.generate import Speculation, generate, warm_up
from labkit.metrics import timers
from labkit.models.loading import load_model
from labkit.specdec.eagle import load_eagle
from labkit.specdec.eagle_drafter import EagleDrafter
from labkit.specdec.heads import fingerprint

loaded = load_model("default")
engine = Engine.from_loaded(loaded, "cuda", torch.bfloat16, weights="dense", cuda_graph=True, layer_kernels="triton")
engine.ensure_capacity(512)
D = engine.args.dim


def captured(call) -> tuple[torch.cuda.CUDAGraph, object]:
    """call() run once on a side stream (as capture asks), then captured: (the graph, what the capture returned)."""
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    with torch.inference_mode(), torch.cuda.graph(graph):
        out = call()
    return graph, out


def step_us(prompt: list[int], cfg: GenerationConfig, spec: Speculation | None) -> tuple[float, float]:
    """Microseconds per target step of a request (decode time over steps; median of the last 3 of 4) and its tau."""
    per_step = []
    for _ in range(4):
        r = generate(engine, prompt, cfg, spec)
        steps = max(1, len(r.stats.accepted_lengths)) if spec is not None else r.stats.new_tokens - 1
        per_step.append((r.stats.total_s - r.stats.ttft_s) / steps * 1e6)
    return sorted(per_step[1:])[1], r.stats.new_tokens / max(1, steps)


def whole_steps() -> None:
    """Microseconds per step of whole requests (decode time over target steps), medians of 3."""
    prompt = list(range(1000, 1120))  # 120 tokens, the suite's typical prompt
    cfg = GenerationConfig(max_new_tokens=256, stop_at_eos=False)
    drafter = EagleDrafter(engine, load_eagle(sys.argv[1], fingerprint(engine.model.lm_head.weight)))
    from labkit.specdec.drafters import make_drafter

    ways = [("plain", None)] + [(f"eagle K={k}", Speculation(drafter, k)) for k in (5, 8)]
    ways.append(("ngram-graph K=8", Speculation(make_drafter("ngram-graph", engine), 8)))
    hybrid = EagleDrafter(engine, drafter.head, lookup_over=3)
    ways.append(("eagle-ngram K=5", Speculation(hybrid, 5)))
    from labkit.specdec.eagle_mix import EagleMixDrafter

    mix = EagleMixDrafter(engine, drafter.head)
    ways.append(("eagle-mix K=8", Speculation(mix, 8)))
    warm_up(engine, 8, drafter=drafter)
    for name, spec in ways:
        us, tau = step_us(prompt, cfg, spec)
        print(f"step {name:16s}: {us:7.1f} us per step (tau {tau:.2f}), {drafter.name}")
    looped = list(range(1000, 1040)) * 3  # a prompt that repeats itself: mostly copy steps
    for name, spec in [("plain (looped)", None), ("ngram-graph K=8 (looped)", Speculation(make_drafter("ngram-graph", engine), 8)),
                       ("eagle-mix K=8 (looped)", Speculation(mix, 8))]:
        us, tau = step_us(looped, cfg, spec)
        print(f"step {name:26s}: {us:7.1f} us per step (tau {tau:.2f})")
    c = hybrid.choice  # eagle-ngram's rates as its copy-or-chain choice saw them (the random head's chains rarely stand)
    print("eagle-ngram: us per step " + ", ".join(f"{'copy' if k else 'chain'} {1e6 * v:.0f}" for k, v in c.seconds.items())
          + f"; tokens per step {c.tokens}; a switch from copy to chain steps {1e6 * c.switch_s:.0f} us")


def call_off() -> None:
    """eagle-mix's steps with the chain's launches called off where a step copies (only_if), against
    a drafter whose graphs were captured with the flag dropped (the chain runs every step):
    microseconds per step, medians of 5 interleaved requests, on a copying prompt and a typical one."""
    from labkit.specdec import eagle_ops
    from labkit.specdec.eagle_mix import EagleMixDrafter

    head = load_eagle(sys.argv[1], fingerprint(engine.model.lm_head.weight))
    cfg = GenerationConfig(max_new_tokens=256, stop_at_eos=False)
    prompts = {"looped": list(range(1000, 1040)) * 3, "typical": list(range(1000, 1120))}
    called_off, run_always = EagleMixDrafter(engine, head), EagleMixDrafter(engine, head)
    honoured = eagle_ops.OnlyIf.__getattr__
    eagle_ops.OnlyIf.__getattr__ = lambda self, name: getattr(self.ops, name)  # type: ignore[method-assign]
    for prompt in prompts.values():  # captured now, without the flag
        generate(engine, prompt, cfg, Speculation(run_always, 8))
    eagle_ops.OnlyIf.__getattr__ = honoured  # type: ignore[method-assign]
    for name, prompt in prompts.items():
        times: dict[str, list[float]] = {"called off": [], "chain run": []}
        for _ in range(5):
            for way, drafter in (("called off", called_off), ("chain run", run_always)):
                r = generate(engine, prompt, cfg, Speculation(drafter, 8))
                times[way].append((r.stats.total_s - r.stats.ttft_s) / len(r.stats.accepted_lengths) * 1e6)
        print(f"eagle-mix K=8, {name} prompt (tau {r.stats.new_tokens / len(r.stats.accepted_lengths):.2f}): "
              + ", ".join(f"{way} {sorted(t)[2]:.1f} us per step" for way, t in times.items()))


def fused_ab() -> None:
    """Each chain one launch (kernels/chain_triton.py) against its launches one by one, for eagle and
    eagle-mix at K=8: microseconds per step, medians of 5 interleaved requests, on a typical and a
    copying prompt; the two must give the same tokens and the same tau (the same drafts)."""
    from labkit.specdec.eagle_mix import EagleMixDrafter

    head = load_eagle(sys.argv[1], fingerprint(engine.model.lm_head.weight))
    cfg = GenerationConfig(max_new_tokens=256, stop_at_eos=False)
    prompts = {"typical": list(range(1000, 1120)), "looped": list(range(1000, 1040)) * 3}
    plain = {name: step_us(prompt, cfg, None)[0] for name, prompt in prompts.items()}
    for cls in (EagleDrafter, EagleMixDrafter):
        fused, apart = cls(engine, head), cls(engine, head)
        fused.fused_chain, apart.fused_chain = True, False
        for name, prompt in prompts.items():
            times: dict[str, list[float]] = {"one launch": [], "launches": []}
            seen: dict[str, tuple] = {}
            for _ in range(5):
                for way, drafter in (("one launch", fused), ("launches", apart)):
                    r = generate(engine, prompt, cfg, Speculation(drafter, 8))
                    times[way].append((r.stats.total_s - r.stats.ttft_s) / len(r.stats.accepted_lengths) * 1e6)
                    seen[way] = (r.tokens, len(r.stats.accepted_lengths))
            same = seen["one launch"] == seen["launches"]
            print(f"{fused.name} K=8, {name} prompt (tau {r.stats.new_tokens / len(r.stats.accepted_lengths):.2f}, plain "
                  f"{plain[name]:.1f} us a token): " + ", ".join(f"{way} {sorted(t)[2]:.1f} us per step" for way, t in times.items())
                  + f"; same tokens and steps: {same}")
        print(f"{fused.name}: grid barriers that gave up: {fused._fused.stalls()}")


def chain_cost() -> None:
    """A K=8 verify's catch-up and 5-deep chain (EagleDrafter.catch_up_chain) captured in a CUDA
    graph: microseconds per replay, fused (one launch; grids of 32..132 programs) against the
    launches one by one, and whether the fused drafts equal theirs."""
    from labkit.kernels.triton_common import TUNE

    drafter = EagleDrafter(engine, load_eagle(sys.argv[1], fingerprint(engine.model.lm_head.weight)))
    drafter.start(list(range(1000, 1300)), 512)
    T = 9
    hidden = torch.randn(1, T, D, device="cuda", dtype=torch.bfloat16)
    tokens = torch.randint(0, 1000, (1, T), device="cuda")
    input_pos = torch.arange(300, 300 + T, device="cuda")
    verdict = torch.tensor([[3, 5]], device="cuda")

    def replay_us(fused: bool, programs: int) -> tuple[float, list[int]]:
        drafter.fused_chain, TUNE["chain_programs"] = fused, programs
        drafter.catch_up_chain(hidden, verdict, tokens, input_pos, drafter.depth)  # compiled and warm
        graph, out = captured(lambda: drafter.catch_up_chain(hidden, verdict, tokens, input_pos, drafter.depth))
        us = timers.median_us(lambda: (graph.replay(), torch.cuda.synchronize()), 200, warm=20)
        return us, out.flatten().tolist()

    base, want = replay_us(False, 128)
    print(f"catch-up of {T} rows + chain {drafter.depth} deep, captured: launches one by one {base:.1f} us (with the host's sync)")
    for programs in (32, 64, 96, 128, 132):
        us, got = replay_us(True, programs)
        print(f"  fused, {programs:3d} programs: {us:.1f} us, drafts {'equal' if got == want else f'DIFFER {got} vs {want}'}")
    print(f"grid barriers that gave up: {drafter._fused.stalls()}")
    TUNE["chain_programs"] = 128


def step_kernels() -> None:
    """Per kernel name: launches and GPU microseconds per target step, for one request each (after
    two unprofiled ones) of ngram-graph and eagle-mix K 8 on a prompt that repeats itself (copy steps),
    and eagle-mix on a typical prompt; then GPU busy time per step against wall time per step."""
    from collections import defaultdict

    from labkit.specdec.drafters import make_drafter
    from labkit.specdec.eagle_mix import EagleMixDrafter

    head = load_eagle(sys.argv[1], fingerprint(engine.model.lm_head.weight))
    cfg = GenerationConfig(max_new_tokens=256, stop_at_eos=False)
    looped, typical = list(range(1000, 1040)) * 3, list(range(1000, 1120))
    runs = [("ngram-graph (looped)", looped, make_drafter("ngram-graph", engine)),
            ("eagle-mix (looped)", looped, EagleMixDrafter(engine, head)), ("eagle-mix (typical)", typical, EagleMixDrafter(engine, head))]
    warm_up(engine, 8)
    tables = {}
    for name, prompt, drafter in runs:
        spec = Speculation(drafter, 8)
        for _ in range(2):
            generate(engine, prompt, cfg, spec)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            r = generate(engine, prompt, cfg, spec)
            torch.cuda.synchronize()
        steps = max(1, len(r.stats.accepted_lengths))
        wall_us = (r.stats.total_s - r.stats.ttft_s) / steps * 1e6
        by = defaultdict(lambda: [0, 0.0])
        busy = 0.0
        for e in prof.events():
            if e.device_type.name == "CUDA" and e.device_time_total > 0:
                by[e.name][0] += 1
                by[e.name][1] += e.device_time_total
                busy += e.device_time_total
        tables[name] = {k: (n / steps, us / steps) for k, (n, us) in by.items()}
        launches = sum(n for n, _ in by.values()) / steps
        print(f"{name:22s}: {steps} steps, tau {r.stats.new_tokens / steps:.2f}, wall {wall_us:.1f} us a step, "
              f"GPU busy {busy / steps:.1f} us a step (prefill included), {launches:.1f} kernels a step")
    names = sorted({k for t in tables.values() for k in t}, key=lambda k: -max(t.get(k, (0, 0))[1] for t in tables.values()))
    print(f"{'kernel':60s} " + " | ".join(f"{n[:22]:>22s}" for n in tables))
    for k in names[:45]:
        print(f"{k[:60]:60s} " + " | ".join(f"{t.get(k, (0, 0))[0]:6.2f}x {t.get(k, (0, 0))[1]:8.1f} us" for t in tables.values()))


def triton_compiles(prof) -> tuple[int, float]:
    """Calls of triton.compiler's compile during a profiled run (disk-cache loads included) and their seconds:
    read from the profile, so that it counts whatever name a kernel's JITFunction bound the function to."""
    import pstats

    calls = [(v[1], v[3]) for (f, _, fn), v in pstats.Stats(prof).stats.items()  # type: ignore[attr-defined]
             if fn == "compile" and f.replace("\\", "/").endswith("triton/compiler/compiler.py")]
    return sum(n for n, _ in calls), sum(t for _, t in calls)


def long_request(n: int) -> None:
    """One long prompt (prompts/long.py): each request of plain, eagle-mix and eagle (in that order,
    as the suite runs them) with its tok/s, the CUDA graphs captured and the Triton compiles during it
    (a first request pays for them), and the host profile of eagle-mix's first request."""
    import cProfile
    import pstats

    from labkit.prompts.long import long_prompt
    from labkit.specdec.eagle_mix import EagleMixDrafter

    captures = [0]
    capture_begin = torch.cuda.CUDAGraph.capture_begin

    def counted_capture(self, *a, **k):
        captures[0] += 1
        return capture_begin(self, *a, **k)

    torch.cuda.CUDAGraph.capture_begin = counted_capture  # type: ignore[method-assign]
    head = load_eagle(sys.argv[1], fingerprint(engine.model.lm_head.weight))
    prompt, cfg = long_prompt(loaded.tokenizer, n), GenerationConfig(max_new_tokens=128, stop_at_eos=False)
    for name, spec in (("plain", None), ("eagle-mix", Speculation(EagleMixDrafter(engine, head), 8)),
                       ("eagle", Speculation(EagleDrafter(engine, head), 8))):
        for i in range(3):
            captures[0] = 0
            prof = cProfile.Profile()
            prof.enable()
            r = generate(engine, prompt, cfg, spec)
            prof.disable()
            compiles, compile_s = triton_compiles(prof)
            print(f"{name} request {i + 1}: {r.stats.new_tokens / r.stats.total_s:.0f} tok/s ({r.stats.total_s * 1e3:.0f} ms), "
                  f"{captures[0]} graphs captured, {compiles} Triton compiles ({compile_s * 1e3:.0f} ms), attend_len {engine.attend_len}")
            if name == "eagle-mix" and i == 0:
                pstats.Stats(prof).sort_stats("cumulative").print_stats(12)


if sys.argv[2:3] == ["long"]:
    long_request(int(sys.argv[3]))
    sys.exit(0)
if sys.argv[2:] == ["kernels"]:
    step_kernels()
    sys.exit(0)
if sys.argv[2:] == ["steps"]:
    whole_steps()
    sys.exit(0)
if sys.argv[2:] == ["chaincost"]:
    chain_cost()
    sys.exit(0)
if sys.argv[2:] == ["fused"]:
    fused_ab()
    sys.exit(0)
if sys.argv[2:] == ["calloff"]:
    call_off()
    sys.exit(0)
for dtype, T in ((torch.bfloat16, 4), (torch.float32, 4), (torch.bfloat16, 6)):
    drafter = EagleDrafter(engine, load_eagle(sys.argv[1], fingerprint(engine.model.lm_head.weight)), dtype)
    drafter.start([1, 2, 3], 512)
    print(f"{drafter.name} in {dtype} on {torch.cuda.get_device_name()}, draft cache {drafter._draft_cache.max_len} positions")
    ops_triton = drafter.ops
    hidden = torch.randn(1, T, D, device="cuda", dtype=torch.bfloat16)
    tokens = torch.randint(0, 1000, (1, T), device="cuda")
    input_pos = torch.arange(300, 300 + T, device="cuda")
    verdict = torch.tensor([[1, 5]], device="cuda")

    def call() -> torch.Tensor:
        return drafter.draft_after(hidden, verdict, engine.model.lm_head, tokens, input_pos)

    for name, ops in (("triton", ops_triton), ("torch", None)):
        drafter.ops = ops
        for _ in range(3):
            call()
        eager = timers.median_us(lambda: (call(), torch.cuda.synchronize()), 50, warm=0)
        graph, _ = captured(call)
        replay = timers.median_us(lambda: (graph.replay(), torch.cuda.synchronize()), 100, warm=0)
        print(f"T={T} {name:6s}: eager {eager:7.1f} us, captured {replay:7.1f} us (a verify + host read alone is ~550)")
    drafter.ops = ops_triton
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14))
whole_steps()
