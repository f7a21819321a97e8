"""Client identification: trusted proxies only, salted anonymous ids."""

from __future__ import annotations

from starlette.requests import Request as StarletteRequest

from service.limits.clients import ClientIdentifier


def _request(peer: str, forwarded: str | None = None) -> StarletteRequest:
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
    return StarletteRequest({"type": "http", "client": (peer, 1234), "headers": headers})


def test_forwarded_for_is_used_only_from_trusted_proxies() -> None:
    ids = ClientIdentifier(["10.0.0.0/8"], salt="s")
    assert ids.address(_request("203.0.113.5", "198.51.100.1")) == "203.0.113.5"  # untrusted peer: ignored
    assert ids.address(_request("10.1.2.3", "198.51.100.1")) == "198.51.100.1"
    # The right-most untrusted hop is the client; what it put in front could be forged.
    assert ids.address(_request("10.1.2.3", "1.1.1.1, 198.51.100.1, 10.9.9.9")) == "198.51.100.1"
    assert ids.address(_request("10.1.2.3", "garbage")) == "10.1.2.3"
    assert ids.address(_request("10.1.2.3")) == "10.1.2.3"


def test_anonymous_ids_are_salted_hashes() -> None:
    a, b = ClientIdentifier([], salt="one"), ClientIdentifier([], salt="two")
    req = _request("198.51.100.1")
    assert a.anonymous_id(req) == a.anonymous_id(req)
    assert a.anonymous_id(req) != b.anonymous_id(req)
    assert "198.51.100.1" not in a.anonymous_id(req)
