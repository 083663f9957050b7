"""A/B prompt variants: parsed from PROMPT_VARIANTS, assigned stably by contractor and type."""

from __future__ import annotations

import collections

import pytest

from services.personalizer.variants import VariantPlan
from shared.errors import ConfigurationError


def test_parse_names_and_weights():
    plan = VariantPlan.parse(" standard:3, question ,brief:2 ")
    assert [(v.name, w) for v, w in plan.weighted] == [
        ("standard", 3),
        ("question", 1),
        ("brief", 2),
    ]
    assert str(plan) == "standard:3,question:1,brief:2"


@pytest.mark.parametrize("text", ["", " , ", "nope", "standard,standard", "standard:0", "brief:x"])
def test_bad_settings_stop_the_service(text):
    with pytest.raises(ConfigurationError, match="PROMPT_VARIANTS"):
        VariantPlan.parse(text)


def test_assignment_is_stable_and_depends_on_contractor_and_type():
    plan = VariantPlan.parse("standard,question,brief")
    first = [plan.assign(c, "check_in").name for c in range(1, 200)]
    again = [
        VariantPlan.parse("standard,question,brief").assign(c, "check_in").name
        for c in range(1, 200)
    ]
    assert first == again
    assert len(set(first)) == 3
    by_type = [plan.assign(7, t).name for t in ("check_in", "w9", "expo", "payout", "intro")]
    assert len(set(by_type)) > 1


def test_assignment_follows_the_weights():
    plan = VariantPlan.parse("standard:3,question:1")
    counts = collections.Counter(plan.assign(c, "check_in").name for c in range(1, 20_001))
    share = counts["standard"] / 20_000
    print(f"\nstandard share {share:.3f} (weight 0.75)")
    assert 0.72 < share < 0.78


def test_a_single_variant_takes_everyone():
    plan = VariantPlan.parse("brief")
    assert {plan.assign(c, "x").name for c in range(100)} == {"brief"}
