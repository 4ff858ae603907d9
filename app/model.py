"""Plain data: the request body, message states, stored records. No I/O here.

msgspec decodes and validates the JSON body in one C pass (type checks,
required and unknown fields), several times faster than pydantic, which the
ingest throughput of a single API process depends on.
"""

from __future__ import annotations

import enum
import json
import re
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any

import msgspec

# 0 .. 9999-12-31T23:59:59.999Z in epoch milliseconds: a date any client can mean.
RUN_AT_MIN = 0
RUN_AT_MAX = 253402300799999
TARGET_MAX_BYTES = 2048  # a webhook target URL (app.targets checks the rest)

_CANONICAL_UUID = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z"
)
_PATH_FIELD = re.compile(r"at `\$\.(\w+)")
_MISSING = re.compile(r"missing required field `(\w+)`")
_UNKNOWN = re.compile(r"unknown field `([^`]*)`")
NESTED_TOO_DEEPLY = "malformed JSON: nested too deeply"


class State(enum.StrEnum):
    """A message's life. Transitions, each made by one Lua script:

    scheduled --promote--> queued --ack--> delivered
    queued --handler error, attempts left--> retrying --promote--> queued
    queued --handler error or reclaim, no attempts left--> dead
    scheduled or retrying --cancel--> cancelled
    scheduled or retrying --reschedule to a passed time--> queued
    dead --replay--> queued
    """

    SCHEDULED = "scheduled"  # in the delayed sorted set, runAt in the future
    QUEUED = "queued"  # in the stream, waiting for or held by a worker
    DELIVERED = "delivered"  # handled and acknowledged; kept for the retention window
    RETRYING = "retrying"  # the handler failed; back in the sorted set with backoff
    DEAD = "dead"  # deliveries exhausted; in the dead stream
    CANCELLED = "cancelled"  # cancelled before it ran


class SaveMessage(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Body of ``POST /api/v1/save-message``."""

    message: str
    runAt: int  # the wire name, kept from the original service
    uuid: str | None = None
    target: str | None = None  # a webhook URL (app.targets checks it, not this module)


class InvalidInput(ValueError):
    """Bad input, with the field it concerns (None when it is about the whole body)."""

    def __init__(self, error: str, field: str | None = None, status: int = 422) -> None:
        super().__init__(error)
        self.error = error
        self.field = field
        self.status = status


class NewMessage(msgspec.Struct, frozen=True, gc=False):
    """A validated message ready for the accept script (a Struct: built in C, once per
    message on the ingest path)."""

    uuid: str
    message: str
    run_at: int
    target: str | None = None  # the webhook URL it names, checked (app.targets)


def field_names(struct: type[msgspec.Struct]) -> tuple[str, ...]:
    """The names a struct's fields have in JSON."""
    return tuple(f.encode_name for f in msgspec.structs.fields(struct))


class _Members(list):
    """A JSON object as its (name, value) pairs in order, a repeated name kept."""


def _as_text(text: str) -> str:
    # Numbers stay text: no cost, and no limit (int() refuses over 4,300 digits).
    return text


class RepeatedKeys:
    """Finds a member that a JSON body's top-level object names twice, among ``names``.

    JSON parsers disagree on a repeated key: msgspec and Python's json keep the last,
    many others the first. A proxy or firewall that reads the first ``"uuid"`` and a
    service that stores the last would disagree on the idempotency key, so a body that
    repeats one is refused. msgspec has no option for it; this looks at the bytes of a
    body it has decoded, in two steps:

    - at C speed: when no name's quoted form (``"uuid"``) occurs twice and no ``\\u``
      escape occurs at all, none of ``names`` can be repeated. A key written plainly is
      counted; one written with escapes (``"u\\u0075id"`` is ``uuid``) contains ``\\u``,
      the only JSON escape that stands for a letter. A quoted name inside a string
      value only makes the second step run.
    - otherwise exactly: :func:`json.loads` lists the top-level object's members.

    Only the top-level object matters: the API's structs refuse unknown fields and hold
    no objects (a bulk body's items are checked one by one), and a legacy item's unknown
    fields are ignored, repeated or not.
    """

    def __init__(self, names: tuple[str, ...]) -> None:
        if not all(name.isascii() and name.isalpha() for name in names):
            raise ValueError(f"{names}: the quick step holds for names of ASCII letters only")
        self.names = frozenset(names)
        self._quoted = tuple(b'"%s"' % name.encode() for name in names)

    def find(self, body: bytes) -> str | None:
        """The first of ``names`` repeated, or None; InvalidInput 400 if ``body`` needs the
        exact step and Python's parser refuses it."""
        if body.find(b"\\u") < 0:
            for quoted in self._quoted:
                if body.count(quoted) > 1:
                    break
            else:
                return None
        try:
            top = json.loads(
                body,
                object_pairs_hook=_Members,
                parse_int=_as_text,
                parse_float=_as_text,
                parse_constant=_as_text,
            )
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise InvalidInput(f"malformed JSON: {type(exc).__name__}", None, 400) from None
        if not isinstance(top, _Members):
            return None
        seen: set[str] = set()
        for name, _ in top:
            if name in self.names:
                if name in seen:
                    return name
                seen.add(name)
        return None

    def refuse(self, body: bytes) -> None:
        """Raise InvalidInput 422 naming the first of ``names`` that ``body`` repeats."""
        name = self.find(body)
        if name is not None:
            raise InvalidInput(f"repeated key: {name}", name)


class BodyDecoder:
    """Decodes one kind of JSON body: every JSON body of the API is read by one.

    InvalidInput 400 for malformed JSON (nested too deeply included), 422 naming the
    field for a wrong type, a missing, an unknown or a repeated field.

    :param kind: what msgspec decodes the body into.
    :param keys: the members whose repetition is refused (default: the fields of
        ``kind``, a Struct).
    """

    def __init__(self, kind: Any, keys: tuple[str, ...] | None = None) -> None:
        self._decoder = msgspec.json.Decoder(kind)
        self._keys = RepeatedKeys(field_names(kind) if keys is None else keys)

    def decode(self, body: bytes) -> Any:
        value = _decode(body, self._decoder)
        self._keys.refuse(body)
        return value


def _decode(body: bytes, decoder: msgspec.json.Decoder) -> Any:
    """msgspec's decode, its errors as InvalidInput naming the field where it can."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if missing := _MISSING.search(text):
            raise InvalidInput(f"field is required: {missing.group(1)}", missing.group(1)) from None
        if unknown := _UNKNOWN.search(text):
            raise InvalidInput(f"unknown field: {unknown.group(1)}", unknown.group(1)) from None
        match = _PATH_FIELD.search(text)
        raise InvalidInput(text, match.group(1) if match else None) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec raises UnicodeDecodeError for invalid UTF-8 inside a JSON string.
        raise InvalidInput(f"malformed JSON: {exc}", None, status=400) from None
    except RecursionError:
        # msgspec stops at Python's recursion limit (a value it skips or keeps raw included).
        raise InvalidInput(NESTED_TOO_DEEPLY, None, status=400) from None


_save_message = msgspec.json.Decoder(SaveMessage)
_save_message_keys = RepeatedKeys(field_names(SaveMessage))


def parse_save_message(body: bytes, max_message_bytes: int) -> NewMessage:
    """Decode and validate one body; raise InvalidInput naming the field."""
    req = _decode(body, _save_message)
    # The ingest path's quicker proof that no key repeats, one C pass: valid JSON holds a
    # '"' byte only where a string opens or closes, or escaped (\"), so it has at least
    # twice as many as strings. A body that decoded to ``req`` holds at least 3 strings
    # (message's name and value, runAt's name), 5 with a uuid, and a repeated key (an
    # escaped one too) adds at least one more: exactly 6 (10) quotes rule a repeat out;
    # a target adds 4 (its name and value), like a uuid.
    expected = 6 + (4 if req.uuid is not None else 0) + (4 if req.target is not None else 0)
    long = len(body) > _COUNT_QUOTES
    quotes = _quotes_up_to(body, expected + 1) if long else body.count(b'"')
    if quotes != expected:
        _save_message_keys.refuse(body)
    return validate(req, max_message_bytes)


_COUNT_QUOTES = 4096  # bytes: in a longer body, finding a few quotes beats counting them


def _quotes_up_to(body: bytes, most: int) -> int:
    """How many '"' ``body`` holds, up to ``most``: one memchr per quote (a large
    message holds none unescaped, and is skipped at memchr's speed)."""
    found, at = 0, body.find(b'"')
    while at >= 0 and found < most:
        found += 1
        at = body.find(b'"', at + 1)
    return found


def validate(req: SaveMessage, max_message_bytes: int) -> NewMessage:
    # bool is an int subclass in Python but not a time.
    if isinstance(req.runAt, bool) or not RUN_AT_MIN <= req.runAt <= RUN_AT_MAX:
        raise InvalidInput(
            f"runAt must be epoch milliseconds between {RUN_AT_MIN} and {RUN_AT_MAX}", "runAt"
        )
    try:
        size = len(req.message.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput("message is not valid Unicode (lone surrogate)", "message") from None
    if size > max_message_bytes:
        raise InvalidInput(
            f"message is {size} bytes; the limit is {max_message_bytes}", "message", 413
        )
    if req.target is None:
        return NewMessage(uuid=normalize_uuid(req.uuid), message=req.message, run_at=req.runAt)
    if len(req.target) > TARGET_MAX_BYTES:
        raise InvalidInput(
            f"target is {len(req.target)} characters; the limit is {TARGET_MAX_BYTES}", "target"
        )
    return NewMessage(normalize_uuid(req.uuid), req.message, req.runAt, req.target)


def normalize_uuid(value: str | None) -> str:
    """A canonical lower-case UUID: the given one, or a new random one when absent."""
    if value is None:
        return str(uuidlib.uuid4())
    if not _CANONICAL_UUID.match(value):
        raise InvalidInput(
            "uuid must be a canonical UUID like 123e4567-e89b-12d3-a456-426614174000", "uuid"
        )
    return value.lower()


@dataclass(frozen=True, slots=True)
class Record:
    """What Redis holds about one message (``{prefix}:messages`` field; see ``app.store.codec``)."""

    uuid: str
    state: State
    run_at: int
    attempts: int
    accepted_at: int
    updated_at: int
    # state -> epoch ms it last entered that state
    transitions: dict[str, int] = field(default_factory=dict)
    # the sorted-set member's sequence (12 hex digits) while scheduled/retrying; the stream
    # entry id while queued; the dead entry id while dead; None otherwise
    ref: str | None = None

    def public(self) -> dict[str, object]:
        return {
            "uuid": self.uuid,
            "runAt": self.run_at,
            "state": self.state.value,
            "attempts": self.attempts,
        }
