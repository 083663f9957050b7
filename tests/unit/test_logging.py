from shared.logging import mask_phone, scrub_personal_data


def test_personal_fields_are_redacted_and_phone_numbers_masked_anywhere():
    event = scrub_personal_data(
        None,
        "info",
        {
            "event": "sent to +14155552671",
            "phone": "+14155552671",
            "message": "Hi Sam",
            "followup_id": 3,
            "at": "2026-11-28T12:00:00Z",
        },
    )
    assert event["phone"] == "[redacted]"
    assert event["message"] == "[redacted]"
    assert "4155552671" not in event["event"]
    assert event["at"] == "2026-11-28T12:00:00Z"
    assert event["followup_id"] == 3


def test_mask_phone_keeps_only_the_last_two_digits():
    assert mask_phone("+14155552671") == "+*********71"
    assert mask_phone(None) == "-"
