"""The K-sweep's report: the table `labkit sweep` prints, and its plots (from the rows a sweep measured)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from labkit.specdec.speedup import compare


def plot_at_k(spec: Any, k: int, ax: Any) -> None:
    """Speed-up over plain per category at one K, a bar per drafter (`spec`: a DataFrame of the
    speculative rows). The K sliders of notebooks 2A and 2C draw this."""
    import seaborn as sns

    at_k = spec[spec.k == k]
    sns.barplot(data=at_k, x="category", y="speedup", hue="drafter", errorbar=None, ax=ax)
    ax.axhline(1.0, color="grey", ls="--")
    tau = at_k.groupby("drafter").tau.mean()
    ax.set(title=f"K = {k}: speed-up over plain (tau " + ", ".join(f"{d} {t:.2f}" for d, t in tau.items()) + ")",
           ylabel="x plain", xlabel="")
    ax.tick_params(axis="x", rotation=30)


def plot_sweep(rows: list[dict[str, Any]], stem: Path) -> list[str]:
    # Figures without pyplot: no backend is switched, so a notebook's inline plots keep working.
    import pandas as pd
    import seaborn as sns
    from matplotlib.figure import Figure

    df = pd.DataFrame([r for r in rows if r["drafter"] != "plain"])
    if df.empty:
        return []
    df["setup"] = df.drafter + " " + df.policy + " " + df.controller + df.lossless.map({True: "", False: " (lossy)"})
    fig = Figure(figsize=(16, 4))
    axes = fig.subplots(1, 3)
    sns.lineplot(data=df, x="k", y="tok_per_s", hue="setup", marker="o", ax=axes[0])
    plain = statistics.fmean(r["tok_per_s"] for r in rows if r["drafter"] == "plain")
    axes[0].axhline(plain, color="grey", ls="--", label="plain")
    axes[0].set(title="throughput", xlabel="K (K max for adaptive controllers)", ylabel="tokens / s")
    sns.lineplot(data=df, x="k", y="acceptance_rate", hue="setup", marker="o", ax=axes[1], legend=False)
    axes[1].set(title="acceptance rate")
    sns.barplot(data=df, x="category", y="speedup", hue="setup", ax=axes[2], errorbar=None, legend=False)
    axes[2].axhline(1.0, color="grey", ls="--")
    axes[2].tick_params(axis="x", rotation=45)
    axes[2].set(title="speed-up over plain (mean over K)")
    fig.tight_layout()
    paths = [f"{stem}.png"]
    fig.savefig(paths[0], dpi=110)
    model = pd.DataFrame(compare(rows))
    if not model.empty:
        fig = Figure(figsize=(5, 5))
        ax = fig.subplots()
        sns.scatterplot(data=model, x="measured_speedup", y="predicted_speedup", hue="drafter", style="miss", ax=ax)
        top = max(model.measured_speedup.max(), model.predicted_speedup.max()) * 1.1
        ax.plot([0, top], [0, top], color="grey", ls="--")
        ax.fill_between([0, top], [0, top * 0.85], [0, top * 1.15], color="grey", alpha=0.15, label="within 15%")
        for r in model.itertuples():
            ax.annotate(f"K={r.k}", (r.measured_speedup, r.predicted_speedup), fontsize=7)
        ax.set(title="speedup model vs measured (decode)", xlabel="measured", ylabel="predicted")
        fig.tight_layout()
        paths.append(f"{stem}-model.png")
        fig.savefig(paths[1], dpi=110)
    return paths


def sweep_report(payload: dict[str, Any]) -> list[str]:
    """The lines `labkit sweep` prints: every setup against plain, the best lossless setting per
    category, adaptive K against fixed K, the replay, and the speedup model's misses."""
    out: list[str] = []
    note = payload["parameters"].get("weights_note")
    out.append(f"sweep on {payload['device']['name']}, {payload['parameters']['max_new_tokens']} new tokens, weights {payload['parameters']['weights_resolved']}"
               + (f" ({note})" if note else ""))
    out.append(f"{'drafter':<22}{'policy':<18}{'controller':<11}{'K':>3}{'tok/s':>16}{'speedup':>16}{'accept':>8}{'tau':>6}"
               f"{'agree':>7}{'ppl':>7}{'identical':>10}")
    for r in payload["summary"]:
        policy = r["policy"] + ("" if r["lossless"] else "*")
        out.append(f"{r['drafter']:<22}{policy:<18}{r['controller']:<11}{r['k']:>3}{r['tok_per_s']:>9.1f} ± {r['tok_per_s_std']:<4.1f}"
                   f"{r['speedup']:>9.2f} ± {r['speedup_std']:<4.2f}{r['acceptance_rate']:>7.0%}{r['tau']:>6.2f}"
                   f"{r['agreement_with_plain']:>7.0%}{r['perplexity']:>7.2f}{r['identical_share']:>9.0%}")
    out.append("(* lossy policy: agreement, perplexity and identical measure its drift from plain decoding)")
    out.append("best lossless setting per category:")
    for r in payload["per_category"]:
        best = f"{r['drafter']} {r['policy']} {r['controller']} K={r['k']}: {r['speedup']:.2f}x" if r["drafter"] else "none faster"
        out.append(f"  {r['category']:<14} plain {r['plain_tok_per_s']:.1f} tok/s, {best}")
    for name, table in payload.get("adaptive_vs_fixed", {}).items():
        for r in table["overall"]:
            out.append(f"{name} (K max {r['adaptive_k_max']}) vs fixed K={r['fixed_k']} ({r['drafter']}, {r['policy']}): "
                       f"{r['adaptive_tok_per_s']:.1f} vs {r['fixed_tok_per_s']:.1f} tok/s = {r['ratio']:.3f}x")
        for r in table["per_category"]:
            spread = " (90% interval {:.3f}-{:.3f})".format(*r["ratio_ci90"]) if r["ratio_ci90"] else " (one run each: no interval)"
            out.append(f"  {r['category']:<14} {name} {r['adaptive_tok_per_s']:.1f} vs fixed K={r['best_fixed_k']} {r['best_fixed_tok_per_s']:.1f} tok/s"
                       f" = {r['ratio']:.3f}x{spread}")
        hits = [r for r in table["per_category"] if r["within_5pct"]]
        out.append(f"{name}: within 5% of the best fixed K in {len(hits)} of {len(table['per_category'])} categories")
    replayed = payload.get("replay", {})
    for drafter, result in replayed.get("drafters", {}).items():
        out.append(f"replay ({drafter}, {replayed['passes']} passes, modelled time from measured costs), per category over the best fixed K:")
        names = [n for n in result["overall"] if not n.startswith("fixed")]
        for r in result["per_category"]:
            ratios = ", ".join(f"{n} {r['ratio_to_best_fixed'][n]:.3f}x" for n in names)
            out.append(f"  {r['category']:<14} best {r['best_fixed']}: {ratios}")
        out.append("  overall tok/s: " + ", ".join(f"{n} {v:.1f}" for n, v in result["overall"].items()))
    if replayed.get("skipped"):
        out.append(f"replay skipped {', '.join(replayed['skipped'])}: their proposals depend on more than the context")
    misses = [m for m in payload["speedup_model"] if m["miss"]]
    out.append(f"speedup model: {len(payload['speedup_model']) - len(misses)} of {len(payload['speedup_model'])} fixed-K settings within 15%")
    for m in misses:
        out.append(f"  {m['drafter']} K={m['k']}: predicted {m['predicted_speedup']:.2f}x, measured {m['measured_speedup']:.2f}x: {m['why']}")
    out += [f"wrote {f}" for f in payload.get("files", [])]
    return out
