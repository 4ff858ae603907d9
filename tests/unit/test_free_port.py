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
    monkeypatch.setattr(servers, "_ephemeral_low", lambda: 1024)  # the OS picks
    monkeypatch.setattr(servers.socket, "socket", OsPicking([50001, 50001, 50001, 50002]))
    assert [servers.free_port(), servers.free_port()] == [50001, 50002]


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = [servers.free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    with socket.create_server(("127.0.0.1", ports[-1])):
        pass


def test_ports_come_from_below_the_ephemeral_range_with_their_bus_ports() -> None:
    low = servers._ephemeral_low()
    assert low > servers._PICK_TO + 10_000, "this machine's ephemeral range covers ours"
    for port in (servers.free_port() for _ in range(50)):
        assert servers._PICK_FROM <= port < servers._PICK_TO
        assert port + 10_000 < low


def test_a_port_something_holds_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    held = socket.create_server(("127.0.0.1", 0))
    port = held.getsockname()[1]
    picks = iter([port, port, *range(15_000, 15_200)])

    class Picks:
        def randrange(self, start: int, stop: int) -> int:
            return next(picks)

    monkeypatch.setattr(servers, "_random", Picks())
    monkeypatch.setattr(servers, "_RECENT_PORTS", type(servers._RECENT_PORTS)(maxlen=8))
    monkeypatch.setattr(servers, "_ephemeral_low", lambda: 60_000)
    with held:
        got = servers.free_port()
    assert got != port and 15_000 <= got < 15_200
