from datetime import date

import pytest

from shared.templates import TemplateContext, TemplateError, check_template, placeholders, render

CONTRACTOR = {"first_name": "Sam", "last_name": "Rivera", "company_name": "Rivera Roofing"}


def test_fills_placeholders_from_the_rows():
    context = TemplateContext(
        CONTRACTOR,
        action_item={"title": "Send the W-9", "due_date": date(2026, 12, 3)},
        event={"name": "Spring Expo", "location": "Austin"},
    )
    text = render(
        "Hi {first_name} of {company_name}: {action_item} is due {action_item_due_date}. "
        "See you at {event_name} in {event_location}.",
        context,
    )
    assert text == (
        "Hi Sam of Rivera Roofing: Send the W-9 is due Dec 3, 2026. "
        "See you at Spring Expo in Austin."
    )


def test_missing_first_name_reads_naturally():
    assert render("Hi {first_name}!", TemplateContext({"first_name": None})) == "Hi there!"


def test_literal_braces_survive():
    assert (
        render("{{not a field}} {first_name}", TemplateContext(CONTRACTOR)) == "{not a field} Sam"
    )


@pytest.mark.parametrize(
    "template",
    [
        "Hi {phone}",
        "Hi {first_name.__class__}",
        "Hi {0}",
        "Hi {first_name:>99999}",
        "Hi {first_name!r}",
        "Hi {first_name",
        "Hi }",
    ],
)
def test_refuses_what_it_cannot_render_safely(template):
    with pytest.raises(TemplateError):
        placeholders(template)


def test_check_template_needs_the_referenced_rows():
    check_template("Hi {first_name}", has_action_item=False, has_event=False)
    with pytest.raises(TemplateError, match="action_item_id"):
        check_template("About {action_item}", has_action_item=False, has_event=False)
    with pytest.raises(TemplateError, match="event_id"):
        check_template("See you at {event_name}", has_action_item=True, has_event=False)
