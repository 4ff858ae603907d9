"""The dashboard's pages and actions: Starlette routes under ``/ui``, rendered with
Jinja2 (autoescaped: a message body is always shown as text).

Pages are GETs; every change is a POST from a form that carries the session's CSRF
token, answered with a redirect (303) back to the page it came from and a one-time
notice saying what happened (post/redirect/get: a reload never repeats an action).
Every action calls :class:`~app.http.ui.source.Source`, and through it the storage
core's ``Lifecycle``: the scripts of the JSON API.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

import jinja2
import msgspec
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from app.http.answers import failure_answer, read_body
from app.http.ui import views
from app.http.ui.security import COOKIE, SecurityHeaders, Sessions, cookie_header
from app.http.ui.source import ACTIONS, BadCursor, Source
from app.log import get_logger
from app.model import InvalidInput, State, normalize_uuid
from app.settings import Settings
from app.store.codec import CorruptRecord
from app.store.lifecycle import Outcome

log = get_logger("ui")

BASE = "/ui"
STATIC = BASE + "/static"
PAGE_SIZE = 50
FORM_LIMIT = 4096  # bytes: the largest form is a uuid, a date-time, a token and a path
FLASH = "__Host-eat-ui-flash"
FLASH_CHARS = 400

Handler = Callable[..., Awaitable[Response]]


class Refused(Exception):
    """A request the dashboard answers with an error page (status, text)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def _templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("app.http.ui", "templates"),
        autoescape=True,  # every {{ value }} is HTML-escaped: bodies are shown, never run
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=views.when, span=views.span, form_time=views.form_time, quote=quote)
    env.globals["relative"] = views.relative
    return Jinja2Templates(env=env)


class Dashboard:
    """The ``/ui`` app. ``source`` is set by the api's lifespan once Redis' client exists.

    :param settings: EAT_API_TOKEN (login), EAT_UI_READ_ONLY, EAT_PREFIX.
    :param clock: epoch seconds (tests pass their own).
    """

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.sessions = Sessions(settings.api_token, clock)
        self.read_only = settings.ui_read_only
        self.clock = clock
        self.templates = _templates()
        self.source: Source | None = None

    # --- plumbing ------------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def render(self, request: Request, name: str, code: int = 200, **context: Any) -> Response:
        sid = getattr(request.state, "sid", None)
        context.setdefault("flash", getattr(request.state, "flash", None))
        return self.templates.TemplateResponse(
            request,
            name,
            {
                "csrf": self.sessions.csrf(sid) if sid else "",
                "read_only": self.read_only,
                "login_required": self.sessions.login_required,
                "partition_count": self.settings.partitions,
                "now_ms": self._now_ms(),
                "here": _here(request),
                **context,
            },
            status_code=code,
        )

    def error_page(self, request: Request, status: int, text: str) -> Response:
        return self.render(request, "error.html", status, status=status, text=text)

    def _failure(
        self, request: Request, exc: Exception, retry: str = "reload the page"
    ) -> Response:
        """Redis down or refusing, or bad input: the JSON API's classification and log
        line (``failure_answer``), shown as a page."""
        if isinstance(exc, Refused):
            return self.error_page(request, exc.status, exc.text)
        if isinstance(exc, BadCursor):
            return self.error_page(
                request, 422, "This page's cursor is not one the dashboard made."
            )
        answer = failure_answer(exc, request.url.path, retry)
        if answer is None:
            raise exc
        status, _, body = answer
        return self.error_page(request, status, msgspec.json.decode(body)["error"])

    def page(self, handler: Handler, *, fragment: bool = False) -> Handler:
        """A GET: a session (or the login page), then the page; Redis' errors as a page."""

        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            sessions = self.sessions
            sid = sessions.session_id(request.cookies.get(COOKIE))
            issued = None
            if sid is None:
                if sessions.login_required:
                    if fragment:
                        return Response("log in again", 401, media_type="text/plain")
                    following = quote(_here(request), safe="")
                    return RedirectResponse(f"{BASE}/login?next={following}", 303)
                issued = sessions.issue()
                sid = sessions.session_id(issued)
            request.state.sid = sid
            flash = request.cookies.get(FLASH)
            request.state.flash = _read_flash(flash) if flash else None
            try:
                response = await handler(request)
            except (Refused, BadCursor, InvalidInput, RedisError, OSError) as exc:
                response = self._failure(request, exc)
            if issued is not None:
                response.headers.append("set-cookie", cookie_header(issued))
            if flash and not fragment:
                response.headers.append("set-cookie", _flash_cookie("", ""))
            return response

        return endpoint

    def action(self, handler: Handler, *, changes: bool = True) -> Handler:
        """A POST: same-site, a session, its CSRF token, and when it ``changes`` something
        not read-only; then the handler, whose notice goes back with a redirect to the
        form's page."""

        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            try:
                if request.headers.get("sec-fetch-site") == "cross-site":
                    raise Refused(403, "Refused: this form was posted from another site.")
                sid = self.sessions.session_id(request.cookies.get(COOKIE))
                if sid is None:
                    if self.sessions.login_required:
                        raise Refused(401, "Your session has ended: log in again.")
                    raise Refused(403, "No session: reload the page, then try again.")
                request.state.sid = sid
                form = await read_form(request)
                if not self.sessions.csrf_matches(sid, form.get("csrf", "")):
                    raise Refused(403, "Refused: the form's CSRF token is missing or wrong.")
                if changes and self.read_only:
                    raise Refused(403, "The dashboard is read-only (EAT_UI_READ_ONLY).")
                back = views.safe_back(form.get("back"), BASE)
                try:
                    kind, text = await handler(request, form)
                except InvalidInput as exc:
                    kind, text = "error", exc.error
            except (Refused, BadCursor, InvalidInput, RedisError, OSError) as exc:
                return self._failure(request, exc, "look at the message's state, then retry")
            response = RedirectResponse(back, 303)
            response.headers.append("set-cookie", _flash_cookie(kind, text))
            return response

        return endpoint

    def _source(self) -> Source:
        if self.source is None:
            raise Refused(503, "Redis not reached yet (storage unavailable): reload soon.")
        return self.source

    # --- pages ---------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        figures = await self._source().overview()
        return self.render(request, "overview.html", nav="overview", o=figures)

    async def live(self, request: Request) -> Response:
        figures = await self._source().overview()
        return self.render(request, "_live.html", o=figures)

    async def history(self, request: Request) -> Response:
        minutes = await self._source().history(self.clock())
        return JSONResponse(views.chart_series(minutes))

    async def search(self, request: Request) -> Response:
        given = request.query_params.get("uuid", "").strip()
        if not given:
            return self.render(request, "message.html", nav="message", uuid="", view=None)
        try:
            uuid = normalize_uuid(given)
        except InvalidInput as exc:
            return self.render(
                request,
                "message.html",
                422,
                nav="message",
                uuid=given,
                view=None,
                problem=exc.error,
            )
        return RedirectResponse(f"{BASE}/messages/{uuid}", 303)

    async def message(self, request: Request) -> Response:
        uuid = _path_uuid(request)
        try:
            view = await self._source().message(uuid)
        except CorruptRecord as exc:
            raise Refused(
                500, f"{exc}; the next script that meets it moves it to the dead stream."
            ) from None
        if view is None:
            return self.render(
                request,
                "message.html",
                404,
                nav="message",
                uuid=uuid,
                view=None,
                problem=f"No message {uuid}. (A delivered, cancelled or dead message's record "
                f"is kept for EAT_RETENTION, {self.settings.retention:g} s.)",
            )
        return self.render(
            request,
            "message.html",
            nav="message",
            uuid=uuid,
            view=view,
            actions=ACTIONS.get(view.record.state, ()),
        )

    async def scheduled(self, request: Request) -> Response:
        cursor = request.query_params.get("cursor") or None
        items, following = await self._source().scheduled(PAGE_SIZE, cursor)
        return self.render(
            request,
            "scheduled.html",
            nav="scheduled",
            items=items,
            next=following,
            first=cursor is None,
        )

    async def dead(self, request: Request) -> Response:
        cursor = request.query_params.get("cursor") or None
        rows, following = await self._source().dead(PAGE_SIZE, cursor)
        return self.render(
            request, "dead.html", nav="dead", rows=rows, next=following, first=cursor is None
        )

    async def schedules(self, request: Request) -> Response:
        cursor = request.query_params.get("cursor") or None
        rows, following, unreadable = await self._source().schedules(
            PAGE_SIZE, cursor, self._now_ms()
        )
        return self.render(
            request,
            "schedules.html",
            nav="schedules",
            rows=rows,
            unreadable=unreadable,
            next=following,
            first=cursor is None,
        )

    async def partitions(self, request: Request) -> Response:
        figures = await self._source().overview()
        return self.render(request, "partitions.html", nav="partitions", o=figures)

    def confirm(self, what: str) -> Handler:
        async def show(request: Request) -> Response:
            figures = await self._source().overview()
            return self.render(request, "confirm.html", nav="dead", what=what, count=figures.dead)

        return show

    # --- actions -------------------------------------------------------------------------

    async def act(self, request: Request, form: dict[str, str]) -> tuple[str, str]:
        uuid = _path_uuid(request)
        name = request.path_params["action"]
        source = self._source()
        if name == "cancel":
            return _said(await source.cancel(uuid), uuid, "cancelled", "Cancelled")
        if name == "reschedule":
            run_at = views.parse_form_time(form.get("run_at", ""))
            outcome = await source.reschedule(uuid, run_at)
            return _said(outcome, uuid, "rescheduled", f"Rescheduled to {views.when(run_at)}")
        if name == "run-now":
            return _said(await source.run_now(uuid), uuid, "run now", "Due now")
        if name == "replay":
            outcome = await source.replay(uuid)
            if outcome.kind == "missing":
                return "error", f"{uuid} is not in the dead stream."
            if outcome.kind == "conflict":
                return "error", (
                    f"Not replayed: {uuid} is {outcome.state}, not dead; replaying its dead "
                    "entry would run it twice."
                )
            log.info("replayed", uuid=uuid, via="dashboard")
            return "ok", f"Replayed {uuid}: queued, a worker runs it now."
        if name == "delete-dead":
            if not await source.drop_dead(uuid):
                return "error", f"{uuid} is not in the dead stream."
            log.info("dead letter deleted", uuid=uuid, via="dashboard")
            return "ok", f"Deleted the dead entry of {uuid}."
        raise Refused(404, f"No action {name!r}.")

    async def replay_all(self, request: Request, form: dict[str, str]) -> tuple[str, str]:
        replayed, skipped = await self._source().replay_all()
        log.info("replayed dead letters", replayed=replayed, skipped=skipped, via="dashboard")
        extra = f" ({skipped} skipped: their messages are live again)" if skipped else ""
        return "ok", f"Replayed {replayed} dead letter{'s' * (replayed != 1)}{extra}."

    async def purge(self, request: Request, form: dict[str, str]) -> tuple[str, str]:
        deleted = await self._source().purge_dead()
        log.info("dead letters purged", deleted=deleted, via="dashboard")
        return "ok", f"Purged {deleted} dead letter{'s' * (deleted != 1)}."

    # --- login ---------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        if not self.sessions.login_required:
            return RedirectResponse(BASE, 303)
        following = views.safe_back(request.query_params.get("next"), BASE)
        return self.render(request, "login.html", next=following, problem=None)

    async def login(self, request: Request) -> Response:
        if not self.sessions.login_required:
            return RedirectResponse(BASE, 303)
        try:
            if request.headers.get("sec-fetch-site") == "cross-site":
                raise Refused(403, "Refused: this form was posted from another site.")
            form = await read_form(request)
        except (Refused, InvalidInput) as exc:
            return self._failure(request, exc)
        following = views.safe_back(form.get("next"), BASE)
        if not self.sessions.token_matches(form.get("token", "")):
            log.warning(
                "dashboard login refused", client=request.client.host if request.client else None
            )
            return self.render(
                request, "login.html", 401, next=following, problem="That is not the API token."
            )
        response = RedirectResponse(following, 303)
        response.headers.append("set-cookie", cookie_header(self.sessions.issue()))
        return response

    async def logout(self, request: Request, form: dict[str, str]) -> tuple[str, str]:
        return "ok", "Logged out."

    # --- the app -------------------------------------------------------------------------

    def app(self) -> Starlette:
        page, action = self.page, self.action
        logout_action = action(self.logout, changes=False)

        async def logout(request: Request) -> Response:
            response = await logout_action(request)
            if response.status_code == 303:
                response.headers["location"] = f"{BASE}/login"
                response.headers.append("set-cookie", cookie_header("", 0))
            return response

        async def not_found(request: Request, exc: Exception) -> Response:
            return self.error_page(request, 404, "No such page.")

        async def method_not_allowed(request: Request, exc: Exception) -> Response:
            return Response("method not allowed", 405, media_type="text/plain")

        routes = [
            Route(BASE, page(self.overview)),
            Route(f"{BASE}/live", page(self.live, fragment=True)),
            Route(f"{BASE}/history.json", page(self.history, fragment=True)),
            Route(f"{BASE}/messages", page(self.search)),
            Route(f"{BASE}/messages/{{uuid}}", page(self.message)),
            Route(f"{BASE}/messages/{{uuid}}/{{action}}", action(self.act), methods=["POST"]),
            Route(f"{BASE}/scheduled", page(self.scheduled)),
            Route(f"{BASE}/dead", page(self.dead)),
            Route(f"{BASE}/dead/replay-all", page(self.confirm("replay-all"))),
            Route(f"{BASE}/dead/replay-all", action(self.replay_all), methods=["POST"]),
            Route(f"{BASE}/dead/purge", page(self.confirm("purge"))),
            Route(f"{BASE}/dead/purge", action(self.purge), methods=["POST"]),
            Route(f"{BASE}/schedules", page(self.schedules)),
            Route(f"{BASE}/partitions", page(self.partitions)),
            Route(f"{BASE}/login", self.login_form),
            Route(f"{BASE}/login", self.login, methods=["POST"]),
            Route(f"{BASE}/logout", logout, methods=["POST"]),
            Mount(STATIC, StaticFiles(packages=[("app.http.ui", "static")]), name="static"),
        ]
        app = Starlette(routes=routes, exception_handlers={404: not_found, 405: method_not_allowed})
        app.router.redirect_slashes = False
        app.add_middleware(SecurityHeaders, static_prefix=STATIC + "/")
        return app


def _here(request: Request) -> str:
    """The path and query of this request: where an action on its page comes back to."""
    return request.url.path + (f"?{request.url.query}" if request.url.query else "")


def _path_uuid(request: Request) -> str:
    try:
        return normalize_uuid(request.path_params["uuid"])
    except InvalidInput as exc:
        raise Refused(422, exc.error) from None


def _said(outcome: Outcome, uuid: str, what: str, done: str) -> tuple[str, str]:
    """A flash notice for the outcome of a change to one message."""
    if outcome.kind == "missing":
        return "error", f"No message {uuid}."
    if outcome.kind == "conflict":
        return "error", (
            f"Not {what}: {uuid} is {outcome.state}; only a scheduled or retrying message can be."
        )
    log.info(what, uuid=uuid, state=outcome.state, via="dashboard")
    state = "queued, a worker runs it now" if outcome.state == State.QUEUED else outcome.state
    return "ok", f"{done}: {uuid} is {state}."


async def read_form(request: Request) -> dict[str, str]:
    """A urlencoded form of a few small fields (no multipart, nothing repeated)."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/x-www-form-urlencoded":
        raise Refused(415, "A form must be posted as application/x-www-form-urlencoded.")
    body = await read_body(
        request.receive,
        request.headers.get("content-length"),
        FORM_LIMIT,
        getattr(request.app.state, "buffered", None),
    )
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=8)
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, "The form could not be read.") from None
    return dict(pairs)


def _flash_cookie(kind: str, text: str) -> str:
    value = quote(f"{kind}:{text[:FLASH_CHARS]}", safe="")
    age = 60 if text else 0
    return f"{FLASH}={value}; Path=/; Max-Age={age}; Secure; HttpOnly; SameSite=Strict"


def _read_flash(value: str) -> dict[str, str] | None:
    kind, _, text = unquote(value).partition(":")
    if kind not in ("ok", "error") or not text:
        return None
    return {"kind": kind, "text": text[:FLASH_CHARS]}
