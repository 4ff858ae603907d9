"""The save-message body: what is accepted, what is refused, and which field is named."""

from __future__ import annotations

import json
import re
import uuid as uuidlib

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.model import (
    RUN_AT_MAX,
    InvalidInput,
    NewMessage,
    RepeatedKeys,
    SaveMessage,
    parse_save_message,
    validate,
)

LIMIT = 64
UUID = "123e4567-e89b-12d3-a456-426614174000"
LOWER_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def refused(raw: bytes, limit: int = LIMIT) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        parse_save_message(raw, limit)
    return info.value


# --- valid bodies ---------------------------------------------------------------------------


def test_valid_body_with_uuid_is_returned_as_a_new_message():
    msg = parse_save_message(body(message="hello", runAt=1700000000000, uuid=UUID), LIMIT)
    assert msg == NewMessage(uuid=UUID, message="hello", run_at=1700000000000)


@pytest.mark.parametrize("run_at", [0, 1, 1700000000000, RUN_AT_MAX])
def test_run_at_bounds_inclusive_are_accepted(run_at: int):
    assert parse_save_message(body(message="m", runAt=run_at), LIMIT).run_at == run_at


def test_empty_message_is_accepted():
    assert parse_save_message(body(message="", runAt=5), LIMIT).message == ""


def test_message_of_exactly_the_limit_in_utf8_bytes_is_accepted():
    text = "é" * (LIMIT // 2)  # 2 bytes each
    assert len(text.encode()) == LIMIT
    assert parse_save_message(body(message=text, runAt=5), LIMIT).message == text


def test_field_order_does_not_matter():
    raw = b'{"uuid": "%s", "runAt": 7, "message": "x"}' % UUID.encode()
    assert parse_save_message(raw, LIMIT) == NewMessage(uuid=UUID, message="x", run_at=7)


# --- uuid ------------------------------------------------------------------------------------


@pytest.mark.parametrize("given_uuid", [UUID, UUID.upper(), "123E4567-e89b-12D3-A456-426614174000"])
def test_uuid_of_any_case_is_accepted_and_normalized_to_lower_case(given_uuid: str):
    assert parse_save_message(body(message="m", runAt=1, uuid=given_uuid), LIMIT).uuid == UUID


@pytest.mark.parametrize(
    "bad",
    [
        "{" + UUID + "}",
        UUID.replace("-", ""),
        "urn:uuid:" + UUID,
        UUID + "\n",  # a regex ending in `$` lets a trailing newline through
        " " + UUID,
        UUID + " ",
        UUID[:-1],
        UUID + "0",
        UUID.replace("a", "g"),
        "",
        "not-a-uuid",
        "\uff1123e4567-e89b-12d3-a456-426614174000",  # full-width digit one
    ],
)
def test_non_canonical_uuid_is_refused_naming_uuid(bad: str):
    err = refused(body(message="m", runAt=1, uuid=bad))
    assert (err.status, err.field) == (422, "uuid")


def test_uuid_of_wrong_type_is_refused_naming_uuid():
    err = refused(body(message="m", runAt=1, uuid=12))
    assert (err.status, err.field) == (422, "uuid")


@pytest.mark.parametrize("raw", [body(message="m", runAt=1), body(message="m", runAt=1, uuid=None)])
def test_absent_or_null_uuid_gets_a_fresh_random_canonical_one(raw: bytes):
    first = parse_save_message(raw, LIMIT).uuid
    second = parse_save_message(raw, LIMIT).uuid
    assert LOWER_UUID_RE.match(first) and LOWER_UUID_RE.match(second)
    assert first != second
    assert uuidlib.UUID(first).version == 4


# --- missing, wrong-typed and unknown fields ----------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (body(runAt=1), "message"),
        (body(message="m"), "runAt"),
        (body(), "message"),
        (body(uuid=UUID, runAt=1), "message"),
    ],
)
def test_missing_required_field_is_refused_naming_it(raw: bytes, field: str):
    err = refused(raw)
    assert (err.status, err.field) == (422, field)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"message": "m", "runAt": "1700000000000"}', "runAt"),
        (b'{"message": "m", "runAt": 1.5}', "runAt"),
        (b'{"message": "m", "runAt": 1.0}', "runAt"),
        (b'{"message": "m", "runAt": 1e3}', "runAt"),
        (b'{"message": "m", "runAt": true}', "runAt"),
        (b'{"message": "m", "runAt": false}', "runAt"),
        (b'{"message": "m", "runAt": null}', "runAt"),
        (b'{"message": "m", "runAt": [1]}', "runAt"),
        (b'{"message": null, "runAt": 1}', "message"),
        (b'{"message": 5, "runAt": 1}', "message"),
        (b'{"message": {"a": 1}, "runAt": 1}', "message"),
        (b'{"message": ["m"], "runAt": 1}', "message"),
    ],
)
def test_wrong_type_is_refused_naming_the_field(raw: bytes, field: str):
    err = refused(raw)
    assert (err.status, err.field) == (422, field)


def test_bool_run_at_is_refused_even_when_built_directly():
    # bool is an int subclass in Python: the model must not take True for 1 ms.
    with pytest.raises(InvalidInput) as info:
        validate(SaveMessage(message="m", runAt=True), LIMIT)
    assert info.value.field == "runAt"


@pytest.mark.parametrize("name", ["extra", "run_at", "Message", "UUID", ""])
def test_unknown_field_is_refused_naming_it(name: str):
    raw = json.dumps({"message": "m", "runAt": 1, name: 1}).encode()
    err = refused(raw)
    assert (err.status, err.field) == (422, name)


# --- runAt range ---------------------------------------------------------------------------


@pytest.mark.parametrize("run_at", [-1, -(2**63), RUN_AT_MAX + 1, 2**63 - 1, 2**63, 2**64, 10**30])
def test_run_at_outside_year_0_to_9999_is_refused_naming_run_at(run_at: int):
    err = refused(body(message="m", runAt=run_at))
    assert (err.status, err.field) == (422, "runAt")


# --- message size --------------------------------------------------------------------------


def test_message_over_the_limit_in_utf8_bytes_is_413_naming_message():
    text = "é" * (LIMIT // 2 + 1)  # fewer characters than the limit, more bytes
    assert len(text) < LIMIT < len(text.encode())
    err = refused(body(message=text, runAt=1))
    assert (err.status, err.field) == (413, "message")


def test_four_byte_characters_count_as_four_bytes():
    text = "😀" * (LIMIT // 4)
    assert parse_save_message(body(message=text, runAt=1), LIMIT).message == text
    err = refused(body(message=text + "a", runAt=1))
    assert (err.status, err.field) == (413, "message")


def test_ascii_message_one_byte_over_the_limit_is_413():
    err = refused(body(message="a" * (LIMIT + 1), runAt=1))
    assert (err.status, err.field) == (413, "message")


# --- malformed and non-object bodies -------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b'{"message": "m", "runAt": 1',
        b"{message: 'm'}",
        b'{"message": "m", "runAt": 1,}',
        b"\xff",
        b'{"message": "m", "runAt": 1} trailing',
    ],
)
def test_malformed_json_is_400_with_no_field(raw: bytes):
    err = refused(raw)
    assert (err.status, err.field) == (400, None)


def test_invalid_utf8_inside_a_string_is_400_not_a_crash():
    # msgspec raises UnicodeDecodeError here, not DecodeError; it must still be a 400.
    err = refused(b'{"message": "\xff\xfe", "runAt": 1}')
    assert (err.status, err.field) == (400, None)


@pytest.mark.parametrize("raw", [b"[]", b'[{"message": "m", "runAt": 1}]', b"1", b'"m"', b"null"])
def test_json_array_or_scalar_body_is_422_with_no_field(raw: bytes):
    err = refused(raw)
    assert (err.status, err.field) == (422, None)


# --- lone surrogates -------------------------------------------------------------------------


@pytest.mark.parametrize("escape", [b"\\ud800", b"\\udfff", b"a\\ud800b", b"\\udc00\\ud800"])
def test_lone_surrogate_escape_in_message_is_refused_before_reaching_redis(escape: bytes):
    # msgspec refuses a lone surrogate escape as malformed JSON: it never becomes a message.
    err = refused(b'{"message": "' + escape + b'", "runAt": 1}')
    assert err.status == 400


def test_paired_surrogate_escape_is_a_valid_character():
    msg = parse_save_message(b'{"message": "\\ud83d\\ude00", "runAt": 1}', LIMIT)
    assert msg.message == "😀"


def test_lone_surrogate_given_to_validate_directly_is_refused_naming_message():
    # Other entry points (e.g. a legacy bridge decoding with the stdlib json module, which
    # accepts lone surrogates) go through validate(); Redis must never get unencodable text.
    with pytest.raises(InvalidInput) as info:
        validate(SaveMessage(message="x\ud800", runAt=1), LIMIT)
    assert info.value.field == "message"


# --- every input: a NewMessage or InvalidInput, nothing else -------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
field_names = st.sampled_from(["message", "runAt", "uuid"]) | st.text(max_size=8)
field_values = (
    json_values
    | st.integers(min_value=-5, max_value=RUN_AT_MAX + 5)
    | st.uuids().map(str)
    | st.uuids().map(lambda u: str(u).upper())
)


def check_outcome(raw: bytes, limit: int) -> None:
    try:
        result = parse_save_message(raw, limit)
    except InvalidInput as exc:
        assert exc.status in (400, 413, 422)
        assert exc.field is None or isinstance(exc.field, str)
        assert isinstance(exc.error, str) and exc.error
        return
    assert isinstance(result, NewMessage)
    assert LOWER_UUID_RE.match(result.uuid)
    assert 0 <= result.run_at <= RUN_AT_MAX
    assert len(result.message.encode("utf-8")) <= limit


@settings(max_examples=300, deadline=None)
@given(
    obj=st.dictionaries(field_names, field_values, max_size=5) | json_values,
    ensure_ascii=st.booleans(),
    limit=st.integers(min_value=1, max_value=64),
)
def test_any_json_input_gives_a_new_message_or_invalid_input(
    obj: object, ensure_ascii: bool, limit: int
):
    try:
        raw = json.dumps(obj, ensure_ascii=ensure_ascii).encode("utf-8")
    except UnicodeEncodeError:
        raw = json.dumps(obj).encode("ascii")  # lone surrogates: \ud800 escapes
    check_outcome(raw, limit)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=64))
def test_any_bytes_give_a_new_message_or_invalid_input(raw: bytes):
    check_outcome(raw, LIMIT)


# --- repeated keys -------------------------------------------------------------------------------

A = "00000000-0000-4000-8000-00000000000a"
B = "00000000-0000-4000-8000-00000000000b"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (
            b'{"message": "m", "runAt": 1, "uuid": "%s", "uuid": "%s"}' % (A.encode(), B.encode()),
            "uuid",
        ),
        (
            b'{"message": "m", "runAt": 1, "uuid": "%s", "uuid": "%s"}' % (A.encode(), A.encode()),
            "uuid",
        ),
        (b'{"uuid": null, "message": "m", "runAt": 1, "uuid": "%s"}' % A.encode(), "uuid"),
        (
            b'{"message": "m", "runAt": 1, "u\\u0075id": "%s", "uuid": "%s"}'
            % (A.encode(), B.encode()),
            "uuid",
        ),
        (
            b'{"message": "m", "runAt": 1, "\\u0075\\u0075\\u0069\\u0064": "%s", "uuid": null}'
            % A.encode(),
            "uuid",
        ),
        (b'{"message": "a", "message": "b", "runAt": 1}', "message"),
        (b'{"message": "a", "runAt": 1, "runAt": 2}', "runAt"),
        (b'{"message": "a", "runAt": 1, "run\\u0041t": 2}', "runAt"),
        (b'{"message":"a","runAt":1,"runAt" :2,"uuid":"%s"}' % A.encode(), "runAt"),
    ],
)
def test_a_repeated_key_is_refused_naming_it_however_it_is_written(raw: bytes, field: str):
    # Before: accepted, the last value winning; a proxy reading the first one disagreed.
    error = refused(raw)
    assert (error.status, error.field, error.error) == (422, field, f"repeated key: {field}")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"message": "say \\"uuid\\": \\"x\\"", "runAt": 1, "uuid": "%s"}' % A.encode(),
        b'{"message": "\\"message\\"", "runAt": 1}',
        b'{"message": "caf\\u00e9 \\"runAt\\"", "runAt": 1, "uuid": null}',
        b'{"message": "m", "runAt": 1, "u\\u0075id": "%s"}' % A.encode(),
        b'{"message": "C:\\\\users", "runAt": 1}',
        b'{"uuid": null, "message": "m", "runAt": 1}',
    ],
)
def test_a_key_named_once_is_not_a_repeat_whatever_the_values_or_escapes(raw: bytes):
    assert parse_save_message(raw, LIMIT).run_at == 1


def test_the_quick_proof_of_no_repeat_counts_the_fields_save_message_has():
    # parse_save_message counts the strings of a body by these fields and types; a change
    # here needs that count looked at again.
    fields = {f.encode_name: (f.type, f.required) for f in msgspec.structs.fields(SaveMessage)}
    assert fields == {
        "message": (str, True),
        "runAt": (int, True),
        "uuid": (str | None, False),
        "target": (str | None, False),
    }


def test_repeated_keys_are_looked_for_only_among_names_of_ascii_letters():
    with pytest.raises(ValueError, match="ASCII letters"):
        RepeatedKeys(("a_b",))


@st.composite
def written(draw: st.DrawFn, text: str) -> str:
    """``text`` as a JSON string, each character plain or as a \\u escape (any hex case)."""
    out = []
    for char in text:
        if char.isascii() and char.isalnum() and draw(st.booleans()):
            out.append(char)
        else:
            escape = f"\\u{ord(char):04x}" if ord(char) < 0x10000 else json.dumps(char)[1:-1]
            out.append(escape.upper().replace("\\U", "\\u") if draw(st.booleans()) else escape)
    return '"' + "".join(out) + '"'


space = st.text(alphabet=" \t\r\n", max_size=2)
message_text = (
    st.text(max_size=12)
    | st.sampled_from(['"uuid"', '"message": "x"', "\\u", "\\"])
    # Past 4 KiB the quick proof finds quotes one by one instead of counting them all.
    | st.tuples(st.text(max_size=4), st.integers(4100, 5000)).map(lambda t: t[0] + "y" * t[1])
)


@st.composite
def members(draw: st.DrawFn) -> tuple[dict[str, object], list[tuple[str, str]]]:
    """The fields of a valid message and its members, as (name, value) JSON texts."""
    message = draw(message_text.filter(lambda t: not any("\ud800" <= c <= "\udfff" for c in t)))
    run_at = draw(st.integers(min_value=0, max_value=RUN_AT_MAX))
    uuid = draw(st.none() | st.uuids().map(str))
    given = {"message": message, "runAt": run_at}
    texts = [
        ("message", json.dumps(message, ensure_ascii=draw(st.booleans()))),
        ("runAt", str(run_at)),
    ]
    if uuid is not None or draw(st.booleans()):
        texts.append(("uuid", json.dumps(uuid)))
    given["uuid"] = uuid
    return given, texts


def render(draw: st.DrawFn, texts: list[tuple[str, str]]) -> bytes:
    parts = [
        f"{draw(space)}{draw(written(name))}{draw(space)}:{draw(space)}{value}{draw(space)}"
        for name, value in texts
    ]
    return ("{" + ",".join(parts) + "}").encode()


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_every_way_of_writing_a_body_without_a_repeat_is_accepted(data: st.DataObject):
    given_fields, texts = data.draw(members())
    raw = render(data.draw, data.draw(st.permutations(texts)))
    msg = parse_save_message(raw, 10_000)
    assert (msg.message, msg.run_at) == (given_fields["message"], given_fields["runAt"])
    assert given_fields["uuid"] is None or msg.uuid == given_fields["uuid"]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_every_way_of_writing_a_repeated_key_is_refused(data: st.DataObject):
    _, texts = data.draw(members())
    again = data.draw(st.sampled_from(texts))
    raw = render(data.draw, data.draw(st.permutations([*texts, again])))
    error = refused(raw, 10_000)
    assert (error.status, error.field) == (422, again[0]), error.error
