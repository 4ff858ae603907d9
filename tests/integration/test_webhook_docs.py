"""The receiver example on docs/webhooks.md, run as it is written (but for the port it
listens on), against the webhook handler's real requests."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from pathlib import Path

import pytest

from app.store import Delivery
from app.targets import TargetPolicy
from tests.receiver import SECRET
from workers.handlers import DeliveryFailed
from workers.webhook import WebhookHandler

PAGE = Path(__file__).resolve().parents[2] / "docs" / "webhooks.md"
SERVE = 'HTTPServer(("0.0.0.0", 9000), Hook).serve_forever()'


def example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.S)
    (code,) = [b for b in blocks if "webhook.verify" in b]
    assert code.rstrip().endswith(SERVE), "the example ends by serving"
    return code.rstrip()[: -len(SERVE)]


def test_the_receiver_example_verifies_a_real_delivery_and_refuses_a_wrong_signature(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EAT_WEBHOOK_SECRET", SECRET)
    namespace: dict = {"__name__": "receiver_example"}
    exec(compile(example(), str(PAGE), "exec"), namespace)
    server = namespace["HTTPServer"](("127.0.0.1", 0), namespace["Hook"])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    delivery = Delivery("1-1", "123e4567-e89b-12d3-a456-426614174000", b"", '{"n": 1}', 5, 0)

    async def deliver(secret: str) -> None:
        handler = WebhookHandler(secret, TargetPolicy(default_url=url))
        try:
            await handler(delivery)
        finally:
            await handler.aclose()

    try:
        asyncio.run(deliver(SECRET))  # 204: no exception
        asyncio.run(deliver(SECRET))  # again, the same webhook-id: deduplicated
        with pytest.raises(DeliveryFailed) as refused:
            asyncio.run(deliver("whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB"))
        assert refused.value.reason.startswith("HTTP 401") and not refused.value.retry
    finally:
        server.shutdown()
        server.server_close()
        with contextlib.suppress(RuntimeError):
            thread.join(5)
    printed = capsys.readouterr().out
    assert printed.count('due now: {"n": 1}') == 1
