"""Suspect models for trace tests: a loopback HTTP endpoint answering like POST /predict with the
probabilities of any function (e.g. a licensee's watermarked labels served as a model: a perfect leak)."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

ProbFn = Callable[[np.ndarray], np.ndarray]


@contextmanager
def predict_endpoint(fn: ProbFn, *, redirect_to: str | None = None) -> Iterator[str]:
    """A /predict-like endpoint on 127.0.0.1 (a free port) for the `with` block; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if redirect_to is not None:
                self.send_response(307)
                self.send_header("Location", redirect_to)
                self.end_headers()
                return
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            x = np.load(io.BytesIO(base64.b64decode(body["inputs_b64"])), allow_pickle=False)
            p = fn(x)
            out = json.dumps({"predictions": [{"probabilities": row} for row in p.tolist()]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/predict"
    finally:
        server.shutdown()
        server.server_close()
