"""``echo-at-time schedule set|list|show|delete|pause|resume``: recurring schedules through
the API (``/api/v1/schedules``), like ``send``, ``status`` and ``dead`` (same
``EAT_API_URL``/``--api``, same token, same exit codes: 0 done, 1 the API refused or
could not be reached, 2 a bad flag)."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

import httpx

from app.ops.commands import (
    AT_FORMATS,
    Api,
    ApiError,
    Output,
    _at_type,
    _cell,
    _url_type,
    get_page,
    iso_ms,
    say_more,
)
from app.settings import Settings

COMMAND = "schedule"
PAGE_MAX = 1000
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")


def _name_type(text: str) -> str:
    if not _NAME.match(text):
        raise argparse.ArgumentTypeError(
            f"invalid name {text!r}: 1-128 letters, digits, '.', '_', ':' or '-', starting with "
            "a letter or digit"
        )
    return text


def _limit_type(text: str) -> int:
    value = int(text) if text.isascii() and text.isdigit() and len(text) <= 4 else 0
    if not 1 <= value <= PAGE_MAX:
        raise argparse.ArgumentTypeError(f"invalid limit {text!r}: from 1 to {PAGE_MAX}")
    return value


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``schedule`` and its actions on ``echo-at-time``'s subparsers."""
    api_help = "API base URL (default: EAT_API_URL, else http://127.0.0.1:8080)"
    schedule = sub.add_parser(
        COMMAND,
        help="recurring schedules: set, list, show, delete, pause, resume",
        description="Recurring schedules: each occurrence of a cron expression or an interval "
        "becomes one message (docs/schedules.md).",
    )
    actions = schedule.add_subparsers(dest="schedule_command", required=True, metavar="ACTION")
    put = actions.add_parser(
        "set",
        help="create or replace a schedule (the same definition again changes nothing)",
        description=f"Give --cron (with --tz) or --every. WHEN (--start, --end) is {AT_FORMATS}.",
    )
    put.add_argument("name", type=_name_type)
    put.add_argument("--message", required=True, help="the body of every message it produces")
    how = put.add_mutually_exclusive_group(required=True)
    how.add_argument("--cron", metavar="EXPR", help='5 fields, e.g. "0 7 * * 1-5"')
    how.add_argument("--every", metavar="INTERVAL", help="90s, 5m, 1h, 1d")
    put.add_argument("--tz", metavar="ZONE", help="IANA timezone of --cron (default UTC)")
    put.add_argument("--start", type=_at_type, metavar="WHEN", help="no occurrence before")
    put.add_argument("--end", type=_at_type, metavar="WHEN", help="no occurrence after")
    put.add_argument("--paused", action="store_true", help="store it paused")
    listing = actions.add_parser("list", help="list schedules by name")
    listing.add_argument("--limit", type=_limit_type, default=100, help="how many (100)")
    listing.add_argument("--cursor", help="continue where a previous page stopped")
    listing.add_argument("--json", action="store_true", help="print the API's JSON as is")
    show = actions.add_parser("show", help="a schedule, its next occurrences and last messages")
    show.add_argument("name", type=_name_type)
    show.add_argument("--json", action="store_true", help="print the API's JSON as is")
    for verb, text in (
        ("delete", "delete a schedule (its pending occurrences are cancelled)"),
        ("pause", "pause a schedule (its pending occurrences are cancelled)"),
        ("resume", "resume a paused schedule from now"),
    ):
        action = actions.add_parser(verb, help=text)
        action.add_argument("name", type=_name_type)
    for action in actions.choices.values():
        action.add_argument("--api", type=_url_type, metavar="URL", help=api_help)
        action.set_defaults(ops_parser=action)


def run(
    args: argparse.Namespace,
    settings: Settings,
    *,
    transport: httpx.BaseTransport | None = None,
    output: Output | None = None,
) -> int:
    """Run one ``schedule`` action; its exit code."""
    output = output or Output()
    api = Api(args.api or settings.api_url.rstrip("/"), settings.api_token, transport)
    try:
        action = args.schedule_command
        if action == "set":
            return set_schedule(api, args, output)
        if action == "list":
            return list_schedules(api, args.limit, args.cursor, args.json, output)
        if action == "show":
            return show(api, args.name, args.json, output)
        if action == "delete":
            api.call("DELETE", f"/schedules/{args.name}")
            output.line(f"deleted {args.name}")
            return 0
        _, body = api.call("POST", f"/schedules/{args.name}/{action}")
        output.line(f"{args.name}: {'paused' if body.get('paused') else 'active'}")
        return 0
    except ApiError as exc:
        output.note(f"echo-at-time: {exc}")
        return 1
    finally:
        api.close()


def set_schedule(api: Api, args: argparse.Namespace, output: Output) -> int:
    body: dict[str, Any] = {"message": args.message, "paused": args.paused}
    if args.cron is not None:
        body["cron"] = args.cron
    if args.every is not None:
        body["every"] = args.every
    for flag, key in (("tz", "timezone"), ("start", "startAt"), ("end", "endAt")):
        if getattr(args, flag) is not None:
            body[key] = getattr(args, flag)
    _, answer = api.call("PUT", f"/schedules/{args.name}", ok=(200, 201), json=body)
    output.line(f"{args.name}: {answer.get('outcome')} (generation {answer.get('generation')})")
    return 0


def _how(item: dict[str, Any]) -> str:
    if item.get("cron"):
        return f"cron {item['cron']} {item.get('timezone', 'UTC')}"
    return f"every {item.get('every', '?')}"


def list_schedules(api: Api, limit: int, cursor: str | None, as_json: bool, output: Output) -> int:
    page = get_page(api, "/schedules", limit, cursor, as_json, output)
    if page is None:
        return 0
    items = page.get("items") or []
    unreadable = page.get("unreadable") or []
    if not items and not unreadable:
        output.line("no schedules")
    if items:
        output.line(f"{'NAME':<32}  {'STATE':<7}  {'WHEN':<40}  MESSAGE")
        for item in items:
            output.line(
                f"{_cell(item.get('name', '?'), 32):<32}  "
                f"{'paused' if item.get('paused') else 'active':<7}  "
                f"{_cell(_how(item), 40):<40}  {_cell(item.get('message', ''), 40)}"
            )
    for name in unreadable:
        output.line(
            f"{_cell(name, 32):<32}  unreadable: stored in a form this release cannot read, "
            "not run (schedule set or delete it)"
        )
    say_more(output, "schedule list", limit, page)
    return 0


def show(api: Api, name: str, as_json: bool, output: Output) -> int:
    _, item = api.call("GET", f"/schedules/{name}")
    if as_json:
        output.line(json.dumps(item, indent=2, sort_keys=True))
        return 0
    output.line(f"{item['name']}: {_how(item)}{' (paused)' if item.get('paused') else ''}")
    output.line(f"  message     {_cell(item.get('message', ''), 70)}")
    output.line(f"  generation  {item.get('generation')} since {iso_ms(item.get('createdAt', 0))}")
    for key, label in (("startAt", "starts"), ("endAt", "ends")):
        if key in item:
            output.line(f"  {label:<10}  {iso_ms(item[key])}")
    output.line("  next        " + (", ".join(iso_ms(t) for t in item.get("next", [])) or "-"))
    produced = item.get("produced") or []
    if produced:
        output.line("  produced")
        for p in produced:
            output.line(f"    {iso_ms(p['runAt'])}  {p['uuid']}  {p.get('state') or '-'}")
    return 0
