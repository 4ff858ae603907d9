"""Keyspace: every key shares one Redis Cluster slot per prefix; prefixes never collide."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from app.settings import Settings
from app.store.keys import CONSUMER_GROUP, Keyspace

NON_KEYS = {"prefix", "tag", "zk_root", "zk_election"}


def key_names() -> list[str]:
    names = [
        name
        for name in dir(Keyspace)
        if isinstance(getattr(Keyspace, name), property) and name not in NON_KEYS
    ]
    assert names, "Keyspace defines no keys?"
    return sorted(names)


def all_keys(ks: Keyspace) -> dict[str, str]:
    return {name: getattr(ks, name) for name in key_names()}


def crc16_xmodem(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def cluster_slot(key: str) -> int:
    """Redis Cluster's rule: hash only the first non-empty {...} section, if any."""
    raw = key.encode()
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return crc16_xmodem(raw) % 16384


def test_crc16_matches_the_redis_cluster_reference_vector():
    assert crc16_xmodem(b"123456789") == 0x31C3
    assert cluster_slot("{user1000}.following") == cluster_slot("{user1000}.followers")
    assert cluster_slot("foo{}{bar}") == crc16_xmodem(b"foo{}{bar}") % 16384


def test_known_keys_are_all_enumerated():
    expected = {"delayed", "messages", "retention", "sequence", "stream", "dead", "epoch"}
    assert expected <= set(key_names())


@pytest.mark.parametrize("prefix", ["eat", "eat:p3", "t0123456789ab", "a.b-c_d"])
def test_every_key_starts_with_the_prefix_hash_tag(prefix: str):
    ks = Keyspace(prefix)
    assert ks.tag == "{" + prefix + "}"
    for name, key in all_keys(ks).items():
        assert key.startswith(ks.tag + ":"), name
        assert key.count("{") == 1 and key.count("}") == 1, name


@pytest.mark.parametrize("prefix", ["eat", "eat:p3", "t0123456789ab"])
def test_every_key_hashes_to_the_same_cluster_slot(prefix: str):
    ks = Keyspace(prefix)
    slots = {name: cluster_slot(key) for name, key in all_keys(ks).items()}
    assert set(slots.values()) == {crc16_xmodem(prefix.encode()) % 16384}, slots


def test_keys_within_one_prefix_are_distinct():
    keys = list(all_keys(Keyspace("eat")).values())
    assert len(set(keys)) == len(keys)


def test_default_settings_use_the_eat_hash_tag():
    assert Keyspace(Settings().prefix).stream == "{eat}:stream"
    assert Keyspace(Settings().prefix).delayed == "{eat}:delayed"


prefixes = st.from_regex(r"[A-Za-z0-9_.-]{1,16}", fullmatch=True).filter(
    lambda p: p not in (".", "..")
)


@given(a=prefixes, b=prefixes)
def test_two_prefixes_never_share_a_key_or_zookeeper_path(a: str, b: str):
    assume(a != b)
    ka, kb = Keyspace(a), Keyspace(b)
    names_a = set(all_keys(ka).values()) | {ka.zk_root, ka.zk_election}
    names_b = set(all_keys(kb).values()) | {kb.zk_root, kb.zk_election}
    assert not names_a & names_b
    # Neither deployment's ZooKeeper tree lies inside the other's.
    assert not ka.zk_election.startswith(kb.zk_root + "/")
    assert not kb.zk_election.startswith(ka.zk_root + "/")


@given(prefix=prefixes)
def test_zookeeper_paths_are_absolute_and_under_the_prefix_root(prefix: str):
    ks = Keyspace(prefix)
    assert ks.zk_root == "/" + prefix
    assert ks.zk_election.startswith(ks.zk_root + "/")
    for path in (ks.zk_root, ks.zk_election):
        parts = path.split("/")[1:]
        assert all(part and part not in (".", "..") for part in parts)


def test_zookeeper_paths_for_the_default_prefix():
    ks = Keyspace("eat")
    assert (ks.zk_root, ks.zk_election) == ("/eat", "/eat/election")


def test_consumer_group_name_is_workers():
    assert CONSUMER_GROUP == "workers"
