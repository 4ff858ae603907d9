"""free_port() never hands one process the same port twice in a row."""

from __future__ import annotations

import socket

import pytest

from app.ops import servers


class OsPicking:
    """A socket whose bind(0) gets the ports given, in order: what an OS may do."""

    def __init__(self, picks: list[int]) -> None:
        self.picks = picks

    def __call__(self, *args: object) -> OsPicking:
        return self

    def __enter__(self) -> OsPicking:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def bind(self, address: tuple[str, int]) -> None:
        self.port = self.picks.pop(0)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


def test_a_port_the_os_picks_again_before_anything_bound_it_is_not_handed_out_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(servers, "_RECENT_PORTS", type(servers._RECENT_PORTS)(maxlen=8))
    monkeypatch.setattr(servers.socket, "socket", OsPicking([50001, 50001, 50001, 50002]))
    assert [servers.free_port(), servers.free_port()] == [50001, 50002]


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = [servers.free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    with socket.create_server(("127.0.0.1", ports[-1])):
        pass
