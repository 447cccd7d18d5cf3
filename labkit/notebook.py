"""Small helpers that keep the notebooks thin: where results go, and slider plots.

Widgets only display what a plain cell already computed. A slider plot redraws a figure from
those rows in JupyterLab and carries a PNG of its first view for every reader without widgets
(papermill, nbval, Kaggle logs, nbconvert).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def repo_root() -> Path | None:
    """The checkout that holds this labkit, when it is one (an editable install)."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").is_file() else None


def int_list(value: Any, name: str) -> list[int]:
    """A parameters cell's list of whole numbers: "4,8", 8 (papermill passes `-p ks 8` as an int)
    or [4, 8]; anything else is one clear error."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        return [int(str(x).strip()) for x in items if str(x).strip()]
    except ValueError:
        from labkit.errors import LabkitError

        raise LabkitError(f"{name} takes whole numbers separated by commas, got {value!r}") from None


def results_dir(output_dir: str, phase: str) -> Path:
    """`output_dir/phase`, made and checked: call it before measuring, as a dirty checkout is
    refused for results that could be committed (LABKIT_ALLOW_DIRTY=1 lets them through).
    LABKIT_RESULTS_DIR overrides (test runs write to scratch), and a relative path is taken from
    the repository root so notebooks write to the same place whatever their working directory."""
    from labkit.bench.results import check_output_dir, require_clean_tree

    override = os.environ.get("LABKIT_RESULTS_DIR")
    base = Path(override) if override else Path(output_dir)
    if not base.is_absolute():
        root = repo_root()
        base = (root / base) if root else base.resolve()
    out = check_output_dir(base / phase)
    require_clean_tree(out)
    return out


class SliderPlot:
    """A slider over `items` whose every move redraws `draw(item, ax)` (ipywidgets.interactive
    with its output widget), carrying beside it a PNG of the first item's plot.

    Displayed, it is one output with two forms of the same view: JupyterLab renders the live
    widget; papermill and nbval outputs, nbconvert, Kaggle's viewer and any front end without
    widgets show the PNG and the caption. So each widget appears once, and a headless run still
    shows a result."""

    def __init__(self, items: Sequence[Any], draw: Callable[[Any, Any], None], description: str = "item",
                 figsize: tuple[float, float] = (7.0, 3.5)) -> None:
        if not items:
            raise ValueError("slider_plot needs at least one item")
        self.items, self.draw, self.figsize = list(items), draw, figsize
        self.caption = f"{description}: {self.items[0]!r} (of {len(self.items)}; live slider in JupyterLab)"
        self.png = self._png(self.items[0])
        self.widget = self._widget(description)

    def _figure(self, item: Any) -> Any:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=self.figsize)
        self.draw(item, ax)
        fig.tight_layout()
        return fig

    def _png(self, item: Any) -> str:
        import base64
        import io

        import matplotlib.pyplot as plt

        fig = self._figure(item)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        return base64.b64encode(buf.getvalue()).decode("ascii")

    def _widget(self, description: str) -> Any:
        try:
            import ipywidgets as widgets
        except ImportError:  # the PNG alone
            return None
        import matplotlib.pyplot as plt

        def redraw(index: int) -> None:
            self._figure(self.items[index])
            plt.show()

        options = [(str(item), i) for i, item in enumerate(self.items)]
        slider = widgets.SelectionSlider(options=options, value=0, description=description, continuous_update=False)
        return widgets.interactive(redraw, index=slider)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        bundle = self.widget._repr_mimebundle_() if self.widget is not None else {}
        bundle.update({"image/png": self.png, "text/plain": self.caption})
        return bundle


def slider_plot(items: Sequence[Any], draw: Callable[[Any, Any], None], description: str = "item") -> None:
    """Display a `SliderPlot` once; returns nothing, so a notebook cell shows it once."""
    from IPython.display import display

    display(SliderPlot(items, draw, description))


def spec_steps_html(tokenizer: Any, result: Any) -> str:
    """One generation, step by step: accepted draft tokens green, rejected ones red and struck
    through, the target's own token (bonus or recovered) blue. Needs a speculative result."""
    import html

    stats = result.stats
    paths = {step: path for step, _, path in stats.tree_steps}  # token trees: the accepted nodes, in order
    pieces = []
    pos = 1  # tokens[0] came from the prefill
    pieces.append(f"<span style='color:#1f5fbf'>{html.escape(tokenizer.decode(result.tokens[:1]))}</span>")
    for step, (drafted, accepted) in enumerate(zip(stats.draft_tokens, stats.accepted_lengths, strict=True)):
        path = paths.get(step, list(range(accepted)))
        for token in (drafted[i] for i in path):
            pieces.append(f"<span style='background:#c8f0c8'>{html.escape(tokenizer.decode([token]))}</span>")
        for token in (t for i, t in enumerate(drafted) if i not in path):
            pieces.append(f"<span style='background:#f6c6c6;text-decoration:line-through'>{html.escape(tokenizer.decode([token]))}</span>")
        pos += accepted
        if pos < len(result.tokens):
            pieces.append(f"<span style='color:#1f5fbf;font-weight:bold'>{html.escape(tokenizer.decode(result.tokens[pos:pos + 1]))}</span>")
        pos += 1
        pieces.append("<span style='color:#aaa'>|</span>")
    return "<div style='font-family:monospace;white-space:pre-wrap;line-height:1.6'>" + "".join(pieces) + "</div>"


def tree_steps_html(tokenizer: Any, result: Any, max_steps: int = 8) -> str:
    """The first token-tree steps of a generation, each tree drawn by depth: the accepted path
    green, the other nodes grey and struck through, then the target's own token blue."""
    import html

    stats, pieces = result.stats, []
    starts = [1]  # where each step's tokens begin in result.tokens (tokens[0] came from the prefill)
    for accepted in stats.accepted_lengths:
        starts.append(starts[-1] + accepted + 1)
    for step, parents, path in stats.tree_steps[:max_steps]:
        from labkit.specdec.tree import TokenTree

        drafted = stats.draft_tokens[step]
        depth = TokenTree.of_draft(parents).depths()[1:]
        rows = [f"<b>step {step + 1}</b>: {len(path)} of {len(drafted)} nodes accepted"]
        for i, token in enumerate(drafted):
            style = "background:#c8f0c8" if i in path else "color:#999;text-decoration:line-through"
            rows.append("&nbsp;" * 4 * depth[i] + f"└ <span style='{style}'>{html.escape(repr(tokenizer.decode([token])))}</span>")
        at = starts[step] + len(path)
        if at < len(result.tokens):
            rows.append("&nbsp;" * 4 * (len(path) + 1) + f"<span style='color:#1f5fbf;font-weight:bold'>"
                        f"{html.escape(repr(tokenizer.decode(result.tokens[at : at + 1])))}</span> (the target's)")
        pieces.append("<br>".join(rows))
    return "<div style='font-family:monospace;line-height:1.5'>" + "<hr>".join(pieces) + "</div>"
