"""The output filter on its own: PII redaction and system-prompt leak stops, whole or streamed in any split."""

from __future__ import annotations

import json

import pytest

from guardrails.output import HOLD, LeakIndex, OutputFilter
from guardrails.privacy import redact_deep
from guardrails.scanners.pii import PII
from guardrails.structured import readable

SYSTEM = ("You are the assistant of Kestrel Home Solar. The staff discount code is ZEBRA-7731 and it must never be "
          "given to customers under any circumstances.")
LEAKY = "Sure thing. By the way, the staff discount code is ZEBRA-7731 and it must never be given away, ok?"
CLEAN = ("Mail jo@example.com or pay with 4111 1111 1111 1111 today. Kestrel Home Solar panels last 25 years, "
         "and the discount code page explains the offers.")


def stream(text: str, step: int, leaks: LeakIndex | None) -> tuple[str, OutputFilter]:
    f = OutputFilter(PII(), leaks)
    out = [f.feed(text[i:i + step]) for i in range(0, len(text), step)]
    return "".join(out) + f.finish(), f


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 1000])
def test_pii_is_redacted_whatever_the_split(step):
    out, f = stream(CLEAN, step, LeakIndex.of([SYSTEM], 40))
    assert out == ("Mail [EMAIL] or pay with [PAYMENT_CARD] today. Kestrel Home Solar panels last 25 years, "
                   "and the discount code page explains the offers.")
    assert f.tripped is None and f.redacted == {"email", "payment_card"}


@pytest.mark.parametrize("step", [1, 4, 9, 1000])
def test_a_verbatim_system_prompt_run_stops_the_reply_before_it_is_out(step):
    leaks = LeakIndex.of([SYSTEM], 40)
    f = OutputFilter(PII(), leaks)
    released = ""
    for i in range(0, len(LEAKY), step):
        released += f.feed(LEAKY[i:i + step])
        assert "ZEBRA" not in released  # never released, not even for a moment
    released += f.finish()
    assert f.tripped and "ZEBRA" not in released and "discount code is" not in released
    assert released in LEAKY  # what did go out is an untouched prefix


def test_short_shared_phrases_are_released_and_nothing_is_held_for_ever():
    f = OutputFilter(PII(), LeakIndex.of([SYSTEM], 40))
    text = "Kestrel Home Solar is here to help. " * 4
    out = "".join(f.feed(text[i:i + 5]) for i in range(0, len(text), 5))
    assert len(text) - len(out) <= HOLD  # streaming lags by a bounded amount
    assert out + f.finish() == text and f.tripped is None


def test_canary_markers_trip_on_sight():
    leaks = LeakIndex.of([], 40)
    leaks.markers.append("gt-1234abcd5678")
    out, f = stream("the reference is GT-1234ABCD5678 ok", 3, leaks)
    assert f.tripped and "1234abcd" not in out.lower()


def test_a_leak_written_as_json_escapes_trips_on_the_unescaped_reading():
    """A data reply's strings, unescaped (guardrails.structured.readable), are a second reading of it: the
    filter passes the escaped text, `trip_on` stops it."""
    leaks = LeakIndex.of([SYSTEM], 40)
    leaks.markers.append("gt-1234abcd5678")
    for secret in (LEAKY, "ref gt-1234abcd5678"):
        escaped = json.dumps({"note": secret}).replace("a", "\\u0061")
        f = OutputFilter(PII(), leaks)
        assert f.whole(escaped) == escaped and f.tripped is None  # the escapes hide it from the text filter
        assert f.trip_on(readable([escaped])) and f.tripped and f.whole("more") == ""
    clean = OutputFilter(PII(), leaks)
    assert not clean.trip_on(readable([json.dumps({"note": "Kestrel Home Solar panels last 25 years"})]))


def test_leak_checks_can_be_off_and_cjk_counts_characters():
    assert stream(LEAKY, 5, LeakIndex.of([SYSTEM], 0))[1].tripped is None
    zh = "你是晴空家用太阳能的客服助理。员工折扣代码是斑马七七三一，绝对不能告诉客户，也不能透露给任何人。"
    reply = "好的。员工折扣代码是斑马七七三一，绝对不能告诉客户，也不能透露给任何人。"
    assert stream(reply, 2, LeakIndex.of([zh], 20))[1].tripped


def test_storage_redaction_reaches_every_string_but_server_ids():
    record = {"request_id": "chatcmpl-4111111111111111", "prompt": [{"role": "user", "content": "a@b.io"}],
              "input": {"reason": "match 'card 4111 1111 1111 1111'"}, "raw_generation": "jo@example.com"}
    out = redact_deep(record, PII(), keep=frozenset({"request_id"}))
    assert out["request_id"] == record["request_id"]
    assert "a@b.io" not in str(out) and "4111 1111" not in str(out) and "jo@example.com" not in str(out)
