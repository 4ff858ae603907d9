"""Operator commands: ``send``, ``status`` and ``dead``, spoken to the API over HTTP.

They reach ``EAT_API_URL`` (or ``--api``) with the bearer token ``EAT_API_TOKEN``
when it is set. Exit codes: 0 done, 1 the API refused or could not be reached,
2 a bad flag (argparse names it).

Time arguments (``--at``) are parsed by :func:`parse_at`, a pure function of
the text and the current time.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import IO, Any

import httpx

from app.model import RUN_AT_MAX, RUN_AT_MIN, InvalidInput, normalize_uuid
from app.settings import Settings

COMMANDS = ("send", "status", "dead")
API_PREFIX = "/api/v1"
BULK_CHUNK = 1000  # most messages one POST /save-messages takes
BULK_TRIES = 3  # tries per chunk on 503 or a lost connection (uuids make a retry safe)
DEAD_PAGE_MAX = 1000

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
# [0-9], not \d or str.isdigit(), which take the digits of every script.
_DIGITS = re.compile(r"[0-9]+\Z")
_RELATIVE = re.compile(r"\+((?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h|d))+)")
_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_SECONDS_LOOKALIKE = 10**11  # epoch ms below this is before 1973-03-03: meant as seconds
AT_FORMATS = "epoch milliseconds, ISO-8601 (2030-01-01T09:00:00Z) or +10s/+5m/+2h/+1h30m"


# -- pure parsing --------------------------------------------------------------------


def parse_at(text: str, now_ms: int, tz: tzinfo | None = None) -> int:
    """``--at`` as epoch milliseconds; raise ValueError saying what is wrong.

    - ``1795843243061``: epoch milliseconds (``0`` means due now; a 10-digit value
      is refused as epoch *seconds*, a common slip);
    - ``2030-01-01T09:00:00Z``, ``2030-01-01 09:00+02:00``, ``2030-01-01``: ISO-8601;
      without an offset it is ``tz`` (default: this machine's local time);
    - ``+10s``, ``+5m``, ``+2h``, ``+1d``, ``+500ms``, ``+1h30m``, ``+1.5s``: from ``now_ms``;
    - ``now``.
    """
    value = text.strip()
    if not value:
        raise ValueError("empty time")
    if value.lower() == "now":
        result = now_ms
    elif _DIGITS.match(value):
        result = int(value)
        if 0 < result < _SECONDS_LOOKALIKE:
            raise ValueError(
                f"{value} looks like epoch seconds; --at takes epoch milliseconds ({value}000)"
            )
    elif value.startswith(("+", "-")):
        match = _RELATIVE.fullmatch(value.replace(" ", ""))
        if match is None:
            raise ValueError("a relative time is + and amounts with units ms, s, m, h, d")
        total = sum(float(n) * _UNITS_MS[unit] for n, unit in _PART.findall(match.group(1)))
        result = now_ms + round(total)
    else:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("not a number, an ISO-8601 time or a +duration") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=tz) if tz is not None else moment.astimezone()
        result = round(moment.timestamp() * 1000)
    if not RUN_AT_MIN <= result <= RUN_AT_MAX:
        raise ValueError(f"outside 1970-01-01 .. 9999-12-31 ({RUN_AT_MIN}..{RUN_AT_MAX} ms)")
    return result


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso_ms(ms: int) -> str:
    """Epoch ms as ISO-8601 UTC with milliseconds (``2030-01-01T09:00:00.000Z``)."""
    try:
        moment = datetime.fromtimestamp(ms / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return str(ms)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _at_type(text: str) -> int:
    try:
        return parse_at(text, now_ms())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: {exc}. Use {AT_FORMATS}"
        ) from None


def _uuid_type(text: str) -> str:
    try:
        return normalize_uuid(text)
    except InvalidInput:
        raise argparse.ArgumentTypeError(
            f"invalid uuid {text!r}: use a canonical UUID like 123e4567-e89b-12d3-a456-426614174000"
        ) from None


def _url_type(text: str) -> str:
    url = httpx.URL(text) if text.startswith(("http://", "https://")) else None
    if url is None or not url.host:
        raise argparse.ArgumentTypeError(
            f"invalid URL {text!r}: use http://host:port or https://host"
        )
    return text.rstrip("/")


def _limit_type(text: str) -> int:
    value = int(text) if _DIGITS.match(text) and len(text) <= 4 else 0
    if not 1 <= value <= DEAD_PAGE_MAX:
        raise argparse.ArgumentTypeError(
            f"invalid limit {text!r}: a whole number from 1 to {DEAD_PAGE_MAX}"
        )
    return value


# -- the parser ----------------------------------------------------------------------


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``send``, ``status`` and ``dead`` on ``echo-at-time``'s subparsers."""
    api_help = "API base URL (default: EAT_API_URL, else http://127.0.0.1:8080)"

    send = sub.add_parser(
        "send",
        help="schedule a message (or a JSON-lines file of them) through the API",
        description='Schedule one message: send "text" --at WHEN. Or many: send --file F, '
        'one JSON object {"message", "runAt", "uuid"?} per line, posted 1,000 at a time. '
        f"WHEN is {AT_FORMATS}.",
    )
    send.add_argument("text", nargs="?", help="the message")
    send.add_argument("--at", type=_at_type, metavar="WHEN", help="when to run it")
    send.add_argument("--uuid", type=_uuid_type, help="idempotency key (default: a new one)")
    send.add_argument("--file", metavar="PATH", help="JSON lines to send in bulk ('-': stdin)")
    send.add_argument("--api", type=_url_type, metavar="URL", help=api_help)
    send.set_defaults(ops_parser=send)

    status = sub.add_parser("status", help="queue figures, leader and workers (GET /stats)")
    status.add_argument("--json", action="store_true", help="print the API's JSON as is")
    status.add_argument("--api", type=_url_type, metavar="URL", help=api_help)
    status.set_defaults(ops_parser=status)

    dead = sub.add_parser("dead", help="inspect, replay or purge dead-lettered messages")
    dead_sub = dead.add_subparsers(dest="dead_command", required=True, metavar="ACTION")
    listing = dead_sub.add_parser("list", help="list dead messages, oldest first")
    listing.add_argument("--limit", type=_limit_type, default=20, help="how many (20)")
    listing.add_argument("--cursor", help="continue where a previous page stopped")
    listing.add_argument("--json", action="store_true", help="print the API's JSON as is")
    replay = dead_sub.add_parser("replay", help="schedule a dead message (or all) again, due now")
    replay.add_argument("uuid", nargs="?", type=_uuid_type, help="the message to replay")
    replay.add_argument("--all", action="store_true", help="replay every dead message")
    purge = dead_sub.add_parser("purge", help="delete a dead message, or all with --yes")
    purge.add_argument("uuid", nargs="?", type=_uuid_type, help="the message to delete")
    purge.add_argument("--yes", action="store_true", help="delete every dead message")
    for action in (listing, replay, purge):
        action.add_argument("--api", type=_url_type, metavar="URL", help=api_help)
        action.set_defaults(ops_parser=action)


def check_args(args: argparse.Namespace) -> None:
    """Flag combinations argparse cannot express; ``parser.error`` exits 2 naming the flag."""
    parser: argparse.ArgumentParser = args.ops_parser
    if args.command == "send":
        if args.file is not None:
            if args.text is not None:
                parser.error("argument --file: give either a message or --file, not both")
            if args.at is not None or args.uuid is not None:
                parser.error(
                    "argument --file: --at and --uuid are for one message; "
                    "each line of the file carries its own runAt and uuid"
                )
        elif args.text is None:
            parser.error('give a message to send (send "text" --at WHEN) or --file PATH')
        elif args.at is None:
            parser.error("argument --at is required with a message")
    elif args.command == "dead" and args.dead_command == "replay":
        if args.all == (args.uuid is not None):
            parser.error("argument --all: give a uuid or --all (not both)")
    elif args.command == "dead" and args.dead_command == "purge" and args.yes and args.uuid:
        parser.error("argument --yes: purge one uuid, or all with --yes (not both)")


# -- talking to the API ----------------------------------------------------------------


class ApiError(Exception):
    """The API answered with an error, or could not be reached; the text says which."""


@dataclass
class Output:
    out: IO[str] = field(default_factory=lambda: sys.stdout)
    err: IO[str] = field(default_factory=lambda: sys.stderr)
    tty: bool | None = None  # None: ask ``err`` (progress bars and prompts)

    @property
    def interactive(self) -> bool:
        if self.tty is not None:
            return self.tty
        return bool(getattr(self.err, "isatty", lambda: False)())

    def line(self, text: str = "") -> None:
        print(text, file=self.out)

    def note(self, text: str) -> None:
        print(text, file=self.err)


class Api:
    """A synchronous client for ``/api/v1`` that turns errors into :class:`ApiError`."""

    def __init__(
        self, base_url: str, token: str, transport: httpx.BaseTransport | None = None
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url
        self.http = httpx.Client(
            base_url=base_url + API_PREFIX, headers=headers, timeout=30.0, transport=transport
        )

    def close(self) -> None:
        self.http.close()

    def call(
        self, method: str, path: str, *, ok: tuple[int, ...] = (200,), **kwargs: Any
    ) -> tuple[int, Any]:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(
                f"cannot reach the API at {self.base_url} ({type(exc).__name__}: {exc}); "
                "set EAT_API_URL or --api"
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code not in ok:
            raise ApiError(_describe_error(method, path, response.status_code, body))
        return response.status_code, body


def _describe_error(method: str, path: str, status: int, body: Any) -> str:
    text = f"{method} {API_PREFIX}{path} answered {status}"
    if isinstance(body, dict) and body.get("error"):
        text += f": {body['error']}"
        if body.get("field"):
            text += f" (field {body['field']})"
    if status == 401:
        text += "; set EAT_API_TOKEN to the API's token"
    return text


def run(
    args: argparse.Namespace,
    settings: Settings,
    *,
    transport: httpx.BaseTransport | None = None,
    output: Output | None = None,
) -> int:
    """Run one operator command; its exit code."""
    check_args(args)
    output = output or Output()
    api = Api(args.api or settings.api_url.rstrip("/"), settings.api_token, transport)
    try:
        if args.command == "send":
            if args.file is not None:
                return send_file(api, args.file, output)
            return send_one(api, args.text, args.at, args.uuid, output)
        if args.command == "status":
            return status(api, args.json, output)
        if args.dead_command == "list":
            return dead_list(api, args.limit, args.cursor, args.json, output)
        if args.dead_command == "replay":
            return dead_replay(api, args.uuid, output)
        return dead_purge(api, args.uuid, args.yes, output)
    except ApiError as exc:
        output.note(f"echo-at-time: {exc}")
        return 1
    finally:
        api.close()


# -- send ----------------------------------------------------------------------------


def send_one(api: Api, text: str, run_at: int, uuid: str | None, output: Output) -> int:
    body: dict[str, Any] = {"message": text, "runAt": run_at}
    if uuid is not None:
        body["uuid"] = uuid
    status_code, answer = api.call("POST", "/save-message", ok=(200, 201), json=body)
    state = answer.get("state", "?")
    when = f"runAt {answer.get('runAt')} ({iso_ms(int(answer.get('runAt', run_at)))})"
    if status_code == 200 or answer.get("duplicate"):
        output.line(f"duplicate {answer.get('uuid')}: accepted before, {state}, {when}")
    else:
        output.line(f"{state} {answer.get('uuid')} {when}")
    return 0


@dataclass
class BulkTotals:
    lines: int = 0
    accepted: int = 0
    duplicates: int = 0
    invalid: int = 0


def _read_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line."""
    handle = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
    try:
        for number, text in enumerate(handle, start=1):
            if text.strip():
                yield number, text
    finally:
        if handle is not sys.stdin:
            handle.close()


def _count_lines(path: str) -> int | None:
    if path == "-":
        return None
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def send_file(api: Api, path: str, output: Output) -> int:
    """POST /save-messages in chunks of 1,000; a line without a uuid gets one here, so a
    chunk retried after a lost answer cannot create a message twice."""
    try:
        total = _count_lines(path)
    except OSError as exc:
        raise ApiError(f"cannot read {path}: {exc.strerror or exc}") from None
    totals = BulkTotals()
    bar = None
    if output.interactive:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="msg", file=output.err, desc="send", dynamic_ncols=True)
    chunk: list[tuple[int, Any]] = []
    try:
        for number, text in _read_lines(path):
            try:
                item = json.loads(text)
            except ValueError as exc:
                totals.lines += 1
                totals.invalid += 1
                output.note(f"line {number}: not JSON ({exc})")
                continue
            if isinstance(item, dict) and item.get("uuid") is None:
                item = {**item, "uuid": str(uuidlib.uuid4())}
            chunk.append((number, item))
            if len(chunk) == BULK_CHUNK:
                _send_chunk(api, chunk, totals, output, bar, total)
                chunk = []
        if chunk:
            _send_chunk(api, chunk, totals, output, bar, total)
    except OSError as exc:
        raise ApiError(f"cannot read {path}: {exc.strerror or exc}") from None
    finally:
        if bar is not None:
            bar.close()
    output.line(
        f"sent {totals.lines} messages: {totals.accepted} accepted, "
        f"{totals.duplicates} duplicates, {totals.invalid} invalid"
    )
    return 1 if totals.invalid else 0


def _send_chunk(
    api: Api,
    chunk: list[tuple[int, Any]],
    totals: BulkTotals,
    output: Output,
    bar: Any,
    total: int | None,
) -> None:
    payload = [item for _, item in chunk]
    for attempt in range(1, BULK_TRIES + 1):
        try:
            _, answer = api.call("POST", "/save-messages", json=payload)
            break
        except ApiError as exc:
            retriable = "answered 503" in str(exc) or "cannot reach" in str(exc)
            if not retriable or attempt == BULK_TRIES:
                raise ApiError(
                    f"{exc}; stopped at line {chunk[0][0]} (the lines before it were sent)"
                ) from None
            time.sleep(0.5 * attempt)
    for result in answer.get("results", []):
        if result.get("status") == "invalid":
            index = int(result.get("index", -1))
            number = chunk[index][0] if 0 <= index < len(chunk) else "?"
            where = f" (field {result['field']})" if result.get("field") else ""
            output.note(f"line {number}: {result.get('error', 'invalid')}{where}")
    totals.lines += len(chunk)
    totals.accepted += int(answer.get("accepted", 0))
    totals.duplicates += int(answer.get("duplicates", 0))
    totals.invalid += int(answer.get("invalid", 0))
    if bar is not None:
        bar.update(len(chunk))
    else:
        of = f"/{total}" if total is not None else ""
        output.note(
            f"sent {totals.lines}{of}: {totals.accepted} accepted, "
            f"{totals.duplicates} duplicates, {totals.invalid} invalid"
        )


# -- status --------------------------------------------------------------------------


def _duration(ms: Any) -> str:
    if ms is None:
        return "-"
    ms = int(ms)
    if ms < 1000:
        return f"{ms} ms"
    if ms < 120_000:
        return f"{ms / 1000:.1f} s"
    if ms < 7_200_000:
        return f"{ms / 60_000:.1f} min"
    return f"{ms / 3_600_000:.1f} h"


def _since(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return iso_ms(value)
    return str(value)


def status(api: Api, as_json: bool, output: Output) -> int:
    _, stats = api.call("GET", "/stats")
    if as_json:
        output.line(json.dumps(stats, indent=2, sort_keys=True))
        return 0
    leader = stats.get("leader")
    if leader:
        leading = (
            f"{leader.get('identifier')} (epoch {leader.get('epoch')}, "
            f"since {_since(leader.get('since'))})"
        )
    else:
        leading = "none (no scheduler leads: nothing is promoted)"
    consumers = stats.get("consumers") or []
    rows = [
        ("delayed", f"{stats.get('delayed', 0):,}", "scheduled for later"),
        ("stream", f"{stats.get('streamLength', 0):,}", "due, in the stream"),
        ("pending", f"{stats.get('pending', 0):,}", "delivered, not yet acknowledged"),
        ("lag", f"{stats.get('lag', 0):,}", "due, not yet read by a worker"),
        ("dead", f"{stats.get('dead', 0):,}", "dead-lettered"),
        ("oldest overdue", _duration(stats.get("oldestOverdueMs")), "age of the oldest due"),
        ("workers", f"{len(consumers)}", "consumers in the group"),
    ]
    if stats.get("schedules"):  # only when there are any (docs/schedules.md)
        rows.append(("schedules", f"{stats['schedules']:,}", "recurring schedules defined"))
    width = max(len(value) for _, value, _ in rows)
    for name, value, meaning in rows:
        output.line(f"{name:<15} {value:>{width}}   {meaning}")
    output.line(f"{'leader':<15} {leading}")
    partitions = stats.get("partitions") or []
    if len(partitions) > 1:
        _partition_table(partitions, output)
    if consumers:
        output.line()
        name_width = max(12, *(len(str(c.get("name", ""))) for c in consumers))
        output.line(f"{'WORKER':<{name_width}}  {'PENDING':>8}  IDLE")
        for consumer in consumers:
            output.line(
                f"{consumer.get('name', '?')!s:<{name_width}}  "
                f"{consumer.get('pending', 0):>8,}  {_duration(consumer.get('idleMs'))}"
            )
    return 0


def _partition_table(partitions: list[dict[str, Any]], output: Output) -> None:
    """One row per partition (EAT_PARTITIONS > 1): a hot partition, or one whose master
    is slow, stands out; MASTER says which Redis Cluster master serves it."""
    columns = [
        ("PARTITION", "partition"),
        ("DELAYED", "delayed"),
        ("STREAM", "streamLength"),
        ("PENDING", "pending"),
        ("LAG", "lag"),
        ("DEAD", "dead"),
    ]
    rows = []
    for p in partitions:
        cells = [
            f"{p.get(key, 0):,}" if key != "partition" else str(p.get(key)) for _, key in columns
        ]
        cells.append(_duration(p.get("oldestOverdueMs")))
        cells.append(str(p.get("master") or "-"))
        rows.append(cells)
    heads = [head for head, _ in columns] + ["OVERDUE", "MASTER"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    output.line()
    for cells in [heads, *rows]:
        numbers = [f"{c:>{w}}" for c, w in zip(cells[:-2], widths, strict=False)]
        output.line("  ".join([*numbers, f"{cells[-2]:<{widths[-2]}}", cells[-1]]).rstrip())


# -- dead ------------------------------------------------------------------------------


def _cell(value: Any, width: int) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def get_page(
    api: Api, path: str, limit: int, cursor: str | None, as_json: bool, output: Output
) -> dict[str, Any] | None:
    """One page of a paged list (``limit``, ``cursor``); with ``--json`` printed as the api
    sent it, and None."""
    params: dict[str, Any] = {"limit": limit}
    if cursor:
        params["cursor"] = cursor
    _, page = api.call("GET", path, params=params)
    if as_json:
        output.line(json.dumps(page, indent=2, sort_keys=True))
        return None
    return page


def say_more(output: Output, command: str, limit: int, page: dict[str, Any]) -> None:
    """The command line for the next page, when there is one."""
    if page.get("next"):
        output.line(f"more: echo-at-time {command} --limit {limit} --cursor {page['next']}")


def dead_list(api: Api, limit: int, cursor: str | None, as_json: bool, output: Output) -> int:
    page = get_page(api, "/dead", limit, cursor, as_json, output)
    if page is None:
        return 0
    items = page.get("items") or []
    if not items:
        output.line("no dead messages")
    else:
        output.line(f"{'UUID':<36}  {'RUN AT':<24}  {'DEAD AT':<24}  {'TRIES':>5}  REASON")
        for item in items:
            output.line(
                f"{item.get('uuid', '?')!s:<36}  {_when(item.get('runAt')):<24}  "
                f"{_when(item.get('deadAt')):<24}  {item.get('attempts', 0)!s:>5}  "
                f"{_cell(item.get('reason', ''), 60)}"
            )
    say_more(output, "dead list", limit, page)
    return 0


def _when(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return iso_ms(value)
    if isinstance(value, str) and _DIGITS.match(value) and len(value) <= 20:
        return iso_ms(int(value))
    return "-" if value is None else str(value)


def dead_replay(api: Api, uuid: str | None, output: Output) -> int:
    if uuid is not None:
        api.call("POST", f"/dead/{uuid}/replay", ok=(200, 201, 202, 204))
        output.line(f"replayed {uuid}")
        return 0
    _, answer = api.call("POST", "/dead/replay", ok=(200, 201, 202))
    answer = answer or {}
    text = f"replayed {int(answer.get('replayed', 0))} dead messages"
    if answer.get("skipped"):
        text += f", skipped {int(answer['skipped'])} (their messages live on: not dead)"
    output.line(text)
    return 0


def dead_purge(api: Api, uuid: str | None, yes: bool, output: Output) -> int:
    if uuid is not None:
        api.call("DELETE", f"/dead/{uuid}", ok=(200, 202, 204))
        output.line(f"deleted {uuid}")
        return 0
    if not yes:
        if not output.interactive:
            output.note(
                "echo-at-time dead purge: error: argument --yes: purge deletes every dead "
                "message; pass --yes to confirm (or name one uuid)"
            )
            return 2
        output.note("Delete every dead message? This cannot be undone. [y/N] ")
        if input().strip().lower() not in ("y", "yes"):
            output.note("nothing deleted")
            return 1
    _, answer = api.call("DELETE", "/dead", ok=(200, 202))
    output.line(f"deleted {int((answer or {}).get('deleted', 0))} dead messages")
    return 0
