"""Small helpers that keep the notebooks thin: where results go, and slider views.

Widgets only display what a plain cell already computed; without ipywidgets (or without a
front end, as under papermill and nbval) a view shows its first item as plain output.
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


def results_dir(output_dir: str, phase: str) -> Path:
    """`output_dir/phase`; LABKIT_RESULTS_DIR overrides (test runs write to scratch), and a
    relative path is taken from the repository root so notebooks write to the same place
    whatever their working directory."""
    override = os.environ.get("LABKIT_RESULTS_DIR")
    base = Path(override) if override else Path(output_dir)
    if not base.is_absolute():
        root = repo_root()
        base = (root / base) if root else base.resolve()
    return base / phase


def slider_view(items: Sequence[Any], render: Callable[[Any], None], description: str = "item") -> Any:
    """An IntSlider over `items` that calls `render(item)`; returns the widget (or None)."""
    if not items:
        return None
    try:
        import ipywidgets as widgets
        from IPython.display import display
    except ImportError:  # plain output instead
        render(items[0])
        return None
    out = widgets.Output()
    slider = widgets.IntSlider(value=0, min=0, max=len(items) - 1, description=description, continuous_update=False)

    def show(change: Any = None) -> None:
        out.clear_output(wait=True)
        with out:
            render(items[slider.value])

    slider.observe(show, names="value")
    show()
    box = widgets.VBox([slider, out])
    display(box)
    return box


def spec_steps_html(tokenizer: Any, result: Any) -> str:
    """One generation, step by step: accepted draft tokens green, rejected ones red and struck
    through, the target's own token (bonus or recovered) blue. Needs a speculative result."""
    import html

    stats = result.stats
    pieces = []
    pos = 1  # tokens[0] came from the prefill
    pieces.append(f"<span style='color:#1f5fbf'>{html.escape(tokenizer.decode(result.tokens[:1]))}</span>")
    for drafted, accepted in zip(stats.draft_tokens, stats.accepted_lengths, strict=True):
        for token in drafted[:accepted]:
            pieces.append(f"<span style='background:#c8f0c8'>{html.escape(tokenizer.decode([token]))}</span>")
        for token in drafted[accepted:]:
            pieces.append(f"<span style='background:#f6c6c6;text-decoration:line-through'>{html.escape(tokenizer.decode([token]))}</span>")
        pos += accepted
        if pos < len(result.tokens):
            pieces.append(f"<span style='color:#1f5fbf;font-weight:bold'>{html.escape(tokenizer.decode(result.tokens[pos:pos + 1]))}</span>")
        pos += 1
        pieces.append("<span style='color:#aaa'>|</span>")
    return "<div style='font-family:monospace;white-space:pre-wrap;line-height:1.6'>" + "".join(pieces) + "</div>"
