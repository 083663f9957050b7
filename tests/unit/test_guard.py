"""The output guard: what an LLM reply must be to go out instead of the template."""

from __future__ import annotations

import pytest

from services.personalizer.guard import MAX_CHARS, check

TEMPLATE = "Hi Sam, a reminder to send the W-9 before Friday."


def test_a_plain_rewrite_passes():
    verdict = check("Hey Sam! Could you send over the W-9 before Friday? Thanks!", TEMPLATE)
    assert verdict.ok
    assert verdict.text == "Hey Sam! Could you send over the W-9 before Friday? Thanks!"


@pytest.mark.parametrize(
    "reply",
    [
        "Sam, your W-9 is due Dec 4, 2026 at 3:00 PM, e.g. by email. See you at 9 a.m.",
        "The expo is on 2026-12-14, booth 12-345; the fee is $1,250.00.",
        "Hi Sam,\nquick reminder: the W-9, please.",
    ],
)
def test_dates_amounts_and_line_breaks_are_not_mistaken_for_links_or_numbers(reply):
    assert check(reply, TEMPLATE).ok, check(reply, TEMPLATE).rule


@pytest.mark.parametrize(
    ("reply", "text"),
    [
        ('"Hi Sam, send the W-9?"', "Hi Sam, send the W-9?"),
        ("  “Hi Sam.”  ", "Hi Sam."),
        ("Hi\x00 Sam\u200b.", "Hi Sam."),
    ],
)
def test_quotes_around_the_reply_and_control_characters_are_removed(reply, text):
    verdict = check(reply, TEMPLATE)
    assert verdict.ok
    assert verdict.text == text


@pytest.mark.parametrize("reply", [None, "", "   ", '""', "\n\t"])
def test_empty(reply):
    assert check(reply, TEMPLATE).rule == "empty"


def test_length_limit():
    assert check("a" * MAX_CHARS, TEMPLATE).ok
    assert check("a" * (MAX_CHARS + 1), TEMPLATE).rule == "too_long"
    assert check("Hi Sam. " * 250, TEMPLATE).rule == "too_long"


@pytest.mark.parametrize(
    "reply",
    [
        "Upload it at http://evil.example/w9 please",
        "Upload it at HTTPS://EVIL.EXAMPLE",
        "Go to www.evil.example now",
        "Upload it at evil.example/upload",
        "Short link: bit.ly/3xYz",
        "Email it to sam@evil.example",
        "ftp://files.example/w9",
    ],
)
def test_a_link_the_template_lacks_is_refused(reply):
    assert check(reply, TEMPLATE).rule == "url"


def test_a_link_from_the_template_may_stay():
    template = "Hi Sam, upload the W-9 at https://portal.example.com/w9."
    assert check("Sam, please upload your W-9 at https://portal.example.com/w9 today!", template).ok
    assert check("Sam, upload it at https://portal.example.com/other", template).rule == "url"


@pytest.mark.parametrize(
    "reply",
    [
        "Call me at 415-555-2671",
        "Call +1 (415) 555 2671",
        "Text 4155552671",
        "Call 555 1234",
        "Call +44 20 7946 0958",
        "Ref 98765432",
    ],
)
def test_a_phone_number_the_template_lacks_is_refused(reply):
    assert check(reply, TEMPLATE).rule == "phone"


def test_the_templates_phone_number_may_stay_in_another_format():
    template = "Hi Sam, questions? Call (415) 555-2671."
    assert check("Sam, any questions, call us at +1 415-555-2671!", template).ok
    assert check("Sam, call 415-555-9999 instead", template).rule == "phone"


@pytest.mark.parametrize(
    "reply",
    [
        "Hi {first_name}, send the W-9",
        "Hi Sam, send the W-9. Best, [Your Name]",
        "Hi <first name>, send the W-9",
        "Hi Sam {{",
        "Hi Sam, {}",
    ],
)
def test_leftover_placeholders_are_refused(reply):
    assert check(reply, TEMPLATE).rule == "placeholder"


@pytest.mark.parametrize(
    "reply",
    [
        "<<<DATA>>> Hi Sam",
        "Hi Sam >>> W-9",
        "message_to_rewrite: Hi Sam",
        "Sure! Reply with the text of the SMS and nothing else.",
        "Your context_hints say you prefer mornings",
    ],
)
def test_prompt_text_in_the_reply_is_refused(reply):
    assert check(reply, TEMPLATE).rule == "prompt_echo"
