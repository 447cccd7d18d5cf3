"""What each way of mixing EAGLE's chain and prompt lookup's copy would make of the suite (diagnostic).

    python3 scripts/copy_chain_sim.py EAGLE_FOLDER [CACHE.json]
    python3 scripts/copy_chain_sim.py EAGLE_FOLDER CACHE.json copycost   (two rules against a copy step's cost)
    python3 scripts/copy_chain_sim.py EAGLE_FOLDER CACHE.json lazy       (eagle-mix's rule at eagle-lazy's step costs)

Per suite prompt: the greedy continuation (128 tokens, this machine's fp32 target), and at every
position of it the tokens a chain step would keep (the head's chain of `depth` drafts from that
anchor, all anchors in one unrolled pass: the training-time test, so depth d sees the head's own
depth d-1 feature) and the tokens a copy step would keep (lookup's K=8 copy, the device rule).
With it, both drafts themselves (rules that compare them), and the head's confidence in its first draft (a rule that copies only where the chain is
unsure simulated worse: the head is sure of itself inside copies too). These are cached in CACHE.json (default /tmp/copy_chain_sim.json) so that policies can be changed
and re-run in a second.

Then each policy walks every prompt's positions with step costs measured on an H200
(scripts/eagle_costs.py: plain 546 us, a chain step 806 us, a copy step 599 us, ngram-graph 581 us;
a host read per chunk of 8 steps, READ_US) and prints tokens per second against plain, per
category and overall. The CPU's fp32 drafts differ a little from the GPU's bf16 ones: compare
policies with each other, not with the GPU's measured numbers.
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

PLAIN_US, CHAIN_US, COPY_US, NGRAM_US, READ_US, CHUNK = 546.0, 806.0, 599.0, 581.0, 60.0, 8
TREE_EXTRA_US = 35.0  # a verify of 1 + depth + 8 rows instead of 1 + depth (ngram-graph's K=8 over plain)
SWITCH_US = 150.0  # the eager catch-up and first chain after copy steps (guess: not measured on the GPU)
K_COPY = 8


def measure(folder: str, cache: Path) -> list[dict]:
    from labkit.config import GenerationConfig
    from labkit.eagle_train import FrozenEmbedding
    from labkit.engine import Engine
    from labkit.generate import generate
    from labkit.models.loading import load_model
    from labkit.prompting import encode_prompt
    from labkit.prompts import load_suite
    from labkit.specdec.copy_or_chain import CopyOrChain, agreement
    from labkit.specdec.eagle import draft_head_weight, load_eagle
    from labkit.specdec.heads import fingerprint

    loaded = load_model("default")
    engine = Engine.from_loaded(loaded, "cpu", torch.bfloat16, weights="dense")
    head = load_eagle(folder, fingerprint(engine.model.lm_head.weight)).float()
    embed = FrozenEmbedding(engine.model)
    weight = draft_head_weight(head, engine.model.lm_head.weight.detach().float())  # (N, D)
    rows = []
    for p in load_suite(None, None):
        prompt = encode_prompt(loaded.tokenizer, p.content)
        out = generate(engine, prompt, GenerationConfig(max_new_tokens=128, min_new_tokens=128)).tokens
        ids = prompt + out
        engine.keep_hidden_states(every_position=True)
        with torch.inference_mode():
            engine.reset()
            engine.ensure_capacity(len(ids))
            engine.prefill(torch.tensor([ids]))
            feats = engine.hidden_span(0, len(ids)).float()  # (1, T, D)
            engine.reset()
            outs = head.unrolled(feats, torch.tensor([ids]), embed, head.cfg.depth)
            preds = [head.vocab_ids[(o[0] @ weight.t()).argmax(-1)].tolist() for o in outs]  # depth x (T,)
            p1 = (outs[0][0] @ weight.t()).float().softmax(-1).max(-1).values.tolist()  # (T,) depth 1's confidence
        engine.keep_hidden_states(every_position=False)
        lookup = CopyOrChain(min_n=1)
        lookup.start(prompt, len(ids) + 16)
        chain, copy, conf, chain_drafts, copy_drafts = [], [], [], [], []
        for at in range(len(prompt) + 1, len(ids)):  # a context of `at` tokens: the anchor is at - 2
            chain_drafts.append([preds[d][at - 2] for d in range(head.cfg.depth)])
            copy_drafts.append(lookup.copy(ids[:at], K_COPY) or [])
            chain.append(agreement(chain_drafts[-1], ids[at:]))
            copy.append(agreement(copy_drafts[-1], ids[at:]))
            conf.append(round(p1[at - 2], 4))
        rows.append({"id": p.id, "category": p.category, "ids": ids, "prompt_len": len(prompt), "chain": chain, "copy": copy,
                     "conf": conf, "chain_drafts": chain_drafts, "copy_drafts": copy_drafts})
        print(p.id, len(out), "chain mean", round(sum(chain) / max(1, len(chain)), 2), "copy mean", round(sum(copy) / max(1, len(copy)), 2), flush=True)
    cache.write_text(json.dumps(rows))
    return rows


def walk(row: dict, choose, chunk: int = CHUNK) -> float:
    """Microseconds to make the row's tokens with `choose(state) -> (kind, cost_us)` per chunk or step."""
    chain, copy = row["chain"], row["copy"]
    n, at, us, steps = len(chain), 0, 0.0, 0
    state = {"row": row, "hist": []}
    while at < n:
        kind, cost = choose(state, at)
        kept = {"chain": chain[at], "copy": copy[at], "tree": max(chain[at], copy[at]), "plain": 0}[kind]
        state["hist"].append((kind, at, kept))
        us += cost
        at += 1 + kept
        steps += 1
        if steps % chunk == 0:
            us += READ_US
    return us + READ_US


def fixed(kind: str, cost: float):
    return lambda state, at: (kind, cost)


def per_step_oracle(state, at):
    r = state["row"]
    return ("copy", COPY_US) if (1 + r["copy"][at]) / COPY_US > (1 + r["chain"][at]) / CHAIN_US else ("chain", CHAIN_US)


def chunked(rule):
    """A rule that sees only the chunks before (its decision holds for CHUNK steps)."""
    def choose(state, at):
        h = state["hist"]
        if len(h) % CHUNK == 0:
            state["chunk_kind"] = rule(state, at)
        kind = state["chunk_kind"]
        cost = {"chain": CHAIN_US, "copy": COPY_US, "tree": CHAIN_US + TREE_EXTRA_US}[kind]
        if kind == "chain" and len(h) % CHUNK == 0 and h and h[-1][0] == "copy":
            cost += SWITCH_US
        return kind, cost
    return choose


def rates_rule(chain_kind: str = "chain"):
    """copy_or_chain.py's rule, roughly: rates from the chunks seen (copy's also from chain chunks' text)."""
    def rule(state, at):
        h, r = state["hist"], state["row"]
        if not h:
            return chain_kind
        mine = [x for x in h[-CHUNK:]]
        copy_tokens = sum(1 + r["copy"][a] for _, a, _ in mine) / len(mine)
        chain_seen = [1 + kept for k, _, kept in h if k != "copy"]
        chain_tokens = sum(chain_seen[-CHUNK:]) / len(chain_seen[-CHUNK:]) if chain_seen else 0
        chain_cost = CHAIN_US + (TREE_EXTRA_US if chain_kind == "tree" else 0)
        return "copy" if copy_tokens / COPY_US > chain_tokens / chain_cost else chain_kind
    return rule


COPY_MIX_US, CHAIN_MIX_US = 640.0, 826.0  # per-step mixing on the device: both verify 9 rows, every step catches the draft cache up


def match_len(ids: list[int], at: int, max_n: int = 3) -> int:
    """The longest n <= max_n whose last-n-token suffix of ids[:at] occurs earlier (lookup's match)."""
    for n in range(max_n, 0, -1):
        tail = ids[at - n : at]
        for s in range(0, at - n):
            if ids[s : s + n] == tail:
                return n
    return 0


def per_step_rule(min_n: int, min_prev: int):
    """Copy where the context ends in an n-gram match of at least min_n tokens and lookup's copy at
    the step before would have kept at least min_prev tokens; else chain."""
    def choose(state, at):
        r, h = state["row"], state["hist"]
        ids, base = r["ids"], r["prompt_len"] + 1
        prev_ok = bool(h) and r["copy"][h[-1][1]] >= min_prev
        copy = match_len(ids, base + at) >= min_n and (min_prev == 0 or prev_ok)
        return ("copy", COPY_MIX_US) if copy else ("chain", CHAIN_MIX_US)
    return choose


DRAFT_US = 20.0  # one draft pass of the chain (a 9-row catch-up and 5 passes: 145 us captured, eagle-chain-cost-...-7274f8c.txt)


def agreeing_rule(max_conf: float):
    """Copy where the context ends in an n-gram seen before and lookup's first token is the chain's
    first draft (or the head is unsure of it, below max_conf); else chain. A copy step pays the
    chain's first pass too (its draft is compared), the rest of the chain skipped (IF nodes)."""
    def choose(state, at):
        r = state["row"]
        first_copy, first_chain = r["copy_drafts"][at][:1], r["chain_drafts"][at][:1]
        copy = match_len(r["ids"], r["prompt_len"] + 1 + at) >= 1 and (first_copy == first_chain or r["conf"][at] < max_conf)
        return ("copy", COPY_MIX_US + DRAFT_US) if copy else ("chain", CHAIN_MIX_US)
    return choose


def without_if_nodes(rule):
    """The rule's choices, with a copy step costing a chain step (its chain drafted and dropped)."""
    def choose(state, at):
        kind, _ = rule(state, at)
        return kind, CHAIN_MIX_US
    return choose


POLICIES = {
    "ngram-graph (copy steps)": lambda: fixed("copy", NGRAM_US),
    "eagle (chain steps)": lambda: fixed("chain", CHAIN_US),
    "per-step oracle": lambda: per_step_oracle,
    "per-step oracle, mixing costs": lambda: lambda state, at: (("copy", COPY_MIX_US) if (1 + state["row"]["copy"][at]) / COPY_MIX_US
                                                              > (1 + state["row"]["chain"][at]) / CHAIN_MIX_US else ("chain", CHAIN_MIX_US)),
    "chunks by rates (eagle-ngram now)": lambda: chunked(rates_rule()),
    "tree steps (chain + copy branch)": lambda: fixed("tree", CHAIN_US + TREE_EXTRA_US),
    "chunks by rates, tree or copy": lambda: chunked(rates_rule("tree")),
    **{f"per step: match >= {n}, last copy kept >= {a}": (lambda n=n, a=a: per_step_rule(n, a))
       for n in (1, 2, 3) for a in (0, 1, 2, 3)},
    "per step: match >= 2, no IF nodes": lambda: without_if_nodes(per_step_rule(2, 0)),
    "per step: match >= 1, first tokens agree": lambda: agreeing_rule(0.0),
    "per step: match >= 1, agree or head < 0.3": lambda: agreeing_rule(0.3),
}


def overall(rows: list[dict], make) -> float:
    """Plain's time over the policy's, all prompts together."""
    return sum(len(r["chain"]) + 1 for r in rows) * PLAIN_US / sum(walk(r, make()) for r in rows)


def copy_costs(rows: list[dict]) -> None:
    """eagle-mix's rule and the agreement rule against what a copy step costs (the IF nodes' gain
    measured on the H200, 1.81x -> 1.87-1.88x, matches ~700 us; lookup's own step is 581)."""
    global COPY_MIX_US
    rules = {"match >= 2 (eagle-mix)": lambda: per_step_rule(2, 0), "agree or head < 0.5": lambda: agreeing_rule(0.5)}
    for cost in (600.0, 640.0, 700.0, 750.0, CHAIN_MIX_US):
        COPY_MIX_US = cost
        print(f"copy step {cost:.0f} us: " + ", ".join(f"{name} {overall(rows, make):.3f}x" for name, make in rules.items()))


def lazy_costs(rows: list[dict]) -> None:
    """eagle-mix's rule with eagle-lazy's costs: copy steps without the catch-up (11 launches fewer:
    results/step-launches-20261205.txt), chain steps with 4 more and a 32-row catch-up (guessed at +25 us)."""
    global COPY_MIX_US, CHAIN_MIX_US
    for copy, chain, label in ((700.0, 826.0, "eagle-mix as measured"), (640.0, 850.0, "eagle-lazy, ~5 us a launch saved"),
                               (600.0, 850.0, "eagle-lazy at lookup's own copy cost"), (640.0, 826.0, "eagle-lazy, chain steps as eagle-mix's")):
        COPY_MIX_US, CHAIN_MIX_US = copy, chain
        print(f"copy {copy:.0f} us, chain {chain:.0f} us ({label}): {overall(rows, lambda: per_step_rule(2, 0)):.3f}x")


def main() -> None:
    cache = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/copy_chain_sim.json")
    rows = json.loads(cache.read_text()) if cache.exists() else measure(sys.argv[1], cache)
    if sys.argv[3:] == ["copycost"]:
        copy_costs(rows)
        return
    if sys.argv[3:] == ["lazy"]:
        lazy_costs(rows)
        return
    for name, make in POLICIES.items():
        by_cat: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        tot_us, tot_plain = 0.0, 0.0
        per_prompt = []
        for row in rows:
            n = len(row["chain"]) + 1
            us = walk(row, make())
            plain = n * PLAIN_US
            by_cat[row["category"]][0] += plain
            by_cat[row["category"]][1] += us
            tot_plain += plain
            tot_us += us
            per_prompt.append(plain / us)
        cats = " ".join(f"{c[:6]} {p / u:.2f}" for c, (p, u) in sorted(by_cat.items()))
        print(f"{name:36s} overall {tot_plain / tot_us:.3f}x  mean per prompt {sum(per_prompt) / len(per_prompt):.3f}x | {cats}")


if __name__ == "__main__":
    main()
