"""Slider plots: one output, a live widget that redraws the chosen item, a PNG of the default."""

import base64

import pytest

pytest.importorskip("ipywidgets")
import matplotlib  # noqa: E402

matplotlib.use("Agg")

from labkit.notebook import SliderPlot  # noqa: E402


def test_slider_plot_redraws_the_chosen_item_and_carries_a_png():
    drawn = []

    def draw(item, ax):
        drawn.append(item)
        ax.plot([0, 1], [item, item])

    view = SliderPlot([2, 4, 8], draw, description="K")
    assert drawn[:2] == [2, 2]  # the PNG and the widget's first view, both of the default item
    bundle = view._repr_mimebundle_()
    assert base64.b64decode(bundle["image/png"]).startswith(b"\x89PNG")
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"].startswith("K: 2")
    slider = view.widget.children[0]
    assert [label for label, _ in slider.options] == ["2", "4", "8"]
    slider.value = 2
    assert drawn[-1] == 8


def test_slider_plot_refuses_no_items():
    with pytest.raises(ValueError, match="at least one item"):
        SliderPlot([], lambda item, ax: None)


def test_number_lists_from_a_parameters_cell_take_what_papermill_passes() -> None:
    """`-p ks 8` reaches a notebook as the int 8, `-p ks 4,8` as a string: both are lists; a word
    among the numbers is one clear error."""
    import pytest

    from labkit.errors import LabkitError
    from labkit.notebook import int_list

    assert int_list("4, 8", "ks") == [4, 8] and int_list(8, "ks") == [8] and int_list([4, "8"], "ks") == [4, 8]
    assert int_list("", "ks") == [] and int_list("5,", "ks") == [5]
    with pytest.raises(LabkitError, match="ks takes whole numbers"):
        int_list("4,x", "ks")
