"""The dashboard's pure parts: sessions and CSRF tokens, the chart's percentiles, times as
text and as form values, where an action may send the browser, the vendored files."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest

from app import metrics
from app.http.ui import views
from app.http.ui.security import COOKIE, SESSION_S, Sessions, cookie_header
from app.http.ui.source import (
    BadCursor,
    parse_scheduled_cursor,
)
from app.model import InvalidInput
from app.store.history import Minute, parse_minute, quantile

TOKEN = "s3cret-token-0123456789"
VENDOR = Path(__file__).resolve().parents[2] / "app" / "http" / "ui" / "static" / "vendor"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- sessions --------------------------------------------------------------------------------


def test_a_session_cookie_is_valid_until_it_expires() -> None:
    clock = Clock()
    sessions = Sessions(TOKEN, clock)
    cookie = sessions.issue()
    sid = sessions.session_id(cookie)
    assert sid is not None and sid in cookie
    clock.now += SESSION_S - 1
    assert sessions.session_id(cookie) == sid
    clock.now += 1
    assert sessions.session_id(cookie) is None


@pytest.mark.parametrize(
    "tamper",
    [
        lambda c: c[:-1] + ("A" if c[-1] != "A" else "B"),  # the signature
        lambda c: "x" + c,  # the session id
        lambda c: c.replace(".", ".9", 1),  # the expiry
        lambda c: c.rsplit(".", 1)[0],  # no signature
        lambda c: "",
    ],
)
def test_a_session_cookie_changed_in_any_part_is_refused(tamper) -> None:
    sessions = Sessions(TOKEN)
    assert sessions.session_id(tamper(sessions.issue())) is None


def test_changing_the_token_ends_every_session() -> None:
    cookie = Sessions(TOKEN).issue()
    assert Sessions(TOKEN).session_id(cookie) is not None
    assert Sessions(TOKEN + "x").session_id(cookie) is None


def test_a_csrf_token_belongs_to_one_session_and_one_api_token() -> None:
    sessions = Sessions(TOKEN)
    one, two = (sessions.session_id(sessions.issue()) for _ in range(2))
    assert one and two and one != two
    assert sessions.csrf_matches(one, sessions.csrf(one))
    assert not sessions.csrf_matches(one, sessions.csrf(two))
    assert not sessions.csrf_matches(one, "")
    assert not Sessions(TOKEN + "x").csrf_matches(one, sessions.csrf(one))


def test_the_session_cookie_is_secure_http_only_same_site_strict_and_host_only() -> None:
    header = cookie_header("value")
    assert header.startswith(f"{COOKIE}=value;")
    assert COOKIE.startswith("__Host-")  # Secure, Path=/ and no Domain: no subdomain plants it
    attributes = {part.strip() for part in header.split(";")[1:]}
    assert {"Secure", "HttpOnly", "SameSite=Strict", "Path=/"} <= attributes
    assert not any(a.lower().startswith("domain") for a in attributes)


def test_the_token_is_compared_whole() -> None:
    sessions = Sessions(TOKEN)
    assert sessions.token_matches(TOKEN)
    assert not sessions.token_matches(TOKEN[:-1])
    assert not sessions.token_matches("")


# --- percentiles ---------------------------------------------------------------------------


def test_a_quantile_is_interpolated_inside_its_bucket_as_prometheus_does() -> None:
    buckets = ((0.001, 0), (0.002, 10), (0.005, 10), (math.inf, 0))
    assert quantile(buckets, 0.5) == pytest.approx(0.002)
    assert quantile(buckets, 0.25) == pytest.approx(0.0015)
    assert quantile(buckets, 0.75) == pytest.approx(0.0035)


def test_a_quantile_in_the_unbounded_bucket_is_its_lower_bound() -> None:
    assert quantile(((1.0, 1), (60.0, 0), (math.inf, 99)), 0.99) == 60.0


def test_no_quantile_of_a_minute_nothing_was_handled_in() -> None:
    assert Minute(0).lateness_quantile(0.5) is None
    assert quantile(((0.001, 0), (math.inf, 0)), 0.99) is None


def test_a_minute_is_read_back_from_its_hash_fields() -> None:
    minute = parse_minute(
        120,
        {
            b"accepted": b"7",
            b"dead": b"1",
            b"late:0.005": b"3",
            b"late:+Inf": b"1",
            b"late:0.001": b"2",
            b"someone else's": b"x",
        },
    )
    assert (minute.start, minute.accepted, minute.delivered, minute.dead) == (120, 7, 0, 1)
    late = dict(minute.lateness)
    assert (late[0.001], late[0.002], late[0.005], late[math.inf]) == (2, 0, 3, 1)
    assert list(late) == sorted(metrics.LATENESS.bounds)


def test_a_minute_whose_only_bucket_is_the_unbounded_one_is_at_least_its_lower_bound() -> None:
    # A flush writes only the buckets that grew: here messages handled over a minute late.
    minute = parse_minute(0, {b"late:+Inf": b"5"})
    assert minute.lateness_quantile(0.5) == minute.lateness_quantile(0.99) == 60.0


def test_the_history_totals_are_the_prometheus_counters() -> None:
    before = metrics.history_totals()
    metrics.ACCEPTED.labels("due").inc(2)
    metrics.ACCEPTED.labels("duplicate").inc(5)  # not a new message: not charted
    metrics.DELIVERED.inc(3)
    metrics.LATENESS.labels().observe(0.004)
    after = metrics.history_totals()
    assert after["accepted"] - before["accepted"] == 2
    assert after["delivered"] - before["delivered"] == 3
    assert after["late:0.005"] - before["late:0.005"] == 1
    assert (
        sum(v for k, v in after.items() if k.startswith("late:"))
        - sum(v for k, v in before.items() if k.startswith("late:"))
        == 1
    )


def test_chart_series_give_lateness_in_milliseconds_and_null_where_nothing_ran() -> None:
    minutes = [Minute(0), Minute(60, delivered=2, lateness=((0.002, 2), (math.inf, 0)))]
    series = views.chart_series(minutes)
    assert series["t"] == [0, 60]
    assert series["delivered"] == [0, 2]
    assert series["p50"] == [None, 1.0]
    assert series["p99"][0] is None


# --- times ---------------------------------------------------------------------------------


def test_times_are_shown_in_utc_to_the_millisecond() -> None:
    assert views.when(1_800_000_000_123) == "2027-01-15 08:00:00.123 UTC"
    assert views.when(None) == "—"


@pytest.mark.parametrize(
    ("ms", "text"),
    [(0, "0 ms"), (999, "999 ms"), (4200, "4.2 s"), (180_000, "3 min"), (5 * 3_600_000, "5.0 h")],
)
def test_spans_are_short(ms: int, text: str) -> None:
    assert views.span(ms) == text


def test_relative_times_say_in_or_ago() -> None:
    assert views.relative(5000, 2000) == "in 3.0 s"
    assert views.relative(2000, 5000) == "3.0 s ago"


def test_a_form_time_is_read_as_utc_and_round_trips() -> None:
    ms = 1_800_000_000_000
    assert views.parse_form_time(views.form_time(ms)) == ms
    assert views.parse_form_time("2027-01-15T08:00") == ms
    assert views.parse_form_time("2027-01-15T08:00:00.250") == ms + 250


@pytest.mark.parametrize("text", ["", "tomorrow", "2027-13-01T00:00", "10000-01-01T00:00"])
def test_a_bad_form_time_names_the_field(text: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        views.parse_form_time(text)
    assert caught.value.field == "run_at"


@pytest.mark.parametrize(
    "back",
    ["/ui", "/ui/dead", "/ui/scheduled?cursor=1.ab", "/ui/messages/x"],
)
def test_an_action_goes_back_to_a_dashboard_page(back: str) -> None:
    assert views.safe_back(back, "/ui") == back


@pytest.mark.parametrize(
    "back",
    [
        None,
        "",
        "https://evil.example/ui",
        "//evil.example/ui",
        "/ui//evil.example",
        "/uix",
        "/api/v1/dead",
        "/ui/\\evil",
        "/ui/\nx",
    ],
)
def test_an_action_never_sends_the_browser_elsewhere(back: str | None) -> None:
    assert views.safe_back(back, "/ui") == "/ui"


# --- cursors -------------------------------------------------------------------------------


def test_cursors_the_dashboard_did_not_make_are_refused() -> None:
    for bad in ["", "1.zz", "1." + "a" * 43, "-1." + "a" * 44]:
        with pytest.raises(BadCursor):
            parse_scheduled_cursor(bad)
    assert parse_scheduled_cursor("7." + "ab" * 22) == (7, bytes.fromhex("ab" * 22))


# --- vendored files ------------------------------------------------------------------------

# npm package uplot 1.6.32 (MIT), files as published: see vendor/README.md.
VENDORED = {
    "uplot/uPlot.iife.min.js": "19c8d4c6ad88929a79f4ae49d6f7161566dfd0ba3d15cc495e974f787eb78f1f",
    "uplot/uPlot.min.css": "df630c6a8d6f8eeaff264b50f73ce5b114f646ffd9a0bb74f049b0a00135fa04",
}


@pytest.mark.parametrize("path", sorted(VENDORED))
def test_the_vendored_files_are_the_published_ones(path: str) -> None:
    assert hashlib.sha256((VENDOR / path).read_bytes()).hexdigest() == VENDORED[path]


def test_each_vendored_package_carries_its_licence() -> None:
    for package in {Path(p).parts[0] for p in VENDORED}:
        assert "Permission is hereby granted" in (VENDOR / package / "LICENSE").read_text()
    assert "1.6.32" in (VENDOR / "README.md").read_text()


def test_every_template_and_static_file_is_in_the_package_data() -> None:
    """A non-editable install (the Docker image) holds only what the globs name."""
    import glob
    import tomllib

    root = Path(__file__).resolve().parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["app.http"]
    package = root / "app" / "http"
    served = [
        p.relative_to(package).as_posix()
        for folder in ("ui/templates", "ui/static")
        for p in (package / folder).rglob("*")
        if p.is_file() and p.name != "README.md"
    ]
    assert served
    packaged = {f for g in globs for f in glob.glob(g, root_dir=package)}
    assert sorted(set(served) - packaged) == []
