"""HTTP client of the sdb service, for licensed users (and anyone, for /predict).

    from sdb.client import SdbClient
    with SdbClient("http://localhost:8000", api_key="sdb_...") as client:
        out = client.distill_dataset(x_train, model="demo")   # tqdm progress, retries
        soft, logits = out.soft_labels, out.logits

`remote_teacher(...)` wraps the client as a teacher function for `sdb_core.distill` (`sdb distill --remote`).
Inputs travel as base64 float32 `.npy` (exact, compact, no Python lists on either side). Retries with
exponential backoff on connection errors, 429 with Retry-After (rate limit) and 502/503/504; a 429 without
Retry-After (the sample quota is spent) is final. An expired access token is refreshed once, transparently.
"""

from __future__ import annotations

import base64
import io
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import numpy as np
import orjson
import torch
from tqdm.auto import tqdm

RETRY_STATUSES = frozenset({429, 502, 503, 504})
# Retries are said at once, as warnings (printed on stderr when the application configured no logging).
logger = logging.getLogger(__name__)
TOKEN_MARGIN_S = 30.0


class SdbError(Exception):
    """An answer the client will not retry: carries the HTTP status and the server's `detail`."""

    def __init__(self, status_code: int, detail: Any) -> None:
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


@dataclass(frozen=True)
class DistillResult:
    model: str
    version: str
    temperature: float
    soft_labels: np.ndarray  # [N, C] float32
    logits: np.ndarray  # [N, C] float32


def encode_npy(x: np.ndarray | torch.Tensor) -> str:
    """Base64 of the `.npy` bytes of x as float32."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x, dtype=np.float32), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _detail(response: httpx.Response) -> Any:
    try:
        return response.json().get("detail", response.text)
    except Exception:
        return response.text[:500]


class SdbClient:
    """A session with one sdb server. Thread-compatible (one client per thread is simplest)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 6,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._sleep = sleep
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)
        self._token: str | None = None
        self._token_expires = 0.0

    def __repr__(self) -> str:  # never shows the API key or the token
        return f"SdbClient({self.base_url!r}, api_key={'***' if self._api_key else None})"

    def __enter__(self) -> SdbClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------------------------- plumbing

    def _backoff(self, attempt: int) -> float:
        base: float = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return base * (0.5 + random.random() / 2)

    def _send(self, method: str, path: str, *, auth: bool = False, **kwargs: Any) -> httpx.Response:
        base_headers: dict[str, str] = dict(kwargs.pop("headers", None) or {})
        refreshed = False
        attempt = 0
        while True:
            headers = dict(base_headers)
            if auth:
                headers["Authorization"] = f"Bearer {self.token()}"
            try:
                response = self._http.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError as exc:  # connection refused/reset, timeouts
                if attempt >= self.max_retries:
                    raise
                backoff = self._backoff(attempt)
                logger.warning(
                    "cannot reach %s (%s): retrying in %.1f s (%d of %d)",
                    self.base_url,
                    exc or type(exc).__name__,
                    backoff,
                    attempt + 1,
                    self.max_retries,
                )
                self._sleep(backoff)
                attempt += 1
                continue
            if response.status_code == 401 and auth and not refreshed:
                self._token = None  # expired (or the server restarted): get a fresh token once
                refreshed = True
                continue
            if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                wait = _retry_after(response)
                if response.status_code == 429 and wait is None:
                    raise SdbError(429, _detail(response))  # quota spent: waiting does not help
                pause = min(self.max_backoff_s, wait) if wait is not None else self._backoff(attempt)
                logger.warning(
                    "%s %s answered %d: retrying in %.1f s (%d of %d)",
                    method,
                    path,
                    response.status_code,
                    pause,
                    attempt + 1,
                    self.max_retries,
                )
                self._sleep(pause)
                attempt += 1
                continue
            if response.status_code >= 400:
                raise SdbError(response.status_code, _detail(response))
            return response

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """An authenticated JSON call (e.g. the admin API with an administrator's key): the decoded answer."""
        return self._send(method, path, auth=True, **kwargs).json()

    def token(self) -> str:
        """A valid access token, fetched (POST /auth/token) or refreshed when it is about to expire."""
        if self._api_key is None:
            raise SdbError(401, "this client has no API key; /distill-batch needs one")
        if self._token is None or time.monotonic() > self._token_expires - TOKEN_MARGIN_S:
            response = self._send(
                "POST",
                "/auth/token",
                json={"grant_type": "client_credentials", "client_secret": self._api_key},
            )
            body = response.json()
            self._token = str(body["access_token"])
            self._token_expires = time.monotonic() + float(body.get("expires_in", 300))
        return self._token

    # ------------------------------------------------------------------------------------- endpoints

    def own_key(self) -> dict[str, Any]:
        """GET /auth/key: this key's scopes, sample_quota, samples_used, samples_remaining and expiry."""
        result: dict[str, Any] = self.call("GET", "/auth/key")
        return result

    def predict(
        self, x: np.ndarray | torch.Tensor, model: str | None = None, top_k: int | None = None
    ) -> dict[str, Any]:
        """POST /predict (no token): the plain path's answer, as the server's JSON."""
        body: dict[str, Any] = {"inputs_b64": encode_npy(x)}
        if model is not None:
            body["model"] = model
        if top_k is not None:
            body["top_k"] = top_k
        response = self._send("POST", "/predict", content=orjson.dumps(body), headers=_JSON)
        result: dict[str, Any] = orjson.loads(response.content)
        return result

    def predict_proba(self, x: np.ndarray | torch.Tensor, model: str | None = None) -> np.ndarray:
        body = self.predict(x, model=model)
        return np.asarray([p["probabilities"] for p in body["predictions"]], dtype=np.float32)

    def distill_batch(
        self, x: np.ndarray | torch.Tensor, model: str | None = None, temperature: float | None = None
    ) -> DistillResult:
        """POST /distill-batch: the keyed path's soft labels and logits for one batch."""
        body: dict[str, Any] = {"inputs_b64": encode_npy(x)}
        if model is not None:
            body["model"] = model
        if temperature is not None:
            body["temperature"] = temperature
        response = self._send("POST", "/distill-batch", auth=True, content=orjson.dumps(body), headers=_JSON)
        data = orjson.loads(response.content)
        return DistillResult(
            model=data["model"],
            version=str(data["version"]),
            temperature=float(data["temperature"]),
            soft_labels=np.asarray(data["soft_labels"], dtype=np.float32),
            logits=np.asarray(data["logits"], dtype=np.float32),
        )

    def distill_dataset(
        self,
        x: np.ndarray,
        model: str | None = None,
        temperature: float | None = None,
        batch_size: int = 256,
        progress: bool = True,
    ) -> DistillResult:
        """/distill-batch over a whole dataset, in batches, with a progress bar."""
        # The bar advances as each answer arrives (one request per batch, sent as the bar asks for it).
        results = [
            self.distill_batch(part, model=model, temperature=temperature)
            for part in self._batches(x, batch_size, progress, "distill")
        ]
        if not results:
            raise ValueError("empty dataset")
        return DistillResult(
            model=results[0].model,
            version=results[0].version,
            temperature=results[0].temperature,
            soft_labels=np.concatenate([r.soft_labels for r in results]),
            logits=np.concatenate([r.logits for r in results]),
        )

    def predict_dataset(
        self, x: np.ndarray, model: str | None = None, batch_size: int = 256, progress: bool = True
    ) -> np.ndarray:
        """/predict probabilities over a whole dataset, in batches, with a progress bar."""
        parts = [
            self.predict_proba(p, model=model) for p in self._batches(x, batch_size, progress, "predict")
        ]
        return np.concatenate(parts)

    @staticmethod
    def _batches(x: np.ndarray, batch_size: int, progress: bool, desc: str) -> Iterator[np.ndarray]:
        for start in tqdm(range(0, len(x), batch_size), desc=desc, disable=not progress, leave=False):
            yield x[start : start + batch_size]


_JSON = {"content-type": "application/json"}


def remote_teacher(
    base_url: str,
    api_key: str | None,
    model: str | None = None,
    path: Literal["keyed", "plain"] = "keyed",
    *,
    batch_size: int = 256,
    client: SdbClient | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A teacher function for `sdb_core.distill`: raw inputs [N, ...] -> teacher logits [N, C].

    path="keyed": /distill-batch logits (needs an API key). path="plain": /predict, anonymous; only its
    probabilities p are served, so this returns log p, which differs from the plain logits z by a constant
    per row: softmax(log p / T) = softmax(z / T) at every temperature T.
    """
    if path not in ("keyed", "plain"):
        raise ValueError("path must be 'keyed' or 'plain'")
    session = client or SdbClient(base_url, api_key)

    def teacher(x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().cpu().numpy()
        outs: list[np.ndarray] = []
        for start in range(0, len(arr), batch_size):
            part = arr[start : start + batch_size]
            if path == "keyed":
                outs.append(session.distill_batch(part, model=model).logits)
            else:
                probs = session.predict_proba(part, model=model)
                outs.append(np.log(np.clip(probs, np.finfo(np.float32).tiny, None)))
        return torch.from_numpy(np.concatenate(outs)).to(x.device)

    teacher.client = session  # type: ignore[attr-defined]
    return teacher
