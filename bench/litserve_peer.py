"""The peer of the serving benchmark: one boxed model served by LitServe, answering sdb's /predict format.

    python -m bench.litserve_peer --model-dir models/digits-demo --port 8100 [--threads 1]

`bench.serve_bench --peer litserve` starts it (one per model) and drives it with `bench.loadgen`, in rounds
alternating with the sdb server. It serves what sdb serves: the box loaded by `sdb_core.artifact.load_box`,
its network replaced by the same frozen TorchScript trace (`BoxedModel.script()`), the plain path, the
same torch threads. Requests and answers have /predict's JSON format (`{"model", "inputs_b64"}` with a
base64 `.npy` batch in; `{"model", "version", "predictions": [{"label", "class_name", "probabilities"}]}`
out), decoded and checked by sdb's own helpers (`service.decode`) and answered with its softmax, so that
both servers do the same work per request and only the serving stack differs. LitServe runs as its users
would run it for this: batching on (max batch and wait as sdb's defaults: 256 samples, 2 ms), one API
server and one inference worker, no auth, no audit, no rate limit.

LitServe comes from the `bench` extra (`pip install -e .[bench]`); it is never a runtime dependency.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

try:
    import litserve as ls
except ImportError as exc:  # pragma: no cover - the bench extra is missing
    raise SystemExit("the LitServe peer needs the bench extra: .venv/bin/pip install -e '.[bench]'") from exc

MAX_REQUEST_SAMPLES = 1024  # sdb's default SDB_MAX_REQUEST_SAMPLES


class BoxAPI(ls.LitAPI):  # type: ignore[misc]
    """The plain path of one box, batched by LitServe."""

    def __init__(self, model_dir: Path, threads: int, max_batch_size: int, batch_timeout_s: float) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout_s, api_path="/predict")
        self.model_dir = model_dir
        self.threads = threads

    def setup(self, device: str) -> None:
        from sdb_core.artifact import load_box

        torch.set_num_threads(self.threads)
        box = load_box(self.model_dir, device="cpu")
        self.box = box.script()
        self.input_shape = tuple(int(d) for d in box.input_shape)
        self.class_names = list(box.class_names)
        with torch.inference_mode():  # warm-up, as sdb does at start
            self.box.plain_logits(torch.zeros((1, *self.input_shape)))

    # No annotations on decode_request's argument and encode_response's result: LitServe builds its
    # endpoint from them, and none means "the JSON body as a dict in, a dict out as JSON".
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        from fastapi import HTTPException

        from service.decode import decode_b64_npy, validate_batch

        if request.get("model") not in (None, self.box.name):
            raise HTTPException(status_code=404, detail=f"unknown model {request.get('model')!r}")
        text = request.get("inputs_b64")
        if not isinstance(text, str):
            raise HTTPException(status_code=422, detail="send inputs_b64 (a base64 .npy batch)")
        return validate_batch(decode_b64_npy(text), self.input_shape, MAX_REQUEST_SAMPLES)

    def batch(self, inputs: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
        return np.concatenate(inputs), [len(x) for x in inputs]

    def predict(self, batch: tuple[np.ndarray, list[int]]) -> list[np.ndarray]:
        from service.outputs import softmax

        x, sizes = batch
        with torch.inference_mode():
            logits = self.box.plain_logits(torch.from_numpy(x)).float().numpy()
        probs = softmax(logits)
        return np.split(probs, np.cumsum(sizes)[:-1])

    def unbatch(self, output: list[np.ndarray]) -> list[np.ndarray]:
        return output

    def encode_response(self, probs: np.ndarray):  # type: ignore[no-untyped-def]
        names = self.class_names
        return {
            "model": self.box.name,
            "version": self.box.version,
            "predictions": [
                {"label": int(label), "class_name": names[label], "probabilities": row.tolist()}
                for label, row in zip(probs.argmax(axis=1).tolist(), probs, strict=True)
            ],
        }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Serve one boxed model's plain path with LitServe.")
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the inference worker")
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--batch-timeout-ms", type=float, default=2.0)
    p.add_argument("--api-servers", type=int, default=1, help="LitServe's num_api_servers (HTTP processes)")
    p.add_argument("--workers", type=int, default=1, help="LitServe's workers_per_device (inference)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    api = BoxAPI(args.model_dir, args.threads, args.max_batch_size, args.batch_timeout_ms / 1000.0)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=args.workers, timeout=30)
    server.run(
        host="127.0.0.1",
        port=args.port,
        num_api_servers=args.api_servers,
        log_level="warning",
        generate_client_file=False,
    )


if __name__ == "__main__":
    main()
