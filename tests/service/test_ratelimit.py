"""The per-client token-bucket rate limiter."""

from __future__ import annotations

from service.ratelimit import RateLimiter


def test_rate_limiter_buckets() -> None:
    limiter = RateLimiter(per_minute=3)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.acquire("a")
    assert 0 < wait <= 20.0  # one token comes back every 20 s
    assert RateLimiter.retry_after(wait) == str(int(-(-wait // 1)))
    assert limiter.acquire("b") == 0.0  # buckets are per client
    assert RateLimiter(per_minute=0).acquire("a") == 0.0  # 0 turns the limit off
