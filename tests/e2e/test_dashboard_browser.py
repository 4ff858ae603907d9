"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``) driven by
Playwright, against a running stack (real api, scheduler and worker processes on real Redis
and ZooKeeper). Every action is clicked on the page, and its result read back through the
JSON API.

Playwright's own browser builds are downloaded from a CDN this machine cannot reach: the
tests launch the Debian browser by its path (scripts/bootstrap and .ci/run install it).
Nothing is skipped: without a browser the fixture fails and says what to install.

Each test saves a screenshot of the pages it visits into ``SCREENSHOT_DIR`` (default:
the test's temporary directory); docs/images/ holds the ones the README and
docs/dashboard.md show (``SCREENSHOT_DIR=docs/images``).
"""

from __future__ import annotations

import os
import uuid as uuidlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.e2e.harness import Cluster, now_ms

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
# Without the networking flags Chromium keeps trying hosts this machine cannot reach.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "browser-token-0123456789"
HOUR_MS = 3_600_000
WAIT_MS = 15_000  # the longest a page may take to show what the stack did


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        raise RuntimeError(
            f"no browser at {CHROMIUM}: install Debian's chromium (scripts/bootstrap does)"
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def shots(tmp_path: Path) -> Callable[[Page, str], None]:
    """Save a full-page screenshot named ``dashboard-<name>.png``."""
    folder = Path(os.environ.get("SCREENSHOT_DIR") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)

    def shoot(page: Page, name: str) -> None:
        page.screenshot(path=str(folder / f"dashboard-{name}.png"), full_page=True)

    return shoot


# Chromium logs every 4xx answer as a console error; the tests check those statuses.
HTTP_STATUS_LOGGED = "Failed to load resource: the server responded with a status of 4"


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context; fails the test if the page logged an error (a script
    error, or a Content-Security-Policy violation: Chromium reports those as errors)."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    opened = context.new_page()
    errors: list[str] = []

    def console(message) -> None:
        if message.type == "error" and not message.text.startswith(HTTP_STATUS_LOGGED):
            errors.append(message.text)

    opened.on("console", console)
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield opened
        assert errors == [], errors
    finally:
        context.close()


def api(cluster: Cluster, path: str, **kwargs) -> httpx.Response:
    with httpx.Client(base_url=cluster.apis[0].base_url, timeout=10) as client:
        return client.get(path, **kwargs)


def state(cluster: Cluster, uuid: str) -> dict:
    return api(cluster, f"/api/v1/messages/{uuid}").json()


def post(cluster: Cluster, message: str, run_at: int) -> str:
    uuid = str(uuidlib.uuid4())
    assert cluster.client().post(message, run_at, uuid).status in (200, 201)
    return uuid


def test_the_overview_counts_change_without_a_reload(
    cluster: Callable[..., Cluster], page: Page, shots
) -> None:
    c = cluster(apis=1, schedulers=1, workers=1)
    base = c.apis[0].base_url
    page.goto(f"{base}/ui")
    expect(page.locator("#figure-delayed .n")).to_have_text("0")
    expect(page.locator("#leader-identifier")).to_be_visible(timeout=WAIT_MS)
    page.evaluate("window.stillTheSamePage = true")

    later = now_ms() + HOUR_MS
    for i in range(7):
        post(c, f"later {i}", later + i)
    for i in range(5):
        post(c, f"now {i}", now_ms())
    expect(page.locator("#figure-delayed .n")).to_have_text("7", timeout=WAIT_MS)
    assert page.evaluate("window.stillTheSamePage") is True, "the page was reloaded"
    assert api(c, "/api/v1/stats").json()["delayed"] == 7
    worker = c.consumer_name(c.workers[0])
    expect(page.locator("#workers")).to_contain_text(worker, timeout=WAIT_MS)

    # The charts: the api and the worker file their counts on 5-second ticks.
    def charted() -> bool:
        series = api(c, "/ui/history.json").json()
        return sum(series["accepted"]) >= 12 and sum(series["delivered"]) >= 5

    c.wait_until(charted, "the minute history to hold what was accepted and delivered", 15)
    page.reload()
    expect(page.locator("#charts[data-drawn=true]")).to_have_count(1, timeout=WAIT_MS)
    expect(page.locator("#chart-counts canvas")).to_have_count(1)
    shots(page, "overview")

    page.click("nav >> text=Partitions")
    expect(page.locator("#partitions tbody tr")).to_have_count(1)
    expect(page.locator("#partitions tbody")).to_contain_text("{" + c.prefix + "}")
    shots(page, "partitions")


def test_find_cancel_reschedule_and_run_now_from_the_page(
    cluster: Callable[..., Cluster], page: Page, shots
) -> None:
    c = cluster(apis=1, schedulers=1, workers=1)
    base = c.apis[0].base_url
    later = now_ms() + HOUR_MS
    cancelled = post(c, "cancel <b>me</b>", later)
    moved = post(c, "move me", later + 1)
    soon = post(c, "run me now", later + 2)

    # Find by uuid from the search box every page has.
    page.goto(f"{base}/ui")
    page.fill("header input[name=uuid]", cancelled)
    page.press("header input[name=uuid]", "Enter")
    expect(page.locator("#state")).to_have_text("scheduled")
    expect(page.locator("pre.body")).to_have_text("cancel <b>me</b>")  # shown, not parsed
    shots(page, "message")
    page.click("#actions button[data-action=cancel]")
    expect(page.locator("#flash")).to_contain_text("Cancelled")
    expect(page.locator("#state")).to_have_text("cancelled")
    assert state(c, cancelled)["state"] == "cancelled"

    # Reschedule with the date-time input (UTC).
    page.goto(f"{base}/ui/scheduled")
    shots(page, "scheduled")
    page.click(f"a:has-text('{moved}')")
    page.fill("input[name=run_at]", "2035-01-02T03:04:05")
    page.click("#actions button[data-action=reschedule]")
    expect(page.locator("#flash")).to_contain_text("Rescheduled")
    wanted = int(datetime(2035, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp() * 1000)
    assert (state(c, moved)["state"], state(c, moved)["runAt"]) == ("scheduled", wanted)

    # Run now, from the scheduled page's row: the worker handles it.
    page.goto(f"{base}/ui/scheduled")
    page.click(f"tr[data-uuid='{soon}'] button[data-action=run-now]")
    expect(page.locator("#flash")).to_contain_text("Due now")
    c.wait_until(
        lambda: state(c, soon)["state"] == "delivered", "the run-now message delivered", 15
    )
    assert [e["uuid"] for e in c.all_echoes()] == [soon]


def test_a_poison_message_dies_and_is_replayed_from_the_dead_letters_page(
    cluster: Callable[..., Cluster], page: Page, shots, tmp_path: Path
) -> None:
    cured = tmp_path / "cured"
    env = {
        "EAT_MAX_DELIVERIES": "2",
        "EAT_RETRY_BASE": "0.05",
        "EAT_RETRY_MAX": "0.1",
        "EAT_CHAOS_CURED": str(cured),
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p
        ),
    }
    c = cluster(apis=1, schedulers=1, workers=0, env=env)
    c.launch([c.add_worker(handler="tests.chaos.handlers:poison")])
    base = c.apis[0].base_url
    poison = [post(c, f"poison {i}", 0) for i in range(3)]
    for uuid in poison:
        c.wait_until(lambda u=uuid: state(c, u)["state"] == "dead", f"{uuid} dead", 15)

    page.goto(f"{base}/ui/dead")
    expect(page.locator("#dead tbody tr")).to_have_count(3)
    expect(page.locator(f"tr[data-uuid='{poison[0]}']")).to_contain_text("PoisonError")
    shots(page, "dead")

    # The handler is fixed; replay one from its row: the worker echoes it.
    cured.touch()
    page.click(f"tr[data-uuid='{poison[0]}'] button[data-action=replay]")
    expect(page.locator("#flash")).to_contain_text("Replayed")
    c.wait_until(
        lambda: state(c, poison[0])["state"] == "delivered", "the replayed message delivered", 15
    )
    assert [e["uuid"] for e in c.all_echoes()] == [poison[0]]

    # Purge the other two, through the confirmation page.
    page.click("#purge")
    expect(page.locator("h1")).to_have_text("Purge every dead letter?")
    page.click("button[data-action=purge]")
    expect(page.locator("#flash")).to_contain_text("Purged 2 dead letters")
    assert api(c, "/api/v1/dead").json()["items"] == []


def test_with_a_token_the_browser_logs_in_once_and_keeps_a_strict_session(
    cluster: Callable[..., Cluster], page: Page
) -> None:
    c = cluster(apis=1, schedulers=0, workers=0, env={"EAT_API_TOKEN": TOKEN})
    base = c.apis[0].base_url
    page.goto(f"{base}/ui/dead")
    expect(page.locator("h1")).to_have_text("Log in")
    page.fill("input[name=token]", "not the token at all")
    page.click("form.login button")
    expect(page.locator("#problem")).to_contain_text("not the API token")
    page.fill("input[name=token]", TOKEN)
    page.click("form.login button")
    expect(page.locator("h1")).to_have_text("Dead letters")  # back where it was going
    [cookie] = page.context.cookies()
    assert (cookie["secure"], cookie["httpOnly"], cookie["sameSite"]) == (True, True, "Strict")
    assert TOKEN not in cookie["value"]
    page.click("button:has-text('Log out')")
    expect(page.locator("h1")).to_have_text("Log in")


def test_the_page_runs_no_script_that_is_not_its_own(
    cluster: Callable[..., Cluster], browser: Browser
) -> None:
    c = cluster(apis=1, schedulers=0, workers=0)
    context = browser.new_context()
    try:
        page = context.new_page()
        refused: list[str] = []
        page.on(
            "console", lambda m: refused.append(m.text) if "Content Security" in m.text else None
        )
        page.goto(f"{c.apis[0].base_url}/ui")
        # As if a body had slipped through unescaped: an inline handler and an inline script.
        page.evaluate(
            """() => {
                const html = '<img src="x" onerror="window.ran = 1">';
                document.body.insertAdjacentHTML('beforeend', html);
                const script = document.createElement('script');
                script.textContent = 'window.ran = 2';
                document.body.appendChild(script);
            }"""
        )
        page.wait_for_function("document.querySelector('img[src=x]').complete")
        for _ in range(100):  # Playwright delivers console events while it waits
            if len(refused) >= 2:
                break
            page.wait_for_timeout(50)
        assert len(refused) >= 2, refused
        assert page.evaluate("window.ran") is None
    finally:
        context.close()


def test_the_schedules_page_shows_each_schedule_and_its_next_run(
    cluster: Callable[..., Cluster], page: Page, shots
) -> None:
    c = cluster(apis=1, schedulers=1, workers=1)
    with httpx.Client(base_url=c.apis[0].base_url, timeout=10) as client:
        for name, body in (
            ("daily-report", {"cron": "0 7 * * 1-5", "timezone": "Europe/Berlin"}),
            ("heartbeat", {"every": "90s"}),
        ):
            answer = client.put(f"/api/v1/schedules/{name}", json={"message": name, **body})
            assert answer.status_code == 201, answer.text
    page.goto(f"{c.apis[0].base_url}/ui")
    page.click("nav >> text=Schedules")
    expect(page.locator("#schedules tbody tr")).to_have_count(2)
    expect(page.locator('tr[data-name="daily-report"]')).to_contain_text("Europe/Berlin")
    expect(page.locator('tr[data-name="heartbeat"]')).to_contain_text("every 90s")
    shots(page, "schedules")
