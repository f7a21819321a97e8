"""The SSRF guard of POST /admin/trace's suspect client: hosts allowed by name, address or network only;
private and loopback addresses only when listed by address; no credentials, no other schemes, no redirects."""

from __future__ import annotations

import numpy as np
import pytest

from service.watermarks.suspect import (
    HostPolicy,
    HttpSuspect,
    SuspectFailed,
    SuspectRefused,
    check_url,
    guarded_client,
    parse_probabilities,
)
from tests._support.suspects import predict_endpoint


@pytest.mark.parametrize(
    ("entries", "url", "status"),
    [
        ([], "https://models.example/predict", 403),  # nothing allowed by default
        (["models.example"], "https://other.example/predict", 403),
        (["models.example"], "ftp://models.example/predict", 422),
        (["models.example"], "file:///etc/passwd", 422),
        (["models.example"], "https://user:pw@models.example/predict", 422),
        (["models.example"], "https:///predict", 422),
        (["10.0.0.0/8"], "http://10.1.2.3/predict", None),
        (["10.0.0.0/8"], "http://11.1.2.3/predict", 403),
        (["models.example"], "https://models.example:8443/predict", None),
    ],
)
def test_check_url(entries: list[str], url: str, status: int | None) -> None:
    policy = HostPolicy.parse(entries)
    if status is None:
        check_url(url, policy)
        return
    with pytest.raises(SuspectRefused) as info:
        check_url(url, policy)
    assert info.value.status == status


def test_a_listed_name_never_unlocks_a_private_address() -> None:
    # "localhost" is listed by name, but it resolves to loopback: refused unless 127.0.0.1 is listed.
    with predict_endpoint(lambda x: np.full((len(x), 3), 1 / 3)) as url:
        url = url.replace("127.0.0.1", "localhost")
        with (
            guarded_client(HostPolicy.parse(["localhost"]), 5.0) as client,
            pytest.raises(SuspectRefused, match="private, loopback"),
        ):
            HttpSuspect(url, client)(np.zeros((2, 1, 8, 8), np.float32))
        with guarded_client(HostPolicy.parse(["localhost", "127.0.0.1"]), 5.0) as client:
            p = HttpSuspect(url, client)(np.zeros((2, 1, 8, 8), np.float32))
        np.testing.assert_allclose(p, 1 / 3)


def test_redirects_are_not_followed() -> None:
    with (
        predict_endpoint(lambda x: x, redirect_to="http://169.254.169.254/latest/meta-data/") as url,
        guarded_client(HostPolicy.parse(["127.0.0.1"]), 5.0) as client,
        pytest.raises(SuspectFailed, match="redirect"),
    ):
        HttpSuspect(url, client)(np.zeros((1, 1, 8, 8), np.float32))


def test_answers_are_bounded_and_checked() -> None:
    with (
        predict_endpoint(lambda x: np.full((len(x), 100), 0.01)) as url,
        guarded_client(HostPolicy.parse(["127.0.0.1/32"]), 5.0) as client,
        pytest.raises(SuspectFailed, match="exceeds 100 bytes"),
    ):
        HttpSuspect(url, client, max_response_bytes=100)(np.zeros((4, 1, 8, 8), np.float32))
    with pytest.raises(SuspectFailed, match="shape"):
        parse_probabilities({"predictions": [{"probabilities": [0.5, 0.5]}]}, 2)
    with pytest.raises(SuspectFailed, match="not finite"):
        parse_probabilities({"probabilities": [[0.5, -0.5]]}, 1)
    with pytest.raises(SuspectFailed, match="no `predictions"):
        parse_probabilities({"nope": 1}, 1)
