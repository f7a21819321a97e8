"""Suspect models for trace tests: a loopback HTTP endpoint answering like POST /predict with the
probabilities of any function (e.g. a licensee's watermarked labels served as a model: a perfect leak), and
a student that memorised its licensee's labels on the images it was taught on."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch
from torch import Tensor

from sdb_core.watermark import Watermark, apply_watermark, retemper

ProbFn = Callable[[np.ndarray], np.ndarray]


def memorising_student(
    wm: Watermark, taught: np.ndarray, reference: Callable[[Tensor], Tensor], temperature: float = 4.0
) -> ProbFn:
    """The licensee's watermarked labels (at `temperature`, answered at T = 1) on the images it was taught
    on, the clean reference's probabilities on any other: a student that memorised its transfer set and
    learned nothing else. Takes an array (over HTTP) or a tensor (in process)."""
    seen_rows = {row.tobytes() for row in np.ascontiguousarray(taught, dtype=np.float32)}

    def student(x: np.ndarray | Tensor) -> np.ndarray:
        a = np.ascontiguousarray(x, dtype=np.float32)
        t = torch.from_numpy(a)
        with torch.inference_mode():
            out = reference(t).clone()
            seen = torch.tensor([row.tobytes() in seen_rows for row in a])
            if seen.any():
                marked = apply_watermark(wm, t[seen], retemper(out[seen], temperature))
                out[seen] = retemper(marked, 1.0 / temperature)
        return out.numpy()

    return student


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
