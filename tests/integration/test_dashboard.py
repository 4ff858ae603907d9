"""The dashboard (/ui) in-process against the real Redis: every page and action, their
security (CSRF, same-site, headers, the token's login, read-only mode) and the escaping of
what messages hold. Each action's result is checked through the JSON API."""

from __future__ import annotations

import re
import time
import uuid as uuidlib
import warnings
from collections.abc import Iterator

import pytest
import redis

from app.http.app import create_app
from app.http.ui.security import COOKIE, Sessions
from app.settings import Settings
from app.store import Store
from app.store.keys import Keyspace
from tests.aio import Harness
from tests.wait import wait_until

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from starlette.testclient import TestClient

V1 = "/api/v1"
FAR = 253402300799999
TOKEN = "s3cret-token-0123456789"
SCRIPT = "<script>alert('x')</script>"
UUID = "123e4567-e89b-12d3-a456-426614174000"
# https: the session cookie is Secure, and a client keeps it for https only.
BASE_URL = "https://testserver"


def make_settings(redis_url: str, prefix: str, **overrides) -> Settings:
    return Settings.from_env({}, redis_url=redis_url, prefix=prefix, max_deliveries=1, **overrides)


@pytest.fixture
def settings(redis_url: str, prefix: str) -> Settings:
    return make_settings(redis_url, prefix)


def open_client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings), base_url=BASE_URL, raise_server_exceptions=True)


@pytest.fixture
def client(settings: Settings, redis_client: redis.Redis) -> Iterator[TestClient]:
    with open_client(settings) as test_client:
        yield test_client


@pytest.fixture
def store(h: Harness) -> Store:
    """The worker's side: one delivery before a message is dead."""
    s = h.store(max_deliveries=1)
    h.run(s.ensure_group())
    return s


def save(client: TestClient, message: str = "hello", run_at: int = FAR, uuid: str | None = None):
    body: dict[str, object] = {
        "message": message,
        "runAt": run_at,
        "uuid": uuid or str(uuidlib.uuid4()),
    }
    response = client.post(f"{V1}/save-message", json=body)
    assert response.status_code == 201, response.text
    return response.json()["uuid"]


def state_of(client: TestClient, uuid: str) -> dict:
    response = client.get(f"{V1}/messages/{uuid}")
    assert response.status_code == 200, response.text
    return response.json()


def kill(h: Harness, store: Store, client: TestClient, message: str = "poison") -> str:
    uuid = save(client, message, run_at=0)
    [delivery] = [d for d in h.run(store.read("w", 100, None)) if d.uuid == uuid]
    assert h.run(store.fail(delivery, 0, "PoisonError: <b>boom</b>")) == ("dead", 1)
    return uuid


def csrf_of(html: str) -> str:
    """The session's CSRF token, as every page states it (its forms carry the same)."""
    found = re.search(r'<meta name="csrf-token" content="([^"]+)">', html)
    assert found, "no CSRF token on the page"
    forms = set(re.findall(r'name="csrf" value="([^"]+)"', html))
    assert forms <= {found.group(1)}
    return found.group(1)


def post(client: TestClient, path: str, page: str, **fields: str):
    """Post a form the way the page's own form does: its CSRF token, back to the page."""
    token = csrf_of(client.get(page).text)
    return client.post(path, data={"csrf": token, "back": page, **fields}, follow_redirects=False)


def notice(client: TestClient, page: str) -> str:
    found = re.search(r'id="flash">([^<]*)<', client.get(page).text)
    assert found, "no notice on the page"
    return found.group(1)


# --- pages ---------------------------------------------------------------------------------


def test_every_page_answers_with_the_security_headers(client: TestClient, h, store) -> None:
    uuid = save(client)
    dead = kill(h, store, client)
    for path in [
        "/ui",
        "/ui/live",
        "/ui/messages",
        f"/ui/messages/{uuid}",
        f"/ui/messages/{dead}",
        "/ui/scheduled",
        "/ui/dead",
        "/ui/dead/replay-all",
        "/ui/dead/purge",
        "/ui/partitions",
    ]:
        response = client.get(path)
        assert response.status_code == 200, (path, response.text)
        assert response.headers["content-type"].startswith("text/html"), path
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp, path
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp, path
        assert response.headers["x-frame-options"] == "DENY", path
        assert response.headers["cache-control"] == "no-store", path
    history = client.get("/ui/history.json")
    assert history.status_code == 200 and len(history.json()["t"]) == 60
    static = client.get("/ui/static/vendor/uplot/uPlot.iife.min.js")
    assert static.status_code == 200 and static.headers["x-frame-options"] == "DENY"


def test_no_page_holds_inline_script_or_style(client: TestClient, h, store) -> None:
    uuid = save(client)
    kill(h, store, client)
    for path in ["/ui", "/ui/scheduled", "/ui/dead", f"/ui/messages/{uuid}", "/ui/partitions"]:
        html = client.get(path).text
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), path
        assert "<style" not in html and " style=" not in html and " on" + "click=" not in html


def test_a_body_holding_a_script_is_shown_escaped_on_every_page(
    client: TestClient, h, store
) -> None:
    scheduled = save(client, SCRIPT)
    dead = kill(h, store, client, SCRIPT)
    for path in [f"/ui/messages/{scheduled}", f"/ui/messages/{dead}", "/ui/scheduled", "/ui/dead"]:
        html = client.get(path).text
        assert SCRIPT not in html, path
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html, path
    # The dead entry's reason too.
    assert "&lt;b&gt;boom&lt;/b&gt;" in client.get(f"/ui/messages/{dead}").text


def test_the_overview_shows_the_figures_and_a_no_leader_warning(client: TestClient) -> None:
    for _ in range(3):
        save(client)
    live = client.get("/ui/live").text
    assert re.search(r'id="figure-delayed"[^>]*><span class="n">3<', live)
    assert 'id="no-leader"' in live


def test_the_overview_names_the_leader(client: TestClient, settings: Settings, h) -> None:
    store = Store(h.store().client, settings, identifier="scheduler-7")
    h.run(store.promote(epoch=42))
    live = client.get("/ui/live").text
    assert 'id="no-leader"' not in live
    assert "scheduler-7" in live and ">42<" in live


def test_the_overview_lists_workers_with_their_pending_entries(
    client: TestClient, h, store
) -> None:
    save(client, run_at=0)
    save(client, run_at=0)
    assert len(h.run(store.read("worker-a", 10, None))) == 2
    table = client.get("/ui/live").text
    assert re.search(r"<code>worker-a</code></td><td class=\"num\">2</td>", table)


def test_a_message_is_found_by_its_uuid(client: TestClient) -> None:
    uuid = save(client, "find me", uuid=UUID)
    found = client.get(f"/ui/messages?uuid={UUID.upper()}", follow_redirects=False)
    assert (found.status_code, found.headers["location"]) == (303, f"/ui/messages/{uuid}")
    page = client.get(f"/ui/messages/{uuid}").text
    assert 'id="state">scheduled<' in page and "find me" in page
    assert 'id="attempts">0<' in page


def test_an_unknown_or_malformed_uuid_is_said_so(client: TestClient) -> None:
    missing = client.get(f"/ui/messages/{UUID}")
    assert missing.status_code == 404 and "No message" in missing.text
    bad = client.get("/ui/messages?uuid=<b>nope</b>")
    assert bad.status_code == 422 and "<b>nope</b>" not in bad.text
    assert client.get("/ui/messages/nope").status_code == 422
    assert client.get("/ui/nowhere").status_code == 404


def test_the_scheduled_page_pages_by_cursor(client: TestClient, monkeypatch) -> None:
    monkeypatch.setattr("app.http.ui.pages.PAGE_SIZE", 2)
    ids = [save(client, f"m{i}", FAR - 10 + i) for i in range(5)]
    seen, path = [], "/ui/scheduled"
    while True:
        html = client.get(path).text
        seen += re.findall(r'<tr data-uuid="([0-9a-f-]+)">', html)
        found = re.search(r'href="(/ui/scheduled\?cursor=[^"]+)" rel="next"', html)
        if not found:
            break
        path = found.group(1).replace("&amp;", "&")
    assert seen == ids
    assert client.get("/ui/scheduled?cursor=bogus").status_code == 422


def test_the_dead_page_pages_by_cursor(client: TestClient, h, store, monkeypatch) -> None:
    monkeypatch.setattr("app.http.ui.pages.PAGE_SIZE", 2)
    ids = [kill(h, store, client) for _ in range(3)]
    first = client.get("/ui/dead").text
    cursor = re.search(r'href="/ui/dead\?cursor=([^"]+)" rel="next"', first).group(1)
    second = client.get(f"/ui/dead?cursor={cursor}").text
    rows = re.findall(r'<tr data-uuid="([0-9a-f-]+)">', first + second)
    assert rows == ids
    assert 'rel="next"' not in second


def test_the_partitions_page_has_one_row_per_partition(client: TestClient, settings) -> None:
    html = client.get("/ui/partitions").text
    rows = re.findall(r"<tr>\s*<td>([0-9]+)</td><td><code>([^<]+)</code>", html)
    assert rows == [("0", "{" + settings.prefix + "}")]


# --- actions -------------------------------------------------------------------------------


def test_cancel_from_the_page_cancels_through_the_api_path(client: TestClient) -> None:
    uuid = save(client)
    page = f"/ui/messages/{uuid}"
    response = post(client, f"{page}/cancel", page)
    assert (response.status_code, response.headers["location"]) == (303, page)
    assert state_of(client, uuid)["state"] == "cancelled"
    assert "Cancelled" in notice(client, page)
    again = post(client, f"/ui/messages/{uuid}/cancel", "/ui/scheduled")
    assert again.status_code == 303
    assert "is cancelled; only a scheduled or retrying" in notice(client, "/ui/scheduled")


def test_reschedule_from_the_page_moves_runat(client: TestClient) -> None:
    uuid = save(client)
    page = f"/ui/messages/{uuid}"
    assert post(client, f"{page}/reschedule", page, run_at="2031-05-06T07:08:09").status_code == 303
    status = state_of(client, uuid)
    assert (status["state"], status["runAt"]) == ("scheduled", 1935817689000)
    assert "2031-05-06 07:08:09.000 UTC" in notice(client, page)


def test_a_bad_date_changes_nothing_and_says_why(client: TestClient) -> None:
    uuid = save(client)
    page = f"/ui/messages/{uuid}"
    assert post(client, f"{page}/reschedule", page, run_at="soon").status_code == 303
    assert state_of(client, uuid)["runAt"] == FAR
    assert "runAt must be a date" in notice(client, page)


def test_run_now_queues_a_scheduled_message(client: TestClient) -> None:
    uuid = save(client)
    before = time.time() * 1000
    assert post(client, f"/ui/messages/{uuid}/run-now", "/ui/scheduled").status_code == 303
    status = state_of(client, uuid)
    assert status["state"] == "queued"
    assert before - 5000 < status["runAt"] < time.time() * 1000 + 5000


def test_replay_and_delete_a_dead_letter_from_the_page(client: TestClient, h, store) -> None:
    replayed, deleted = kill(h, store, client), kill(h, store, client)
    assert post(client, f"/ui/messages/{replayed}/replay", "/ui/dead").status_code == 303
    assert state_of(client, replayed)["state"] == "queued"
    assert post(client, f"/ui/messages/{deleted}/delete-dead", "/ui/dead").status_code == 303
    assert client.get(f"{V1}/dead").json()["items"] == []
    assert "Deleted the dead entry" in notice(client, "/ui/dead")
    post(client, f"/ui/messages/{deleted}/delete-dead", "/ui/dead")
    assert "not in the dead stream" in notice(client, "/ui/dead")


def test_replay_all_and_purge_all_after_their_confirmation(client: TestClient, h, store) -> None:
    ids = [kill(h, store, client) for _ in range(3)]
    confirm = client.get("/ui/dead/replay-all").text
    assert "3 messages in the dead stream" in confirm
    assert post(client, "/ui/dead/replay-all", "/ui/dead/replay-all").status_code == 303
    assert {state_of(client, u)["state"] for u in ids} == {"queued"}
    assert "Replayed 3 dead letters" in notice(client, "/ui/dead")
    kill(h, store, client)
    kill(h, store, client)
    assert "deletes the 2 entries" in client.get("/ui/dead/purge").text
    assert post(client, "/ui/dead/purge", "/ui/dead/purge").status_code == 303
    assert client.get(f"{V1}/stats").json()["dead"] == 0
    assert "Purged 2 dead letters" in notice(client, "/ui/dead")


def test_an_action_goes_back_only_to_a_dashboard_page(client: TestClient) -> None:
    uuid = save(client)
    token = csrf_of(client.get("/ui").text)
    response = client.post(
        f"/ui/messages/{uuid}/cancel",
        data={"csrf": token, "back": "https://evil.example/"},
        follow_redirects=False,
    )
    assert (response.status_code, response.headers["location"]) == (303, "/ui")


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("given", [None, "", "forged"])
def test_an_action_without_its_csrf_token_is_refused_and_changes_nothing(
    client: TestClient, given: str | None
) -> None:
    uuid = save(client)
    client.get("/ui")  # a session
    data = {"back": "/ui"} if given is None else {"csrf": given}
    response = client.post(f"/ui/messages/{uuid}/cancel", data=data, follow_redirects=False)
    assert response.status_code == 403 and "CSRF" in response.text
    assert state_of(client, uuid)["state"] == "scheduled"


def test_another_sessions_csrf_token_is_refused(settings: Settings, redis_client) -> None:
    with open_client(settings) as alice, open_client(settings) as mallory:
        uuid = save(alice)
        alice.get("/ui")
        token = csrf_of(mallory.get("/ui/scheduled").text)
        response = alice.post(f"/ui/messages/{uuid}/cancel", data={"csrf": token})
        assert response.status_code == 403
        assert state_of(alice, uuid)["state"] == "scheduled"


def test_an_action_without_a_session_is_refused(client: TestClient) -> None:
    uuid = save(client)
    token = csrf_of(client.get("/ui").text)
    client.cookies.clear()
    response = client.post(f"/ui/messages/{uuid}/cancel", data={"csrf": token})
    assert response.status_code == 403
    assert state_of(client, uuid)["state"] == "scheduled"


def test_a_form_posted_from_another_site_is_refused(client: TestClient) -> None:
    uuid = save(client)
    token = csrf_of(client.get("/ui").text)
    response = client.post(
        f"/ui/messages/{uuid}/cancel",
        data={"csrf": token},
        headers={"sec-fetch-site": "cross-site"},
    )
    assert response.status_code == 403
    assert state_of(client, uuid)["state"] == "scheduled"


def test_an_action_is_a_post_of_a_form(client: TestClient) -> None:
    uuid = save(client)
    assert client.get(f"/ui/messages/{uuid}/cancel").status_code == 405
    token = csrf_of(client.get("/ui").text)
    as_json = client.post(f"/ui/messages/{uuid}/cancel", json={"csrf": token})
    assert as_json.status_code == 415
    assert state_of(client, uuid)["state"] == "scheduled"


def test_the_session_cookie_is_secure_http_only_and_same_site_strict(client: TestClient) -> None:
    header = client.get("/ui").headers["set-cookie"]
    assert header.startswith(f"{COOKIE}=")
    assert "Secure" in header and "HttpOnly" in header and "SameSite=Strict" in header


def test_read_only_mode_hides_every_action_and_refuses_them(
    redis_url: str, prefix: str, redis_client, h, store
) -> None:
    settings = make_settings(redis_url, prefix, ui_read_only=True)
    with open_client(settings) as client:
        scheduled = save(client)
        dead = kill(h, store, client)
        for path in [
            "/ui",
            "/ui/scheduled",
            "/ui/dead",
            f"/ui/messages/{scheduled}",
            f"/ui/messages/{dead}",
            "/ui/dead/purge",
        ]:
            html = client.get(path).text
            assert "data-action=" not in html, path
            assert 'method="post"' not in html, path
        assert "read-only" in client.get("/ui").text
        # The forms are gone; a hand-made POST with a valid token is refused all the same.
        sid = Sessions("").session_id(client.cookies.get(COOKIE))
        valid = Sessions("").csrf(sid)
        for path in [
            f"/ui/messages/{scheduled}/cancel",
            f"/ui/messages/{scheduled}/run-now",
            f"/ui/messages/{dead}/replay",
            f"/ui/messages/{dead}/delete-dead",
            "/ui/dead/replay-all",
            "/ui/dead/purge",
        ]:
            response = client.post(path, data={"csrf": valid})
            assert response.status_code == 403 and "read-only" in response.text, path
        assert state_of(client, scheduled)["state"] == "scheduled"
        assert state_of(client, dead)["state"] == "dead"


def test_with_a_token_the_dashboard_asks_for_it_once(
    redis_url: str, prefix: str, redis_client
) -> None:
    settings = make_settings(redis_url, prefix, api_token=TOKEN)
    bearer = {"authorization": f"Bearer {TOKEN}"}
    with open_client(settings) as client:
        page = client.get("/ui/scheduled?x=1", follow_redirects=False)
        assert page.status_code == 303
        assert page.headers["location"] == "/ui/login?next=%2Fui%2Fscheduled%3Fx%3D1"
        assert client.get("/ui/live").status_code == 401
        assert client.get("/ui/login").status_code == 200
        wrong = client.post("/ui/login", data={"token": TOKEN + "x", "next": "/ui/scheduled"})
        assert wrong.status_code == 401 and COOKIE not in client.cookies
        right = client.post(
            "/ui/login", data={"token": TOKEN, "next": "/ui/scheduled"}, follow_redirects=False
        )
        assert (right.status_code, right.headers["location"]) == (303, "/ui/scheduled")
        cookie = right.headers["set-cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert TOKEN not in cookie
        assert client.get("/ui").status_code == 200
        # The session is the dashboard's only: the JSON API still wants the bearer token.
        assert client.get(f"{V1}/stats").status_code == 401
        assert client.get(f"{V1}/stats", headers=bearer).status_code == 200
        uuid = client.post(
            f"{V1}/save-message", json={"message": "m", "runAt": FAR}, headers=bearer
        ).json()["uuid"]
        assert post(client, f"/ui/messages/{uuid}/cancel", "/ui").status_code == 303
        assert client.get(f"{V1}/messages/{uuid}", headers=bearer).json()["state"] == "cancelled"
        # Logging out ends the session.
        assert post(client, "/ui/logout", "/ui").headers["location"] == "/ui/login"
        assert client.get("/ui", follow_redirects=False).status_code == 303


def test_a_session_of_another_token_is_refused(redis_url: str, prefix: str, redis_client) -> None:
    with open_client(make_settings(redis_url, prefix, api_token=TOKEN)) as client:
        client.post("/ui/login", data={"token": TOKEN})
        cookie = client.cookies.get(COOKIE)
    with open_client(make_settings(redis_url, prefix, api_token=TOKEN + "-new")) as client:
        client.cookies.set(COOKIE, cookie)
        assert client.get("/ui", follow_redirects=False).status_code == 303


def test_the_dashboard_can_be_turned_off(redis_url: str, prefix: str, redis_client) -> None:
    with open_client(make_settings(redis_url, prefix, ui=False)) as client:
        assert client.get("/ui").status_code == 404
        assert client.get("/ui/static/dashboard.js").status_code == 404
        assert client.get(f"{V1}/stats").status_code == 200


def test_the_dashboard_is_not_part_of_the_api_document(client: TestClient) -> None:
    paths = client.get(f"{V1}/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith("/ui")]


def test_redis_down_is_a_page_saying_so(redis_url: str, prefix: str) -> None:
    settings = make_settings("redis://127.0.0.1:1/0", prefix)
    with open_client(settings) as client:
        for path in ["/ui", "/ui/scheduled", "/ui/dead"]:
            response = client.get(path)
            assert response.status_code == 503 and "storage unavailable" in response.text


def test_the_api_files_what_it_accepted_into_the_minute_history(
    client: TestClient, settings: Settings, redis_client: redis.Redis
) -> None:
    for _ in range(3):
        save(client)
    pattern = Keyspace(settings.prefix).history(0)[:-1] + "*"

    def filed() -> int:
        return sum(
            int(redis_client.hget(key, "accepted") or 0)
            for key in redis_client.scan_iter(match=pattern)
        )

    # The running app's recorder flushes on its 5-second ticks (what this process counted
    # before the app started, in other tests, is not its to file).
    wait_until(lambda: filed() == 3, "the api's history flush", 10, interval=0.1)
