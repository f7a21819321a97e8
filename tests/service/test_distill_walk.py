"""The /distill-batch request's walk through the project's modules (tests/_support/walk.py).

It was 23 stays and 11 returns; the shared keyed flow (`service.flows.keyed.serve`, issue 28) and the
licensee's watermark (issue 25) took it to 25/11. Now 15 and 4. What went: the schema's validator for
"exactly one of `inputs` and `inputs_b64`" (the decoder, where the two forms part ways, checks it), the
registry's `ready`/`get` calls (the decoder looks the model up in `registry.by_name`), the flow's own
quota-header helper (`schemas.quota_headers`, in one stay with the answer's render), the middleware's call
back into the decoder for the model label (it reads `decode.MODEL_KEY` on the scope), the flow's answer
record's generated `__init__` (`KeyedAnswer` is a NamedTuple), `get_state` (the route reads the state
inline), the watermark's per-model switch (a set lookup, not a call), the softmax (in the worker thread that
marks the soft labels) and the flow's own sample counters (counted with the request's metrics by the
middleware, `metrics.ANSWERED_KEY`). The returns left are real: the body read through the body-limit
middleware (and back to the decoder), the audit row settled after the forward pass, the middleware's
answer. The stays left are the request's parts: middleware, route, flow, client id, token, decoder, crud,
registry, batcher, schemas, metrics. The bars keep it from growing.
"""

from __future__ import annotations

import gc

from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests._support.api import ApiHelper
from tests._support.walk import WalkRecorder, profiled

MAX_STAYS = 15
MAX_RETURNS = 4


def test_a_distill_batch_request_walks_the_modules_in_one_pass(app: FastAPI) -> None:
    recorder = WalkRecorder()
    with profiled(recorder), TestClient(app) as client:
        api = ApiHelper(client)
        _, _, headers = api.user_with_key(scopes=["alpha"])
        assert api.distill(headers).status_code == 200  # warm: the batcher's collector, pools, caches
        gc.collect()
        gc.disable()  # a collection's callbacks (observability.gc_tuning) are no part of the request's walk
        try:
            with recorder.recording():
                r = api.distill(headers)
        finally:
            gc.enable()
    assert r.status_code == 200, r.text
    walk = recorder.walk("service.routes.distill", "distill_batch")
    print(walk)
    assert len(walk.stays) <= MAX_STAYS and walk.returns <= MAX_RETURNS, str(walk)
