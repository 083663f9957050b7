"""The output guard (DESIGN invariant 8): an LLM reply becomes the SMS only if it is short, not
empty, and brings no link, phone number, placeholder or prompt text the template didn't have."""

from __future__ import annotations

import re
from dataclasses import dataclass

import phonenumbers

from services.personalizer.prompt import PROMPT_MARKERS

MAX_CHARS = 320

_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2064\ufeff]")
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "«": "»"}
_URLS = (
    re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE),
    re.compile(r"\bwww\.\S+", re.IGNORECASE),
    # a bare domain such as evil.example or bit.ly/x (also the domain of an email address)
    re.compile(r"\b(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z]{2,24}\b(?:/\S*)?", re.IGNORECASE),
)
_DIGIT_RUN = re.compile(r"\d{7,}")
_PLACEHOLDERS = (
    re.compile(r"\{[^{}\n]{0,40}\}|\{\{|\}\}"),
    re.compile(r"\[[^\[\]\n]{1,40}\]"),
    re.compile(r"<[A-Za-z_ ]{1,40}>"),
)


@dataclass(frozen=True)
class Verdict:
    text: str  # the reply, normalised
    rule: str | None  # the rule it broke; None: fit to send

    @property
    def ok(self) -> bool:
        return self.rule is None


def normalise(reply: str) -> str:
    text = _CONTROL.sub("", reply.replace("\r\n", "\n")).strip()
    while len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def urls(text: str) -> set[str]:
    return {m.group(0).lower().rstrip(".,;:!?)'\"") for p in _URLS for m in p.finditer(text)}


def phone_numbers(text: str) -> set[str]:
    """Digits of everything that could be a phone number (lenient on purpose)."""
    found = {
        re.sub(r"\D", "", match.raw_string)
        for match in phonenumbers.PhoneNumberMatcher(
            text, "US", leniency=phonenumbers.Leniency.POSSIBLE
        )
    }
    found.update(_DIGIT_RUN.findall(text))
    return found


def _known_number(digits: str, allowed: set[str]) -> bool:
    # +1 415 555 2671 in the reply is the same number as (415) 555-2671 in the template
    return any(digits.endswith(a) or a.endswith(digits) for a in allowed)


def check(reply: str | None, template: str) -> Verdict:
    """`template` is the rendered template: what it contains, the reply may repeat."""
    text = normalise(reply or "")
    if not text:
        return Verdict(text, "empty")
    if len(text) > MAX_CHARS:
        return Verdict(text, "too_long")
    lowered = template.lower()
    if any(url not in lowered for url in urls(text)):
        return Verdict(text, "url")
    allowed = phone_numbers(template)
    if any(not _known_number(number, allowed) for number in phone_numbers(text)):
        return Verdict(text, "phone")
    if any(m.lower() in text.lower() and m.lower() not in lowered for m in PROMPT_MARKERS):
        return Verdict(text, "prompt_echo")
    for pattern in _PLACEHOLDERS:
        if any(m.group(0) not in template for m in pattern.finditer(text)):
            return Verdict(text, "placeholder")
    return Verdict(text, None)
