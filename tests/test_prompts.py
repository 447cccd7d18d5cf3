import pytest

from labkit.prompts import CATEGORIES, load_suite


def test_suite_covers_every_category() -> None:
    suite = load_suite()
    assert len(suite) >= 32
    assert {p.category for p in suite} == set(CATEGORIES)
    assert len({p.id for p in suite}) == len(suite)
    assert all(p.is_chat for p in suite if p.category == "multi_turn")
    assert all(p.content for p in suite)


def test_suite_filters() -> None:
    two = load_suite(["math", "rag"], per_category=2)
    assert [p.category for p in two] == ["math", "math", "rag", "rag"]
    with pytest.raises(ValueError, match="unknown categories"):
        load_suite(["poetry-slam"])
