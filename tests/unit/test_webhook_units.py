"""Webhook pieces without servers: targets and their rules, the stored body's envelope,
the settings, Retry-After, the signature."""

from __future__ import annotations

import asyncio
import email.utils
import time

import pytest
from standardwebhooks import Webhook

from app.settings import Settings, SettingsError
from app.store import Delivery
from app.store.codec import pack_body, split_body
from app.store.store import parse_entry
from app.targets import TargetPolicy, TargetRefused, address_problem, parse_allow, parse_target
from tests.receiver import SECRET
from workers.handlers import HandlerSpecError, load_handler
from workers.webhook import WebhookHandler, retry_after_seconds


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.0.1", "private"),
        ("169.254.169.254", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "not globally routable"),  # shared (carrier-grade NAT)
        ("224.0.0.1", "multicast"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1%eth0", "link-local"),
        ("fd00::1", "private"),  # unique-local
        ("::ffff:10.0.0.1", "private"),  # IPv4-mapped: judged by the IPv4 inside
        ("::ffff:169.254.169.254", "link-local"),
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ],
)
def test_an_address_outside_the_public_ranges_is_refused_naming_its_kind(address, kind):
    problem = address_problem(address)
    assert problem is not None and kind in problem


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_a_public_address_passes(address):
    assert address_problem(address) is None


def test_a_target_is_parsed_with_its_default_port_and_lower_case_host():
    target = parse_target("HTTPS://Hooks.Example.COM/in?x=1")
    assert (target.scheme, target.host, target.port) == ("https", "hooks.example.com", 443)
    assert parse_target("http://[0:0::1]:81/").origin == "http://[::1]:81"


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/",
        "javascript:alert(1)",
        "http:///nohost",
        "http://exa mple.com/",
        "http://bücher.example/",
        "http://example.com:99999/",
        "https://u:p@example.com/",
        "https://example.com/" + "x" * 2048,
    ],
)
def test_a_target_that_is_not_a_plain_http_url_is_refused(url):
    with pytest.raises(TargetRefused):
        parse_target(url)


def test_allowlist_entries_match_an_origin_exactly_and_a_host_pattern_on_any_port():
    policy = TargetPolicy(allow="https://a.example.com, b.example.com, *.c.example.com")
    assert policy.allowed("https://a.example.com/x")
    for refused in ("http://a.example.com/x", "https://a.example.com:8443/x"):
        with pytest.raises(TargetRefused):
            policy.allowed(refused)
    assert policy.allowed("http://b.example.com:8080/x")
    assert policy.allowed("https://deep.er.c.example.com/")
    for refused in ("https://c.example.com/", "https://xc.example.com/", "https://b.example.co/"):
        with pytest.raises(TargetRefused):
            policy.allowed(refused)


def test_only_a_host_named_without_a_wildcard_may_reach_a_private_address():
    policy = TargetPolicy(default_url="http://10.9.9.9/d", allow="svc.internal, *.corp")
    assert policy.refused_address("svc.internal", "10.0.0.1") is None
    assert policy.refused_address("10.9.9.9", "10.9.9.9") is None  # the default URL's host
    assert policy.refused_address("x.corp", "10.0.0.1") is not None


def test_every_address_a_name_resolves_to_must_pass():
    async def resolve(host, port):
        return ["93.184.216.34", "127.0.0.1"]

    policy = TargetPolicy(allow="*.example.com", resolver=resolve)
    with pytest.raises(TargetRefused, match=r"127\.0\.0\.1 is a loopback address"):
        asyncio.run(policy.check("https://x.example.com/"))


def test_a_name_that_does_not_resolve_in_time_is_refused():
    async def slow(host, port):
        await asyncio.sleep(5)
        return ["93.184.216.34"]

    policy = TargetPolicy(allow="*.example.com", resolve_timeout=0.05, resolver=slow)
    with pytest.raises(TargetRefused, match=r"did not resolve within 0\.05 s"):
        asyncio.run(policy.check("https://x.example.com/"))


@pytest.mark.parametrize("entry", ["http://a.example.com/path", "*", "a b", "ftp://x.example"])
def test_a_malformed_allowlist_entry_is_refused(entry):
    with pytest.raises(ValueError):
        parse_allow(entry)


def test_the_body_envelope_round_trips_and_a_body_without_target_is_the_message_bytes():
    assert pack_body("héllo", None) == "héllo".encode()
    assert split_body("héllo".encode()) == ("héllo".encode(), None)
    packed = pack_body("héllo\x00\xff", "https://a.example.com/x")
    assert packed[0] == 0xFF
    assert split_body(packed) == ("héllo\x00\xff".encode(), "https://a.example.com/x")
    with pytest.raises(ValueError):
        split_body(packed[:10])


def test_a_stream_entry_with_an_envelope_becomes_a_delivery_with_its_target():
    key = bytes(range(16))
    body = pack_body("msg", "https://a.example.com/x")
    plain = parse_entry(b"1-1", [b"u", key, b"m", b"msg", b"r", b"5", b"a", b"0"])
    assert plain.target is None and plain.message == "msg"
    got = parse_entry(b"1-2", [b"u", key, b"m", body, b"r", b"5", b"a", b"1"])
    assert (got.message, got.target, got.attempts) == ("msg", "https://a.example.com/x", 1)


def test_the_webhook_secret_is_never_in_the_settings_repr_nor_in_its_errors():
    settings = Settings(webhook_secret=SECRET)
    assert SECRET not in repr(settings)
    for bad in ("nope-" + SECRET[6:], "whsec_!!!!", "whsec_c2hvcnQ="):
        with pytest.raises(SettingsError) as caught:
            Settings.from_env({"EAT_WEBHOOK_SECRET": bad})
        assert bad not in str(caught.value)


def test_webhook_settings_are_validated_naming_the_variable():
    with pytest.raises(SettingsError, match="EAT_WEBHOOK_URL"):
        Settings.from_env({"EAT_WEBHOOK_URL": "ftp://x"})
    with pytest.raises(SettingsError, match="EAT_WEBHOOK_ALLOW"):
        Settings.from_env({"EAT_WEBHOOK_ALLOW": "http://x.example/path"})
    with pytest.raises(SettingsError, match="EAT_WEBHOOK_PER_ORIGIN"):
        Settings.from_env({"EAT_WEBHOOK_PER_ORIGIN": "0"})


def test_the_webhook_handler_needs_a_secret():
    with pytest.raises(HandlerSpecError, match="EAT_WEBHOOK_SECRET"):
        load_handler("webhook", "w", settings=Settings())


def test_retry_after_is_read_as_seconds_or_an_http_date():
    now = 1_000_000.0
    assert retry_after_seconds("2", now) == 2.0
    assert retry_after_seconds(email.utils.formatdate(now + 30, usegmt=True), now) == 30.0
    assert retry_after_seconds(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    for unreadable in (None, "", "soon", "-1", "1.5", "٣"):
        assert retry_after_seconds(unreadable, now) == 0.0


def test_the_signature_headers_verify_with_the_reference_library():
    async def scenario() -> None:
        handler = WebhookHandler(SECRET, TargetPolicy(default_url="https://a.example.com/x"))
        try:
            delivery = Delivery("1-1", "123e4567-e89b-12d3-a456-426614174000", b"", "ünï", 5, 2)
            headers = handler.headers(delivery, delivery.message, time.time())
        finally:
            await handler.aclose()
        Webhook(SECRET).verify("ünï".encode(), headers, json_parse=False)
        assert headers["webhook-id"] == delivery.uuid
        assert headers["x-eat-attempt"] == "3" and headers["x-eat-run-at"] == "5"
        with pytest.raises(Exception, match="signature"):
            Webhook(SECRET).verify(b"tampered", headers, json_parse=False)

    asyncio.run(scenario())
