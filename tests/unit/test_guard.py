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


# Each hides evil.com (or another domain the template lacks) from a pattern that reads ASCII
# only, or from one that stops at the first character it doesn't expect.
LOOK_ALIKES = {
    "cyrillic e": "Upload it at \u0435vil.com today",
    "cyrillic o in a known domain": "Upload it at portal.ex\u0430mple.com/w9",
    "full-width dot": "Upload it at evil\uff0ecom today",
    "full-width letters": "Upload it at \uff45\uff56\uff49\uff4c.com",
    "ideographic full stop": "Upload it at evil\u3002com today",
    "halfwidth ideographic full stop": "Upload it at evil\uff61com today",
    "small full stop": "Upload it at evil\ufe52com today",
    "one dot leader": "Upload it at evil\u2024com today",
    "IDN domain": "Upload it at m\u00fcnchen-steuer.de",
    "IDN top-level domain": "Upload it at \u043f\u0440\u0438\u043c\u0435\u0440.\u0440\u0444",
    "CJK domain": "Upload it at \u4f8b\u3048.\u30c6\u30b9\u30c8",
    "punycode": "Upload it at xn--mnchen-3ya.de",
    "combining mark inside a label": "Upload it at evix\u0323.com",
    "soft hyphen": "Upload it at evil\u00ad.com",
    "private-use character": "Upload it at evil\ue000.com",
    "line separator": "Upload it at evil\u2028.com",
    **{
        f"U+{code:04X}": f"Upload it at evil{chr(code)}.com today"
        for code in (
            *range(0x200B, 0x2010),
            *range(0x2060, 0x2065),
            0xFEFF,
            *range(0x2066, 0x206A),
            *range(0x202A, 0x202F),
        )
    },
    "tag characters": "Upload it at evil\U000e0020\U000e0041.com today",
    "last tag character": "Upload it at evil\U000e007f.com today",
}


@pytest.mark.parametrize("reply", LOOK_ALIKES.values(), ids=LOOK_ALIKES.keys())
def test_a_look_alike_link_is_refused(reply):
    template = "Hi Sam, upload the W-9 at https://portal.example.com/w9."
    assert check(reply, template).rule == "url"


@pytest.mark.parametrize(
    "invisible", ["\u200b", "\u200d", "\u2066", "\u202e", "\u00ad", "\ufeff", "\U000e0041"]
)
def test_invisible_characters_never_reach_the_sms(invisible):
    verdict = check(f"Hi Sam{invisible}, please send the W-9.", TEMPLATE)
    assert verdict.ok
    assert verdict.text == "Hi Sam, please send the W-9."


def test_compatibility_forms_are_sent_in_their_plain_form():
    verdict = check("Hi Ｓａｍ, please send the W\uff0d9\uff01", TEMPLATE)
    assert verdict.ok
    assert verdict.text == "Hi Sam, please send the W-9!"


def test_a_look_alike_phone_number_is_refused():
    assert check("Call \uff14\uff11\uff15-555-2671", TEMPLATE).rule == "phone"


def test_a_domain_of_the_template_may_stay_in_any_script_and_form():
    template = "Hallo Sam, die Unterlagen bitte an münchen.de/formulare senden."
    assert check("Sam, bitte die Unterlagen über münchen.de/formulare senden!", template).ok
    assert check("Sam, bitte über MÜNCHEN．DE/formulare!", template).ok
    assert check("Sam, bitte über münchen.de/andere senden", template).rule == "url"


@pytest.mark.parametrize(
    "reply",
    [
        "Hi Sam, see you at 9 a.m. — bring the W-9, e.g. a printout.",
        "Hi Sam, the fee is 3.50 or 1,250.00 in total.",
        "Samさん、W-9を金曜日までに送ってください。",
        "Привет, Сэм. Пришлите W-9 до пятницы.",
        "Hi Sam! 👍🏽 Please send the W-9.",
    ],
)
def test_sentences_in_any_script_are_not_mistaken_for_links(reply):
    assert check(reply, TEMPLATE).ok, check(reply, TEMPLATE).rule


def test_an_ideographic_full_stop_between_words_reads_as_a_dot():
    # The price of catching evil。com: two sentences written without a space after the full
    # stop look like a domain, and the template is sent instead.
    reply = "こんにちは、Samさん。W-9を金曜日までに送ってください。"
    assert check(reply, TEMPLATE).rule == "url"
