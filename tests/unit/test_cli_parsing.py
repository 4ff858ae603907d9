"""The operator commands' arguments: ``--at`` parsing and every bad flag named, exit 2."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta, timezone

import pytest

from app.cli import build_parser
from app.model import RUN_AT_MAX
from app.ops import commands
from app.ops.commands import parse_at
from app.settings import Settings
from workers.handlers import HandlerSpecError, load_handler
from workers.process import check_list_name

NOW = 1_795_843_243_061  # any fixed instant will do


# -- --at ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1795843243061", 1795843243061),
        ("0", 0),
        (" 1795843243061 ", 1795843243061),
        ("now", NOW),
        ("NOW", NOW),
        ("+10s", NOW + 10_000),
        ("+5m", NOW + 300_000),
        ("+2h", NOW + 7_200_000),
        ("+1d", NOW + 86_400_000),
        ("+500ms", NOW + 500),
        ("+1h30m", NOW + 5_400_000),
        ("+1.5s", NOW + 1500),
        ("+0s", NOW),
        ("+ 10 s", NOW + 10_000),
    ],
)
def test_at_accepts_epoch_ms_now_and_relative_durations(text: str, expected: int) -> None:
    assert parse_at(text, NOW) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2030-01-01T09:00:00Z", datetime(2030, 1, 1, 9, tzinfo=UTC)),
        ("2030-01-01T09:00:00.250Z", datetime(2030, 1, 1, 9, 0, 0, 250_000, tzinfo=UTC)),
        (
            "2030-01-01T09:00:00+02:00",
            datetime(2030, 1, 1, 9, tzinfo=timezone(timedelta(hours=2))),
        ),
        ("2030-01-01 09:00", datetime(2030, 1, 1, 9, tzinfo=timezone(timedelta(hours=-5)))),
        ("2030-01-01", datetime(2030, 1, 1, tzinfo=timezone(timedelta(hours=-5)))),
    ],
)
def test_at_accepts_iso_8601_and_reads_a_time_without_offset_in_the_given_zone(
    text: str, expected: datetime
) -> None:
    zone = timezone(timedelta(hours=-5))
    assert parse_at(text, NOW, tz=zone) == int(expected.timestamp() * 1000)


def test_at_without_offset_defaults_to_this_machines_local_time() -> None:
    local = datetime(2030, 1, 1, 9).astimezone()
    assert parse_at("2030-01-01T09:00:00", NOW) == int(local.timestamp() * 1000)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("soon", "not a number"),
        ("10s", "not a number"),
        ("+10", "relative"),
        ("+10x", "relative"),
        ("+", "relative"),
        ("-5m", "relative"),
        ("+s", "relative"),
        ("1700000000", "epoch seconds"),
        ("1", "epoch seconds"),
        (str(RUN_AT_MAX + 1), "outside"),
        ("2030-13-01T00:00:00Z", "not a number"),
        ("1.5e12", "not a number"),
        # Digits of other scripts: int() and \d read them; an operator does not mean them.
        ("\u0661" * 13, "not a number"),  # Arabic-Indic 1111111111111
        ("\uff11" * 13, "not a number"),  # fullwidth
        ("+\u0661\u0660s", "relative"),
        ("+1\U0001d7ces", "relative"),
    ],
)
def test_at_refuses_what_it_cannot_read_saying_why(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_at(text, NOW)


def test_at_refuses_a_relative_time_past_year_9999() -> None:
    with pytest.raises(ValueError, match="outside"):
        parse_at("+3000000d", NOW)


def test_at_is_parsed_at_argument_time_relative_to_the_clock() -> None:
    before = commands.now_ms()
    args = build_parser().parse_args(["send", "hi", "--at", "+10s"])
    after = commands.now_ms()
    assert before + 10_000 <= args.at <= after + 10_000


# -- bad flags: exit 2, the flag named ----------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    commands.check_args(args)
    return args


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["send", "hi", "--at", "soon"], "argument --at: invalid time 'soon'"),
        (["send", "hi"], "argument --at is required"),
        (["send"], "give a message"),
        (["send", "hi", "--at", "+1s", "--uuid", "nope"], "argument --uuid: invalid uuid"),
        (["send", "hi", "--at", "+1s", "--api", "localhost:8080"], "argument --api: invalid URL"),
        (["send", "hi", "--file", "m.jsonl"], "argument --file"),
        (["send", "--file", "m.jsonl", "--at", "+1s"], "argument --file"),
        (["send", "hi", "--at", "+1s", "--bogus"], "unrecognized arguments: --bogus"),
        (["status", "--verbose"], "unrecognized arguments: --verbose"),
        (["dead"], "required: ACTION"),
        (["dead", "list", "--limit", "0"], "argument --limit: invalid limit '0'"),
        (["dead", "list", "--limit", "ten"], "argument --limit: invalid limit 'ten'"),
        (["dead", "list", "--limit", "1001"], "argument --limit"),
        (["dead", "list", "--limit", "\u0665"], "argument --limit: invalid limit"),
        (["dead", "list", "--limit", "1_0"], "argument --limit: invalid limit '1_0'"),
        (["dead", "replay"], "argument --all: give a uuid or --all"),
        (
            ["dead", "replay", "123e4567-e89b-12d3-a456-426614174000", "--all"],
            "argument --all",
        ),
        (["dead", "replay", "not-a-uuid"], "argument uuid: invalid uuid"),
        (["dead", "purge", "123e4567-e89b-12d3-a456-426614174000", "--yes"], "argument --yes"),
        (["dead", "bury"], "argument ACTION: invalid choice: 'bury'"),
    ],
)
def test_bad_flags_exit_2_with_a_message_naming_the_flag(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert named in err, err
    assert err.startswith("usage: echo-at-time")


def test_good_flags_parse_into_what_each_command_needs() -> None:
    args = parse(
        ["send", "hi", "--at", "1795843243061", "--uuid", "123E4567-E89B-12D3-A456-426614174000"]
    )
    assert (args.text, args.at, args.uuid) == (
        "hi",
        1795843243061,
        "123e4567-e89b-12d3-a456-426614174000",
    )
    assert parse(["send", "--file", "m.jsonl", "--api", "http://h:1/"]).api == "http://h:1"
    assert parse(["dead", "list"]).limit == 20
    assert parse(["dead", "replay", "--all"]).all
    assert parse(["dead", "purge", "--yes"]).yes
    assert parse(["status", "--json"]).json


def test_purge_of_everything_without_yes_off_a_terminal_exits_2_and_sends_nothing() -> None:
    import io

    import httpx

    def refuse(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"no request expected, got {request.method} {request.url}")

    err = io.StringIO()
    code = commands.run(
        parse(["dead", "purge"]),
        Settings(),
        transport=httpx.MockTransport(refuse),
        output=commands.Output(out=io.StringIO(), err=err, tty=False),
    )
    assert code == 2
    assert "argument --yes" in err.getvalue()


# -- worker --handler list / --list-name ------------------------------------------------


def test_list_name_without_the_list_handler_is_refused_naming_the_flag() -> None:
    with pytest.raises(HandlerSpecError, match="--list-name"):
        load_handler("echo", "w", list_name="Out")


def test_list_handler_on_a_list_the_bridge_reads_is_refused_while_the_bridge_runs() -> None:
    settings = Settings()
    for name in (None, "Queue", "QueueDelayed", "QueueDead"):
        with pytest.raises(HandlerSpecError, match="EAT_LEGACY_BRIDGE"):
            check_list_name(settings, "list", name)
    assert check_list_name(settings, "list", "ConsumerQueue") == "ConsumerQueue"
    without_bridge = Settings(legacy_bridge=False)
    assert check_list_name(without_bridge, "list", None) == "Queue"
    renamed = Settings(legacy_bridge=False, legacy_queue="OldQueue")
    assert check_list_name(renamed, "list", None) == "OldQueue"
    assert check_list_name(settings, "echo", None) is None


def test_unknown_handler_names_the_choices() -> None:
    with pytest.raises(HandlerSpecError, match="'echo', 'list', 'webhook' or 'module:callable'"):
        load_handler("nonsense", "w")


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan", "soon"])
def test_a_handler_timeout_that_is_not_a_positive_number_of_seconds_exits_2_naming_the_flag(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["worker", "--handler-timeout", value])
    assert exited.value.code == 2
    assert "argument --handler-timeout" in capsys.readouterr().err


def test_a_handler_timeout_flag_parses_to_seconds() -> None:
    assert build_parser().parse_args(["worker", "--handler-timeout", "2.5"]).handler_timeout == 2.5
    assert build_parser().parse_args(["worker"]).handler_timeout is None


@pytest.mark.parametrize("value", ["0", "1025", "x", "١٦"])
def test_up_partitions_outside_1_to_1024_exit_2_naming_the_flag(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["up", "--cluster", "--partitions", value])
    assert exited.value.code == 2
    assert "argument --partitions" in capsys.readouterr().err
