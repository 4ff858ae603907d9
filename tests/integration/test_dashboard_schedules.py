"""The dashboard's Schedules page (/ui/schedules) in-process against the real Redis: every
schedule by name with its rhythm, state and next occurrence, escaped, a page at a time."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import redis

from app.http.ui import pages
from app.store.keys import Keyspace
from tests.integration.test_dashboard import SCRIPT, TestClient, open_client


@pytest.fixture
def client(settings, redis_client: redis.Redis) -> Iterator[TestClient]:
    with open_client(settings) as test_client:
        yield test_client


@pytest.fixture
def settings(redis_url: str, prefix: str):
    from tests.integration.test_dashboard import make_settings

    return make_settings(redis_url, prefix)


def put(client: TestClient, name: str, **body) -> None:
    response = client.put(f"/api/v1/schedules/{name}", json={"message": "m", **body})
    assert response.status_code == 201, response.text


def test_the_schedules_page_lists_each_schedule_with_its_rhythm_state_and_next_run(client):
    put(client, "daily", cron="0 7 * * *", timezone="Europe/Berlin", message=SCRIPT)
    put(client, "tick", every="90s", paused=True)
    html = client.get("/ui/schedules").text
    rows = re.findall(r'<tr data-name="([^"]+)">(.*?)</tr>', html, re.S)
    assert [name for name, _ in rows] == ["daily", "tick"]
    daily, tick = (body for _, body in rows)
    assert "cron 0 7 * * * Europe/Berlin" in daily and "active" in daily and "UTC" in daily
    assert "every 90s" in tick and "paused" in tick
    assert SCRIPT not in html and "&lt;script&gt;" in html  # bodies are text, never run
    assert 'aria-current="page"' in html and ">Schedules</a>" in html


def test_the_schedules_page_pages_by_name_and_refuses_a_cursor_it_did_not_make(client, monkeypatch):
    monkeypatch.setattr(pages, "PAGE_SIZE", 2)
    for name in ("a", "b", "c"):
        put(client, name, every="1h")
    first = client.get("/ui/schedules").text
    assert re.findall(r'data-name="([^"]+)"', first) == ["a", "b"]
    following = re.search(r'href="(/ui/schedules\?cursor=[^"]+)"', first).group(1)
    assert re.findall(r'data-name="([^"]+)"', client.get(following).text) == ["c"]
    assert client.get("/ui/schedules?cursor=%2F..").status_code == 422


def test_the_schedules_page_says_when_there_is_none(client):
    assert "No schedule is defined." in client.get("/ui/schedules").text


def test_the_schedules_page_names_a_schedule_it_cannot_read_and_shows_the_rest(
    client, settings, redis_client
):
    put(client, "good", every="1h")
    put(client, "broken", every="1h")
    redis_client.hset(Keyspace(settings.prefix).schedules, "broken", b"{not a definition")
    response = client.get("/ui/schedules")
    assert response.status_code == 200
    assert re.findall(r'data-name="([^"]+)"', response.text) == ["good"]
    warning = re.search(r'<p class="bad" id="unreadable">(.*?)</p>', response.text, re.S)
    assert warning is not None and "<code>broken</code>" in warning.group(1)
