"""Occurrences of schedules: pure functions, clock given as arguments."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from cronsim import CronSim
from hypothesis import given, settings
from hypothesis import strategies as st

from app.model import InvalidInput
from app.recurrence import (
    MAX_PER_CALL,
    Definition,
    check_name,
    every_text,
    occurrence_uuid,
    occurrences,
    parse_every,
    plan,
    previous,
    validate,
)

BERLIN = ZoneInfo("Europe/Berlin")
H = 30_000


def ms(text: str) -> int:
    """An instant written as ISO 8601 with its offset."""
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def iso(at: int, tz=BERLIN) -> str:
    return datetime.fromtimestamp(at / 1000, tz).isoformat()


def cron(expr: str, tz: str = "Europe/Berlin", **kw) -> Definition:
    return Definition(message="m", cron=expr, timezone=tz, **kw)


def listed(d: Definition, after: str, until: str, created: int = 0) -> list[str]:
    return [iso(at) for at in occurrences(d, created, ms(after), ms(until), 100)]


# --- daylight saving, Europe/Berlin 2026: spring forward 29 March 02:00 -> 03:00, fall back
# 25 October 03:00 -> 02:00 ------------------------------------------------------------------


def test_a_fixed_time_the_clocks_skip_runs_once_at_the_first_valid_time_after_the_gap():
    days = listed(cron("30 2 * * *"), "2026-03-27T12:00+01:00", "2026-03-31T12:00+02:00")
    assert days == [
        "2026-03-28T02:30:00+01:00",
        "2026-03-29T03:00:00+02:00",  # 02:30 does not exist that night
        "2026-03-30T02:30:00+02:00",
        "2026-03-31T02:30:00+02:00",
    ]


def test_a_fixed_time_that_occurs_twice_runs_once_at_its_first_occurrence():
    days = listed(cron("30 2 * * *"), "2026-10-23T12:00+02:00", "2026-10-27T12:00+01:00")
    assert days == [
        "2026-10-24T02:30:00+02:00",
        "2026-10-25T02:30:00+02:00",  # 02:30 CEST, not again at 02:30 CET
        "2026-10-26T02:30:00+01:00",
        "2026-10-27T02:30:00+01:00",
    ]


def test_an_hourly_expression_keeps_elapsed_time_through_spring_forward():
    hours = listed(cron("0 * * * *"), "2026-03-29T00:30+01:00", "2026-03-29T04:30+02:00")
    assert hours == [
        "2026-03-29T01:00:00+01:00",
        "2026-03-29T03:00:00+02:00",  # one real hour after 01:00
        "2026-03-29T04:00:00+02:00",
    ]


def test_an_every_30_minutes_expression_runs_in_both_copies_of_the_repeated_hour():
    quarters = listed(cron("*/30 * * * *"), "2026-10-25T01:45+02:00", "2026-10-25T03:00+01:00")
    assert quarters == [
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:30:00+02:00",
        "2026-10-25T02:00:00+01:00",
        "2026-10-25T02:30:00+01:00",
        "2026-10-25T03:00:00+01:00",
    ]


def test_an_interval_ignores_daylight_saving():
    d = Definition(message="m", every_ms=3_600_000, start_at=ms("2026-03-29T00:00+01:00"))
    got = listed(d, "2026-03-28T23:59+01:00", "2026-03-29T04:00+02:00")
    assert got == [
        "2026-03-29T00:00:00+01:00",
        "2026-03-29T01:00:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-03-29T04:00:00+02:00",
    ]


# --- bounds, intervals ------------------------------------------------------------------------


def test_start_and_end_bound_the_occurrences_inclusively():
    d = cron(
        "0 12 * * *",
        "UTC",
        start_at=ms("2026-01-02T12:00+00:00"),
        end_at=ms("2026-01-04T12:00+00:00"),
    )
    got = listed(d, "2026-01-01T00:00+00:00", "2026-01-10T00:00+00:00")
    assert [g[:10] for g in got] == ["2026-01-02", "2026-01-03", "2026-01-04"]


def test_an_interval_without_start_counts_from_when_it_was_stored():
    created = ms("2026-01-01T00:00:00.250+00:00")
    d = Definition(message="m", every_ms=90_000)
    got = list(occurrences(d, created, created, created + 300_000, 10))
    assert got == [created + 90_000, created + 180_000, created + 270_000]


def test_occurrences_are_strictly_after_the_given_instant():
    d = cron("* * * * *", "UTC")
    at = ms("2026-01-01T12:00+00:00")
    assert next(iter(occurrences(d, 0, at, at + 120_000, 5))) == at + 60_000
    assert next(iter(occurrences(d, 0, at - 1, at + 120_000, 5))) == at


def test_previous_lists_the_newest_first_and_not_before_the_generation():
    d = cron("*/10 * * * *", "UTC")
    created = ms("2026-01-01T11:55+00:00")
    got = previous(d, created, ms("2026-01-01T12:30+00:00"), 10)
    assert [iso(g, UTC)[11:16] for g in got] == ["12:30", "12:20", "12:10", "12:00"]


# --- the plan of one leader pass, and the catch-up rule ---------------------------------------

SECOND = Definition(message="m", every_ms=1000, start_at=0)


def test_a_pass_produces_every_occurrence_within_the_horizon_and_records_the_last():
    p = plan(SECOND, 0, 10_000, 10_500, H, "latest")
    assert p.produce == list(range(11_000, 40_001, 1000))
    assert p.through == 40_000
    assert p.skipped == 0


def test_a_pass_after_a_long_gap_produces_only_the_latest_missed_by_default():
    # Last materialised at 10 s; the leader is back at 100 s: 11..69 s were missed.
    p = plan(SECOND, 0, 10_000, 100_000, H, "latest")
    assert p.produce[0] == 69_000
    assert p.produce[1:] == list(range(70_000, 130_001, 1000))
    assert p.skipped == 58


def test_catchup_all_produces_every_missed_occurrence():
    p = plan(SECOND, 0, 10_000, 100_000, H, "all")
    assert p.produce == list(range(11_000, 130_001, 1000))
    assert p.skipped == 0


def test_catchup_none_produces_no_missed_occurrence():
    p = plan(SECOND, 0, 10_000, 100_000, H, "none")
    assert p.produce == list(range(70_000, 130_001, 1000))
    assert p.skipped == 59


def test_an_occurrence_due_less_than_the_horizon_ago_is_late_not_missed():
    p = plan(SECOND, 0, 10_000, 20_000, H, "none")
    assert p.produce[0] == 11_000


def test_catchup_all_after_a_very_long_gap_continues_on_the_next_pass():
    first = plan(SECOND, 0, 0, 10_000_000, H, "all")
    assert len(first.produce) == MAX_PER_CALL
    second = plan(SECOND, 0, first.through, 10_000_000, H, "all")
    assert second.produce[0] == first.through + 1000


def test_a_pass_with_nothing_in_the_horizon_produces_nothing_and_keeps_its_progress():
    d = cron("0 0 1 1 *", "UTC")
    p = plan(d, 0, ms("2026-01-01T00:00+00:00"), ms("2026-06-01T00:00+00:00"), H, "latest")
    assert p.produce == []


# --- validation -----------------------------------------------------------------------------


def test_every_reads_units_and_refuses_below_the_floor():
    assert parse_every("90s", 1000) == 90_000
    assert parse_every("5m", 1000) == 300_000
    assert parse_every("1h", 1000) == 3_600_000
    assert parse_every("1500ms", 1000) == 1500
    with pytest.raises(InvalidInput) as below:
        parse_every("500ms", 1000)
    assert below.value.field == "every"
    for bad in ("", "5", "1.5s", "s", "-1s", "1 s", "1w"):
        with pytest.raises(InvalidInput):
            parse_every(bad, 1000)
    assert every_text(90_000) == "90s" and every_text(3_600_000) == "1h"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"cron": "61 * * * *"}, "cron"),
        ({"cron": "* * * *"}, "cron"),
        ({"cron": "0 0 * * * *"}, "cron"),
        ({"cron": "0 0 30 2 *"}, "cron"),
        ({"cron": "* * * * *", "timezone": "Mars/Olympus"}, "timezone"),
        ({"cron": "* * * * *", "timezone": "../../etc/passwd"}, "timezone"),
        ({"every": "100ms"}, "every"),
        ({"every": "5m", "start_at": 10, "end_at": 5}, "endAt"),
        ({"every": "5m", "start_at": -1}, "startAt"),
        ({"every": "5m", "cron": "* * * * *"}, "every"),
        ({}, "cron"),
    ],
)
def test_a_bad_definition_names_its_field(fields, field):
    args = {
        "message": "m",
        "cron": None,
        "every": None,
        "timezone": None,
        "start_at": None,
        "end_at": None,
        "paused": False,
        "max_message_bytes": 10,
        "min_interval_ms": 1000,
    }
    with pytest.raises(InvalidInput) as exc:
        validate(**{**args, **fields})
    assert exc.value.field == field


def test_an_oversize_message_is_refused_with_413():
    with pytest.raises(InvalidInput) as exc:
        validate(
            message="x" * 11,
            cron="* * * * *",
            every=None,
            timezone=None,
            start_at=None,
            end_at=None,
            paused=False,
            max_message_bytes=10,
            min_interval_ms=1000,
        )
    assert (exc.value.field, exc.value.status) == ("message", 413)


def test_names_are_a_restricted_charset_with_a_length_cap():
    assert check_name("daily-report.eu:1") == "daily-report.eu:1"
    for bad in ("", "-x", "a b", "a/b", "ü", "x" * 129, "a?b"):
        with pytest.raises(InvalidInput):
            check_name(bad)


def test_cron_whitespace_is_normalised_so_the_same_schedule_stores_the_same_bytes():
    def one(expr):
        return validate(
            message="m",
            cron=expr,
            every=None,
            timezone=None,
            start_at=None,
            end_at=None,
            paused=False,
            max_message_bytes=10,
            min_interval_ms=1000,
        )

    assert one("*/5  *  * * *") == one("*/5 * * * *")


def test_an_occurrence_uuid_depends_on_name_generation_and_instant_only():
    a = occurrence_uuid("n", 1, 1000)
    assert a == occurrence_uuid("n", 1, 1000)
    assert len({a, occurrence_uuid("n", 2, 1000), occurrence_uuid("m", 1, 1000)}) == 3
    assert a != occurrence_uuid("n", 1, 1001)


# --- property: against the library -----------------------------------------------------------

MINUTE = st.one_of(
    st.just("*"), st.integers(0, 59).map(str), st.integers(1, 30).map(lambda n: f"*/{n}")
)
HOUR = st.one_of(st.just("*"), st.integers(0, 23).map(str), st.sampled_from(["1-5", "2,3", "*/6"]))
DOM = st.one_of(st.just("*"), st.integers(1, 28).map(str), st.just("1,15"))
MONTH = st.one_of(st.just("*"), st.integers(1, 12).map(str), st.just("3,10"))
DOW = st.one_of(st.just("*"), st.integers(0, 6).map(str), st.just("1-5"))
ZONES = st.sampled_from(
    ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]
)
EXPRESSIONS = st.tuples(MINUTE, HOUR, DOM, MONTH, DOW).map(" ".join)
START = ms("2024-01-01T00:00+00:00")
INSTANTS = st.integers(START, START + 3 * 365 * 86_400_000)


@settings(max_examples=150, deadline=None)
@given(
    EXPRESSIONS,
    ZONES,
    INSTANTS,
    st.integers(1, 40 * 86_400_000),
    st.lists(st.integers(0, 10**9), max_size=4),
)
def test_occurrences_match_cronsim_and_do_not_depend_on_how_the_range_is_split(
    expr, tz, after, span, cuts
):
    d = cron(expr, tz)
    until = after + span
    got = list(occurrences(d, 0, after, until, 50))
    # The library itself, walked from the same instant.
    expected = []
    for when in CronSim(expr, datetime.fromtimestamp(after / 1000, ZoneInfo(tz))):
        at = int(when.timestamp() * 1000)
        if at > until or len(expected) == 50:
            break
        if at > after:
            expected.append(at)
    assert got == expected
    assert got == sorted(set(got))
    # A leader materialises in passes, each starting after the last it recorded: any
    # split of the range yields the same list as one pass.
    bounds = sorted({after + c % span for c in cuts} | {until})
    pieces, last = [], after
    for bound in bounds:
        pieces += list(occurrences(d, 0, last, bound, 50))
        last = bound
    assert pieces[: len(got)] == got


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1000, 7 * 86_400_000),
    st.integers(0, 10**12),
    st.integers(0, 10**7),
    st.integers(0, 10**8),
    st.sampled_from(["latest", "all", "none"]),
)
def test_passes_never_produce_an_occurrence_twice_nor_an_unknown_one(
    every, created, gap, step, catchup
):
    d = Definition(message="m", every_ms=every)
    last, now, produced = created, created, []
    for _ in range(5):
        p = plan(d, created, last, now, H, catchup)
        produced += p.produce
        assert p.through >= last
        last = p.through
        now += step
    assert produced == sorted(set(produced))
    assert all((at - created) % every == 0 and at > created for at in produced)
