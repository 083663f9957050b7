"""The output guard: an LLM reply becomes the SMS only if it is short, not
empty, and brings no link, phone number, placeholder or prompt text the template didn't have."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import phonenumbers

from services.personalizer.prompt import PROMPT_MARKERS

MAX_CHARS = 320

_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "«": "»"}
# What IDNA reads as a label separator and NFKC leaves as it is (U+FF0E and U+FF61 NFKC maps).
_DOTS = str.maketrans({"\u3002": "."})
_URLS = (
    re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE),
    re.compile(r"\bwww\.\S+", re.IGNORECASE),
    # A bare domain in any script, such as evil.example, bit.ly/x, еvil.com with a Cyrillic е,
    # münchen.de (also the domain of an email address): labels of letters, digits and hyphens,
    # the last one starting with a letter and at least two long, so "e.g." and "3.50" are not.
    re.compile(r"(?:[\w-]+\.)+[^\W\d_][\w-]*[^\W_](?:/\S*)?"),
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


# Control, format (zero-width, bidi embeddings and isolates, soft hyphen, word joiner,
# invisible operators, BOM, tag characters), private-use, unassigned and surrogate code points,
# and line and paragraph separators: nothing a reader sees, and each can hide a link from a
# pattern by splitting it.
_INVISIBLE = frozenset({"Cc", "Cf", "Co", "Cn", "Cs", "Zl", "Zp"})


def normalise(reply: str) -> str:
    """NFKC (full-width and other compatibility forms become plain ones, so `evil．com` is
    `evil.com`), without invisible characters and the quotes around the reply."""
    text = unicodedata.normalize("NFKC", reply.replace("\r\n", "\n"))
    text = "".join(
        ch for ch in text if ch == "\n" or unicodedata.category(ch) not in _INVISIBLE
    ).strip()
    while len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def _link_view(text: str) -> str:
    """What links are looked for in: normalised, ideographic full stops read as dots, and
    combining marks left out, so that no mark between two letters splits a domain."""
    marks_out = "".join(
        ch for ch in normalise(text) if not unicodedata.category(ch).startswith("M")
    )
    return marks_out.translate(_DOTS).lower()


def urls(text: str) -> set[str]:
    view = _link_view(text)
    return {m.group(0).rstrip(".,;:!?)'\"") for p in _URLS for m in p.finditer(view)}


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
    template_links = _link_view(template)
    if any(url not in template_links for url in urls(text)):
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
