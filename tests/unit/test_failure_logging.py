"""Every Redis error is logged with Redis' own message, not only the exception's type:
"ResponseError" alone cannot tell NOGROUP from OOM from a script error."""

from __future__ import annotations

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from structlog.testing import capture_logs

from app.http.answers import failure_answer


def test_the_api_logs_a_redis_refusal_with_redis_message() -> None:
    with capture_logs() as logs:
        answer = failure_answer(ResponseError("OOM command not allowed"), "/x", "retry")
    assert answer is not None and answer[0] == 503
    [line] = logs
    assert line["error"] == "ResponseError: OOM command not allowed"


def test_the_api_logs_redis_being_unreachable_with_the_reason() -> None:
    with capture_logs() as logs:
        failure_answer(RedisConnectionError("Error 111 connecting to 127.0.0.1:1."), "/x", "retry")
    [line] = logs
    assert line["error"] == "ConnectionError: Error 111 connecting to 127.0.0.1:1."
