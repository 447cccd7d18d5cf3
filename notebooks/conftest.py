"""Checks on what the notebooks show, made while nbval runs them headless.

A cell that calls `slider_plot` must display its widget exactly once, and that one output must
carry a PNG of the default view, so papermill outputs, nbval and Kaggle logs show a result.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def slider_output_problem(outputs: list[Any]) -> str | None:
    """Why a slider cell's outputs fall short, or None when they are right."""
    views = [o for o in outputs if WIDGET_VIEW in o.get("data", {})]
    if len(views) != 1:
        return f"the slider widget was displayed {len(views)} times, not once"
    if not views[0]["data"].get("image/png"):
        return "the slider's output carries no plot for readers without widgets"
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    result = yield
    cell = getattr(item, "cell", None)  # nbval's notebook cells only
    if cell is not None and "slider_plot(" in cell.source:
        problem = slider_output_problem(getattr(item, "test_outputs", None) or [])
        if problem:
            raise AssertionError(f"{item.name}: {problem}")
    return result
