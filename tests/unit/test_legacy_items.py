"""Legacy list items and names: parsed as the API would, uuids derived deterministically."""

from __future__ import annotations

import json
import uuid as uuidlib

import pytest

from app.settings import Settings, SettingsError, hash_tag
from app.store.keys import LegacyLists
from election.bridge import MalformedItem, legacy_uuid, parse_item

UUID = "123e4567-e89b-12d3-a456-426614174000"
OTHER = "00000000-0000-4000-8000-000000000001"
LIMIT = 65536


def raw(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_a_well_formed_item_becomes_the_same_message_the_api_would_accept() -> None:
    msg = parse_item(raw(message="hello", runAt=1795843243061, uuid=UUID.upper()), LIMIT)
    assert (msg.uuid, msg.message, msg.run_at) == (UUID, "hello", 1795843243061)


def test_unknown_fields_of_old_producers_are_ignored() -> None:
    msg = parse_item(raw(message="m", runAt=5, uuid=UUID, type="legacy", retries=0), LIMIT)
    assert msg.uuid == UUID


def test_an_item_without_uuid_gets_one_derived_from_its_bytes_so_a_redrive_repeats_it() -> None:
    item = raw(message="hello", runAt=5)
    first, second = parse_item(item, LIMIT), parse_item(bytes(item), LIMIT)
    assert first.uuid == second.uuid == legacy_uuid(item)
    assert uuidlib.UUID(first.uuid).version == 5
    assert parse_item(raw(message="hello", runAt=6), LIMIT).uuid != first.uuid
    assert parse_item(raw(message="hello", runAt=5, uuid=None), LIMIT).uuid == legacy_uuid(
        raw(message="hello", runAt=5, uuid=None)
    )


def test_legacy_uuid_is_stable_across_releases() -> None:
    # A new namespace or hashing would turn every item left in flight into a new message.
    assert legacy_uuid(b'{"message":"hello","runAt":5}') == "dd3cbe74-8740-562d-a59b-1336a7a9c511"


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        (b"{not json", "malformed JSON"),
        (b"", "malformed JSON"),
        (b"\xff\xfe", "malformed JSON"),
        (b"null", "invalid legacy item"),
        (b"[1, 2]", "invalid legacy item"),
        (raw(runAt=5), "missing required field `message`"),
        (raw(message="m"), "missing required field `runAt`"),
        (raw(message=5, runAt=5), "Expected `str`"),
        (raw(message="m", runAt="5"), "Expected `int`"),
        (raw(message="m", runAt=1.5), "Expected `int`"),
        (raw(message="m", runAt=True), "Expected `int`"),
        (raw(message="m", runAt=-1), "invalid runAt"),
        (raw(message="m", runAt=253402300800000), "invalid runAt"),
        (raw(message="m", runAt=5, uuid="nope"), "invalid uuid"),
        (raw(message="m", runAt=5, uuid=7), "Expected `str | null`"),
        (raw(message="x" * (LIMIT + 1), runAt=5), "invalid message"),
        (raw(message="\ud800", runAt=5), "malformed JSON"),  # a lone surrogate
    ],
)
def test_malformed_items_are_refused_with_a_reason(item: bytes, reason: str) -> None:
    with pytest.raises(MalformedItem) as info:
        parse_item(item, LIMIT)
    assert reason in info.value.reason


def test_a_malformed_item_keeps_what_can_be_read_of_it_for_the_dead_stream() -> None:
    with pytest.raises(MalformedItem) as info:
        parse_item(raw(message="keep me", runAt="tomorrow", uuid=UUID.upper()), LIMIT)
    assert (info.value.uuid, info.value.message, info.value.run_at) == (UUID, "keep me", None)

    garbage = b"{not json"
    with pytest.raises(MalformedItem) as info:
        parse_item(garbage, LIMIT)
    assert (info.value.uuid, info.value.message, info.value.run_at) == (
        legacy_uuid(garbage),
        None,
        None,
    )

    with pytest.raises(MalformedItem) as info:
        parse_item(raw(message="x" * (LIMIT + 1), runAt=-1), LIMIT)
    assert (info.value.message, info.value.run_at) == (None, None)

    with pytest.raises(MalformedItem) as info:
        parse_item(raw(message="m", runAt=7, uuid="bad"), LIMIT)
    assert info.value.run_at == 7
    assert info.value.uuid == legacy_uuid(raw(message="m", runAt=7, uuid="bad"))


DEEP = 5000  # far past Python's recursion limit, which both msgspec and json obey


def nested(depth: int = DEEP) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        pytest.param(
            b'{"message": "m", "runAt": 5, "extra": ' + nested() + b"}",
            "nested too deeply",
            id="unknown-field",
        ),
        pytest.param(b'{"message": ' + nested() + b', "runAt": 5}', "Expected `str`", id="message"),
        pytest.param(b'{"message": "m", "runAt": ' + nested() + b"}", "Expected `int`", id="runAt"),
        pytest.param(nested(), "Expected `object`", id="whole-item"),
        pytest.param(b'{"a": ' * DEEP + b"1" + b"}" * DEEP, "nested too deeply", id="objects"),
    ],
)
def test_an_item_nested_too_deeply_is_malformed_not_a_crash(item: bytes, reason: str) -> None:
    # Before: RecursionError from the decoder or from the salvage step, which killed the bridge.
    with pytest.raises(MalformedItem) as info:
        parse_item(item, LIMIT)
    assert reason in info.value.reason
    assert info.value.uuid == legacy_uuid(item)
    assert (info.value.message, info.value.run_at) == (None, None)


@pytest.mark.parametrize(
    ("item", "repeated", "salvaged"),
    [
        (
            b'{"message": "m", "runAt": 5, "uuid": "%s", "uuid": "%s"}'
            % (UUID.encode(), OTHER.encode()),
            "uuid",
            ("m", 5),
        ),
        (
            b'{"message": "m", "runAt": 5, "u\\u0075id": "%s", "uuid": null}' % UUID.encode(),
            "uuid",
            ("m", 5),
        ),
        (b'{"message": "a", "message": "b", "runAt": 5}', "message", (None, 5)),
        (
            b'{"message": "m", "runAt": 5, "runAt": 6, "uuid": "%s"}' % UUID.encode(),
            "runAt",
            ("m", None),
        ),
    ],
)
def test_an_item_with_a_repeated_key_is_malformed_and_none_of_its_values_is_trusted(
    item: bytes, repeated: str, salvaged: tuple[str | None, int | None]
) -> None:
    # Before: accepted with the last value, where a reader of the first saw another message.
    with pytest.raises(MalformedItem) as info:
        parse_item(item, LIMIT)
    assert info.value.reason == f"repeated key: {repeated}"
    assert (info.value.message, info.value.run_at) == salvaged
    if repeated == "uuid":
        assert info.value.uuid == legacy_uuid(item)


def test_an_unknown_field_repeated_is_ignored_like_any_unknown_field() -> None:
    item = b'{"message": "m", "runAt": 5, "type": 1, "type": 2, "uuid": "%s"}' % UUID.encode()
    assert parse_item(item, LIMIT).uuid == UUID


# -- names -------------------------------------------------------------------------------


def test_default_legacy_names_are_the_original_services_unprefixed() -> None:
    assert LegacyLists.of(Settings()) == LegacyLists("QueueDelayed", "Queue", "QueueDead")
    assert LegacyLists.of(Settings(prefix="other")) == LegacyLists.of(Settings())
    assert Settings().legacy_bridge is True


@pytest.mark.parametrize(
    ("key", "tag"),
    [
        ("Queue", None),
        ("{legacy}Queue", "legacy"),
        ("a{b}c{d}", "b"),
        ("{}Queue", None),
        ("{Queue", None),
        ("}{x}", "x"),
    ],
)
def test_hash_tag_follows_redis_cluster_rules(key: str, tag: str | None) -> None:
    assert hash_tag(key) == tag


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"EAT_LEGACY_QUEUE": "has space"}, "EAT_LEGACY_QUEUE"),
        ({"EAT_LEGACY_DELAYED": "x" * 257}, "EAT_LEGACY_DELAYED"),
        ({"EAT_LEGACY_IN_FLIGHT": "é"}, "EAT_LEGACY_IN_FLIGHT"),
        ({"EAT_LEGACY_DELAYED": "Queue"}, "EAT_LEGACY_DELAYED"),
        ({"EAT_LEGACY_IN_FLIGHT": "QueueDelayed"}, "EAT_LEGACY_IN_FLIGHT"),
        ({"EAT_LEGACY_QUEUE": "{a}Queue"}, "EAT_LEGACY_IN_FLIGHT"),
        (
            {
                "EAT_LEGACY_QUEUE": "{a}Queue",
                "EAT_LEGACY_DELAYED": "{a}QueueDelayed",
                "EAT_LEGACY_IN_FLIGHT": "{b}QueueDead",
            },
            "EAT_LEGACY_IN_FLIGHT",
        ),
        ({"EAT_LEGACY_BRIDGE": "maybe"}, "EAT_LEGACY_BRIDGE"),
        ({"EAT_API_URL": "localhost:8080"}, "EAT_API_URL"),
        ({"EAT_API_URL": "ftp://h"}, "EAT_API_URL"),
    ],
)
def test_bad_legacy_settings_are_named(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(environ)
    assert info.value.variable == variable


def test_legacy_names_with_one_hash_tag_share_a_cluster_slot_and_are_accepted() -> None:
    settings = Settings.from_env(
        {
            "EAT_LEGACY_QUEUE": "{legacy}Queue",
            "EAT_LEGACY_DELAYED": "{legacy}QueueDelayed",
            "EAT_LEGACY_IN_FLIGHT": "{legacy}QueueDead",
        }
    )
    assert LegacyLists.of(settings) == LegacyLists(
        "{legacy}QueueDelayed", "{legacy}Queue", "{legacy}QueueDead"
    )


@pytest.mark.parametrize(
    ("raw_value", "expected"),
    [("true", True), ("FALSE", False), ("1", True), ("0", False), ("on", True), ("no", False)],
)
def test_legacy_bridge_reads_true_or_false(raw_value: str, expected: bool) -> None:
    assert Settings.from_env({"EAT_LEGACY_BRIDGE": raw_value}).legacy_bridge is expected
