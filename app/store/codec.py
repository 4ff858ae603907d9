"""The storage format of a message in Redis, Python side (the Lua side is
``app/lua/_record.lua``). Pure functions, no I/O.

Format 2, chosen for memory and for cheap rewrites inside the scripts:

- a uuid is stored as its 16 raw bytes (hash field, sorted-set member, stream
  and dead entries' ``u``): 20 bytes less than its text per copy, and two copies
  of it live per delayed message;
- a sorted-set member is a 6-byte big-endian acceptance sequence followed by
  the uuid: fixed width, so equal runAt sort in acceptance order;
- a record is a fixed struct, not msgpack: the scripts rewrite it on every state
  change, and Lua's ``struct`` does that several times faster than ``cmsgpack``
  (about 1 µs against 4.7 µs, measured on Redis 7.0). Layout, big-endian::

      c1 I2 I6 I6 c1   state code, attempts, runAt ms, acceptedAt ms, first state code
      B  n x (c1 I6)   later transitions: state code -> ms after acceptedAt it was last entered
      B  ref           the member's sequence (scheduled, retrying), stream entry id
                       (queued) or dead entry id (dead)
      rest             the body while scheduled or retrying, else empty

  A scheduled record with a 100-byte body is 124 bytes: Redis keeps it in a
  128-byte allocation.

- a body is the message's UTF-8 bytes, or, for a message that names a webhook
  ``target``, an envelope: the byte 0xFF, the target's length (2 bytes, big-endian),
  the target (ASCII), then the message's UTF-8 bytes. 0xFF never occurs in UTF-8, so
  the first byte tells the two apart, and every body without a target is as before.
  The body travels whole (record, stream entry, dead entry, replay), so the target
  goes wherever the message goes without a script knowing of it.
"""

from __future__ import annotations

import re
import struct

from app.model import Record, State

FORMAT = 2
# Stream entry ids: <ms>-<seq>, each a 64-bit unsigned integer. [0-9], not \d, which
# matches the digits of every script (int() reads them, Redis does not).
STREAM_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}\Z")
SEQ_BYTES = 6
UUID_BYTES = 16

CODES = {
    "s": State.SCHEDULED,
    "q": State.QUEUED,
    "d": State.DELIVERED,
    "r": State.RETRYING,
    "x": State.DEAD,
    "c": State.CANCELLED,
}
CODE_OF = {state: code for code, state in CODES.items()}

_HEAD = struct.Struct(">cH6s6scB")
_MARK = struct.Struct(">c6s")


def _u48(raw: bytes) -> int:
    return int.from_bytes(raw, "big")


def _b48(value: int) -> bytes:
    return value.to_bytes(6, "big")


def uuid_key(text: str) -> bytes:
    """The stored form of a canonical uuid (as validated by ``app.model.normalize_uuid``)."""
    return bytes.fromhex(text.replace("-", ""))


def uuid_text(key: bytes) -> str:
    """The canonical text of a stored uuid."""
    h = key.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def uuid_text_or_none(key: bytes | None) -> str | None:
    """For entries that may not hold a uuid's 16 bytes (a dead-lettered legacy item)."""
    if key is None or len(key) != UUID_BYTES:
        return None
    return uuid_text(key)


def member(seq: int, key: bytes) -> bytes:
    """The sorted-set member of a message: its acceptance sequence, then its uuid."""
    return _b48(seq) + key


def member_uuid(value: bytes) -> str:
    """The uuid text of a sorted-set member."""
    return uuid_text(value[SEQ_BYTES:])


def encode_record(
    state: State,
    run_at: int,
    accepted_at: int,
    *,
    attempts: int = 0,
    first: State | None = None,
    marks: dict[State, int] | None = None,
    ref: bytes = b"",
    body: bytes = b"",
) -> bytes:
    """What the scripts write (used by tests to set up records; the scripts own the writes).

    ``marks`` maps a state to the epoch ms it was last entered, beyond the first one.
    """
    first = first or state
    marks = marks or {}
    out = [
        _HEAD.pack(
            CODE_OF[state].encode(),
            attempts,
            _b48(run_at),
            _b48(accepted_at),
            CODE_OF[first].encode(),
            len(marks),
        )
    ]
    for code, st in CODES.items():
        if st in marks:
            out.append(_MARK.pack(code.encode(), _b48(marks[st] - accepted_at)))
    out.append(bytes([len(ref)]) + ref + body)
    return b"".join(out)


class CorruptRecord(ValueError):
    """A stored record that is not of this format (written by hand, or damaged): the scripts
    quarantine such a record when they meet it (``app/store/lua/_record.lua``)."""

    def __init__(self, uuid: str, problem: str) -> None:
        super().__init__(f"the record of {uuid} cannot be decoded: {problem}")
        self.uuid = uuid


def decode_record(uuid: str, packed: bytes) -> Record:
    """Inverse of the scripts' ``rec_encode`` (``app/lua/_record.lua``); CorruptRecord when
    ``packed`` is not a record."""
    try:
        return _decode_record(uuid, packed)
    except (struct.error, KeyError, IndexError, UnicodeDecodeError) as exc:
        raise CorruptRecord(uuid, f"{type(exc).__name__}: {exc}") from None


def _decode_record(uuid: str, packed: bytes) -> Record:
    code, attempts, run_at, accepted, first, n = _HEAD.unpack_from(packed)
    accepted_at = _u48(accepted)
    pos = _HEAD.size
    transitions = {CODES[first.decode()].value: accepted_at}
    for _ in range(n):
        mark, offset = _MARK.unpack_from(packed, pos)
        pos += _MARK.size
        transitions[CODES[mark.decode()].value] = accepted_at + _u48(offset)
    ref_len = packed[pos]
    ref = packed[pos + 1 : pos + 1 + ref_len]
    state = CODES[code.decode()]
    if state in (State.SCHEDULED, State.RETRYING) and len(ref) == SEQ_BYTES:
        ref_text: str | None = f"{_u48(ref):012x}"
    else:
        ref_text = ref.decode() if ref else None
    return Record(
        uuid=uuid,
        state=state,
        run_at=_u48(run_at),
        attempts=attempts,
        accepted_at=accepted_at,
        updated_at=max(transitions.values()),
        transitions=transitions,
        ref=ref_text,
    )


def record_body(packed: bytes) -> bytes:
    """The body a scheduled or retrying record holds (empty in other states)."""
    pos = _HEAD.size + _MARK.size * packed[_HEAD.size - 1]
    return packed[pos + 1 + packed[pos] :]


ENVELOPE = 0xFF  # first byte of a body carrying a target: never a byte of UTF-8
_TARGET_LEN = struct.Struct(">H")  # the target's length in an envelope


def pack_body(message: str, target: str | None) -> bytes:
    """The stored body of a message (see the module docstring)."""
    if target is None:
        return message.encode("utf-8")
    raw = target.encode("ascii")
    return b"\xff" + _TARGET_LEN.pack(len(raw)) + raw + message.encode("utf-8")


def split_body(body: bytes) -> tuple[bytes, str | None]:
    """The message's bytes and the target of a stored body (None: it names none).
    ValueError for an envelope that is cut short."""
    if not body or body[0] != ENVELOPE:
        return body, None
    size = int.from_bytes(body[1:3], "big")
    end = 3 + size
    if len(body) < end:
        raise ValueError("the body's target is cut short")
    return body[end:], body[3:end].decode("ascii")  # UnicodeDecodeError is a ValueError
