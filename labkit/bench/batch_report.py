"""The batch benchmark's report: its table, the controller's choices, each system over plain and the plot
(from a payload of `labkit.bench.batch.run_batch_bench`, or a results file's JSON)."""

from __future__ import annotations

from typing import Any

from labkit.batch.graphs import bucket
from labkit.bench.common import log2_panels


def controller_lines(summary: list[dict[str, Any]]) -> list[str]:
    """For each -auto system and size: the share of its steps each K took, and at its size's rows
    bucket the tokens/s it rated each K at, with what the rates rest on (each K's mean step, the
    fill: plain's first step after drafting, and a row's expected tokens with each K)."""
    def by_k(d: dict[Any, float], fmt: str) -> str:
        return ", ".join(f"K {k} {fmt.format(v)}" for k, v in sorted(d.items(), key=lambda kv: int(kv[0])))

    out = []
    for r in summary:
        if not r.get("k_steps"):
            continue
        total = sum(r["k_steps"].values()) or 1
        line = f"{r['system']} at batch {r['batch']}: steps with " + by_k({k: v / total for k, v in r["k_steps"].items()}, "{:.0%}")
        own = str(bucket(r["batch"]))  # its size's rows bucket
        rates = {str(b): v for b, v in r.get("k_rates", {}).items()}.get(own)
        if rates:
            line += "; rated " + by_k(rates, "{:,.0f}") + " tok/s"
        costs = {str(b): v for b, v in r.get("k_costs", {}).items()}.get(own)
        if costs:
            line += f"; steps {by_k(costs['step_ms'], '{:.2f}')} ms, fill {costs['fill_ms']:.2f} ms"
            if costs.get("load_ms"):  # (files from before loads were timed apart have none)
                line += f", loads after plain {by_k(costs['load_ms'], '{:.2f}')} ms"
            if costs["tokens"]:
                line += f", a row's tokens {by_k(costs['tokens'], '{:.2f}')}"
        out.append(line)
    return out


def over_plain_lines(summary: list[dict[str, Any]]) -> list[str]:
    """Per batch size, each speculative system's aggregate tok/s over plain's, and while every slot
    was busy (the drain left out, `busy_tok_per_s`) where both runs had such a window."""
    plain = {r["batch"]: r for r in summary if r["system"] == "plain"}
    out = []
    for size, base in plain.items():
        parts = []
        for r in (r for r in summary if r["batch"] == size and r["k"]):
            part = f"{r['system']} {r['aggregate_tok_per_s'] / base['aggregate_tok_per_s']:.2f}x"
            if r.get("busy_tok_per_s") and base.get("busy_tok_per_s"):
                part += f" ({r['busy_tok_per_s'] / base['busy_tok_per_s']:.2f}x all busy)"
            parts.append(part)
        if parts:
            out.append(f"batch {size:>3} over plain: " + ", ".join(parts))
    return out


def batch_report(payload: dict[str, Any]) -> list[str]:
    spread = payload["parameters"].get("length_spread") or 0  # (files from before it have none)
    lengths = f"{payload['parameters']['max_new_tokens']} new tokens per request" + (f" (drawn within +-{spread:.0%})" if spread else "")
    out = [f"{payload['card']}: continuous batching, greedy, {lengths}",
           f"{'system':<20} {'batch':>5} {'aggregate tok/s':>16} {'all busy':>9} {'per request':>12} {'ITL ms':>8} {'TTFT ms':>8} {'tau':>5} "
           f"{'= batch 1':>9} {'= own b1':>8}"]
    for r in payload["summary"]:
        busy = f"{r['busy_tok_per_s']:>9.1f}" if r.get("busy_tok_per_s") else f"{'-':>9}"
        out.append(f"{r['system']:<20} {r['batch']:>5} {r['aggregate_tok_per_s']:>16.1f} {busy} {r['per_request_tok_per_s']:>12.1f} "
                   f"{r['itl_ms_p50']:>8.1f} {r['ttft_ms_p50']:>8.1f} {r['tau']:>5.2f} {r['identical_to_batch_1']:>9.0%} {r['identical_to_own_batch_1']:>8.0%}")
    out += controller_lines(payload["summary"])
    out += over_plain_lines(payload["summary"])
    for m in payload["speedup_model"]:
        out.append(f"batch {m['batch']:>3}: speculation measured {m['measured_speedup']:.2f}x plain, model {m['predicted_speedup']:.2f}x "
                   f"(tau {m['tau']:.2f}, step K {payload['parameters']['k']} / plain step {m['spec_over_plain_step']:.2f}, "
                   f"of the device alone {m['verify_over_step']:.2f})")
    if payload["speedup_model"]:
        out.append(f"speculation stops paying at batch {payload['crossover_measured'] or 'never (in these sizes)'}; "
                   f"the model says {payload['crossover_predicted'] or 'never (in these sizes)'}")
    return out


def plot_batch(payload: dict[str, Any], path: Any = None) -> Any:
    """Aggregate tok/s against batch size per system, and speculation's speed-up over plain
    (measured, and the speedup model's prediction)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    rows = payload["summary"]
    for system in dict.fromkeys(r["system"] for r in rows):
        sel = [r for r in rows if r["system"] == system]
        ax1.plot([r["batch"] for r in sel], [r["aggregate_tok_per_s"] for r in sel], marker="o", label=system)
    plain = {r["batch"]: r["aggregate_tok_per_s"] for r in rows if r["system"] == "plain"}
    for system in dict.fromkeys(r["system"] for r in rows if r["k"]):
        sel = [r for r in rows if r["system"] == system and r["batch"] in plain]
        ax2.plot([r["batch"] for r in sel], [r["aggregate_tok_per_s"] / plain[r["batch"]] for r in sel], marker="o", label=f"{system} measured")
    model = payload.get("speedup_model") or []
    if model:
        ax2.plot([m["batch"] for m in model], [m["predicted_speedup"] for m in model], marker="x", linestyle="--", label="speedup model")
    ax2.axhline(1.0, color="grey", lw=0.8)
    log2_panels(fig, [(ax1, "aggregate output tok/s"), (ax2, "speculation / plain")], "batch size",
                f"{payload.get('card', '')}, {payload['parameters'].get('dtype_resolved', '')}, continuous batching, greedy", path)
    return fig
