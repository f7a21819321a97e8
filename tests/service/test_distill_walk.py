"""The /distill-batch request's walk through the project's modules (tests/_support/walk.py).

It was 23 stays and 11 returns; the shared keyed flow (`service.flows.keyed.serve`, issue 28) and the
licensee's watermark (`watermarks.issuer.enabled_for`, issue 25, asked before the call opens) took it to
25/11. Now 19 and 5. What went: the schema's validator for "exactly one of `inputs` and `inputs_b64`" (the
decoder, where the two forms part ways, checks it), the registry's `ready`/`get` calls (the decoder looks
the model up in `registry.by_name`), the sample counter bumped inside `ServedModel.infer` (the flows count
what they answered, once, at the end, before the quota headers so that those and the answer's render are
one stay in `schemas`), the flow's own quota-header helper (`schemas.quota_headers`), the middleware's call
back into the decoder for the model label (it reads `decode.MODEL_KEY` on the scope) and the flow's answer
record's generated `__init__` (`KeyedAnswer` is a NamedTuple: no call back into the flow). The returns left
are real: the body read through the body-limit middleware (and back to the decoder), the audit row settled
after the forward pass, the request metrics recorded by the middleware after the flow's own. The stays
left are the request's parts: middleware, route, state, flow, client id, token, decoder, watermark, crud,
registry, batcher, softmax, metrics, schemas. The bars keep it from growing.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests._support.api import ApiHelper
from tests._support.walk import WalkRecorder, profiled

MAX_STAYS = 19
MAX_RETURNS = 5


def test_a_distill_batch_request_walks_the_modules_in_one_pass(app: FastAPI) -> None:
    recorder = WalkRecorder()
    with profiled(recorder), TestClient(app) as client:
        api = ApiHelper(client)
        _, _, headers = api.user_with_key(scopes=["alpha"])
        assert api.distill(headers).status_code == 200  # warm: the batcher's collector, pools, caches
        with recorder.recording():
            r = api.distill(headers)
    assert r.status_code == 200, r.text
    walk = recorder.walk("service.routes.distill", "distill_batch")
    print(walk)
    assert len(walk.stays) <= MAX_STAYS and walk.returns <= MAX_RETURNS, str(walk)
