"""The OpenAPI document: it lists exactly the routes the app serves (built from them,
refusing one without documentation), its schemas are valid JSON Schema, and the
running app (in-process, real Redis) honours it for inputs schemathesis generates:
no 5xx, only documented status codes, bodies and content types as documented.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator

import jsonschema
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis import settings as hsettings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python import asgi as schemathesis_asgi
from starlette.responses import Response
from starlette.routing import Route

from app.http import openapi
from app.http.app import create_app
from app.settings import Settings

with warnings.catch_warnings():
    # Starlette's test client asks for httpx2 at import; the project's test extra has httpx.
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from starlette.testclient import TestClient

DOC = "/api/v1/openapi.json"


@pytest.fixture
def settings(redis_url: str, prefix: str) -> Settings:
    return Settings.from_env({}, redis_url=redis_url, prefix=prefix, max_message_bytes=1000)


def document(settings: Settings) -> dict:
    return openapi.build(create_app(settings).routes)


def served(settings: Settings) -> set[tuple[str, str]]:
    app = create_app(settings)
    return {
        (method.lower(), route.path)
        for route in app.routes
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"
    }


def test_the_document_lists_exactly_the_routes_the_app_serves(settings):
    doc = document(settings)
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert documented == served(settings)
    assert {"/api/v1/save-message", "/healthz", "/readyz", "/metrics", DOC} <= set(doc["paths"])


async def endpoint(request):
    return Response()


def test_a_route_without_documentation_is_refused():
    documented = openapi.Operation("GET", "/a", endpoint, openapi.Doc("A", {}))
    with pytest.raises(ValueError, match="/b"):
        openapi.build([documented, Route("/b", endpoint)])


def test_an_operation_routed_twice_is_refused():
    twice = [openapi.Operation("GET", "/a", endpoint, openapi.Doc(s, {})) for s in "AB"]
    with pytest.raises(ValueError, match="GET /a is routed twice"):
        openapi.build(twice)


def test_a_path_parameter_without_documentation_is_refused():
    with pytest.raises(ValueError, match="id"):
        openapi.build([openapi.Operation("GET", "/a/{id}", endpoint, openapi.Doc("A", {}))])


def test_documenting_foreign_routes_refuses_a_route_or_a_doc_without_the_other():
    doc = openapi.Doc("A", {})
    routes = [Route("/a", endpoint), Route("/b", endpoint)]
    [op] = openapi.documented(routes[:1], {"/a": doc})
    assert (op.method, op.path, op.endpoint, op.name, op.doc) == (
        "get",
        "/a",
        endpoint,
        "endpoint",
        doc,
    )
    with pytest.raises(ValueError, match="/b"):
        openapi.documented(routes, {"/a": doc})
    with pytest.raises(ValueError, match="/c"):
        openapi.documented(routes[:1], {"/a": doc, "/c": doc})


def test_every_api_operation_is_behind_the_optional_token_and_documents_401(settings):
    for path, ops in document(settings)["paths"].items():
        for method, op in ops.items():
            if path.startswith("/api/"):
                assert op["security"] == [{"bearer": []}, {}], (method, path)
                assert "401" in op["responses"], (method, path)
            else:
                assert "security" not in op, (method, path)


def test_the_document_schemas_are_valid_json_schema(settings):
    doc = document(settings)
    assert doc["openapi"].startswith("3.1")
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_the_app_serves_the_document_of_its_routes(settings, redis_client: redis.Redis):
    app = create_app(settings)
    with TestClient(app) as client:
        response = client.get(DOC)
    assert response.status_code == 200
    assert response.json() == openapi.build(app.routes)


@pytest.fixture
def api_schema(settings: Settings, redis_client: redis.Redis) -> Iterator[object]:
    # redis_client: the test's keys are deleted afterwards.
    app = create_app(settings)
    try:
        yield schemathesis.openapi.from_asgi(DOC, app)
    finally:
        # schemathesis keeps each app's lifespan running; end it (closes the Redis client).
        schemathesis_asgi.shutdown_lifespans()


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@hsettings(
    max_examples=25,
    deadline=None,
    # No shrinking: a failure is printed as found; shrinking replays against Redis.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_the_app_honours_its_document_for_generated_input(case):
    case.call_and_validate(
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ]
    )


def test_with_legacy_http_the_document_gives_save_message_the_original_answer(settings):
    legacy = dataclasses.replace(settings, legacy_http=True)
    operation = document(legacy)["paths"]["/api/v1/save-message"]["post"]
    assert "201" not in operation["responses"]
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/LegacySaved"}
    default = document(settings)["paths"]["/api/v1/save-message"]["post"]["responses"]
    assert {"200", "201"} <= set(default)
