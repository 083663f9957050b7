"""Phone numbers: validated with libphonenumber and normalised to E.164 before any send."""

from __future__ import annotations

import phonenumbers

from shared.errors import InvalidPhone as InvalidPhone


def to_e164(raw: str | None, default_region: str = "US") -> str:
    if raw is None or not raw.strip():
        raise InvalidPhone("missing phone number")
    if not raw.isascii():
        raise InvalidPhone("phone number has non-ASCII characters")
    # libphonenumber reads letters as a keypad word (1-800-FLOWERS) or an extension; a stored
    # number with letters is a data error, not something to guess a recipient from.
    if any(ch.isalpha() for ch in raw):
        raise InvalidPhone("phone number has letters; store digits only, in E.164 form")
    try:
        parsed = phonenumbers.parse(raw, default_region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidPhone(f"unparseable phone number (code {exc.error_type})") from None
    if not phonenumbers.is_valid_number(parsed):
        raise InvalidPhone("not a valid phone number for its region")
    if parsed.extension:
        raise InvalidPhone("phone number has an extension, which an SMS cannot reach")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def _parse_international(e164: str) -> phonenumbers.PhoneNumber:
    try:
        return phonenumbers.parse(e164, None)
    except phonenumbers.NumberParseException as exc:
        raise InvalidPhone(f"unparseable phone number (code {exc.error_type})") from None


def check_e164(value: str) -> str:
    """A sender's number in E.164 form that libphonenumber can read (its country code exists).
    The pattern alone lets through numbers such as +999123456, which no lookup can use."""
    _parse_international(value)
    return value


def match_digits(e164: str) -> tuple[str, str]:
    """The digits a stored number may have, with or without its country code, so that a reply
    from +12125550199 finds a contractor stored as (212) 555-0199."""
    parsed = _parse_international(e164)
    national = phonenumbers.national_significant_number(parsed)
    return f"{parsed.country_code}{national}", national
