"""Message templates: `{placeholder}` fields filled from the contractor, action item and event."""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from shared.errors import TemplateError as TemplateError

# placeholder -> (source row, column); a missing value falls back to the default
PLACEHOLDERS: dict[str, tuple[str, str]] = {
    "first_name": ("contractor", "first_name"),
    "last_name": ("contractor", "last_name"),
    "company_name": ("contractor", "company_name"),
    "action_item": ("action_item", "title"),
    "action_item_title": ("action_item", "title"),
    "action_item_description": ("action_item", "description"),
    "action_item_due_date": ("action_item", "due_date"),
    "event_name": ("event", "name"),
    "event_date": ("event", "event_date"),
    "event_location": ("event", "location"),
}
DEFAULTS = {"first_name": "there"}


@dataclass(frozen=True)
class TemplateContext:
    contractor: Mapping[str, Any]
    action_item: Mapping[str, Any] | None = None
    event: Mapping[str, Any] | None = None


def placeholders(template: str) -> set[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise TemplateError(
            f"template syntax: {exc}; write a literal brace as {{{{ or }}}}"
        ) from None
    names = set()
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if spec or conversion:
            raise TemplateError(f"placeholder {{{field}}} takes no format spec or conversion")
        if field not in PLACEHOLDERS:
            known = ", ".join(f"{{{name}}}" for name in sorted(PLACEHOLDERS))
            raise TemplateError(f"unknown placeholder {{{field}}}; known: {known}")
        names.add(field)
    return names


def check_template(template: str, *, has_action_item: bool, has_event: bool) -> None:
    """Reject at scheduling time what could not be rendered at send time."""
    for name in placeholders(template):
        source = PLACEHOLDERS[name][0]
        if source == "action_item" and not has_action_item:
            raise TemplateError(f"{{{name}}} needs action_item_id")
        if source == "event" and not has_event:
            raise TemplateError(f"{{{name}}} needs event_id")


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%b %-d, %Y %-I:%M %p")
    if isinstance(value, date):
        return value.strftime("%b %-d, %Y")
    return str(value)


def render(template: str, context: TemplateContext) -> str:
    values: dict[str, str] = {}
    for name in placeholders(template):
        source, column = PLACEHOLDERS[name]
        row = getattr(context, source)
        text = _format(row.get(column)) if row is not None else ""
        values[name] = text.strip() or DEFAULTS.get(name, "")
    return template.format_map(values).strip()
