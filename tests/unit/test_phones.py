"""Phone numbers are checked with libphonenumber (valid, not just possible) and sent as E.164."""

from __future__ import annotations

import pytest

from shared.phones import InvalidPhone, to_e164


@pytest.mark.parametrize(
    ("raw", "e164"),
    [
        ("+14155552671", "+14155552671"),
        ("(415) 555-2671", "+14155552671"),
        ("415.555.2671", "+14155552671"),
        ("1 415 555 2671", "+14155552671"),
        ("  +1 (415) 555-2671  ", "+14155552671"),
        ("+1 212 555 0123", "+12125550123"),
        ("+44 20 7946 0958", "+442079460958"),
        ("+44 7911 123456", "+447911123456"),
        ("+33 6 12 34 56 78", "+33612345678"),
        ("+49 30 901820", "+4930901820"),
        ("+81 90-1234-5678", "+819012345678"),
        ("+91 98765 43210", "+919876543210"),
        ("+61 412 345 678", "+61412345678"),
        ("+52 55 1234 5678", "+525512345678"),
    ],
)
def test_valid_numbers_are_normalised_to_e164(raw, e164):
    assert to_e164(raw) == e164


def test_a_national_number_is_read_in_the_default_region():
    assert to_e164("020 7946 0958", default_region="GB") == "+442079460958"


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        # +1 200 is a possible length but no area code 200 exists: valid, not just possible.
        ("+12005550100", "not a valid phone number"),
        ("+1200", "not a valid phone number"),
        ("+1415555267", "not a valid phone number"),
        ("555-2671", "not a valid phone number"),
        ("+1234567890123456", "not a valid phone number"),
        ("1234567890123456", "not a valid phone number"),
        ("+14155552671234567", "not a valid phone number"),
        ("+0123456789", "unparseable"),
        ("+999999999999", "unparseable"),
        ("+", "unparseable"),
        ("call me", "letters"),
        ("+1415555267a", "letters"),
        ("415-555-CALL", "letters"),
        ("1-800-FLOWERS", "letters"),
        ("+1 415 555 2671 ext. 12", "letters"),
        ("+1 415 555 2671 #12", "extension"),
        ("١٢٣٤٥٦٧٨٩٠", "non-ASCII"),  # Arabic-Indic digits
        ("+١٤١٥٥٥٥٢٦٧١", "non-ASCII"),
        ("۴۱۵۵۵۵۲۶۷۱", "non-ASCII"),  # Extended Arabic-Indic (Persian) digits
        ("４１５５５５２６７１", "non-ASCII"),  # fullwidth digits
        ("+1\u00a0415\u00a0555\u00a02671", "non-ASCII"),  # no-break spaces
        ("", "missing"),
        ("   ", "missing"),
        (None, "missing"),
        ("+1 415 555 2671" + "1" * 300, "unparseable"),
    ],
)
def test_invalid_numbers_are_refused_without_echoing_them(raw, says):
    with pytest.raises(InvalidPhone, match=says) as refused:
        to_e164(raw)
    digits = "".join(c for c in raw or "" if c.isdigit())
    if len(digits) >= 4:
        assert digits not in str(refused.value)
