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
