"""The /distill-batch request's walk through the project's modules (tests/_support/walk.py).

Before the audit lifecycle moved into `service.crud.keyed_calls` the walk was 23 stays and 11 returns by
this definition, three of the returns into the route's own helpers (reserve, finalize, headers) and one
into `crud.audits` for the input digest; now the crud context takes one stay to reserve and one to settle,
and the model label is read by an explicit call (`decode.request_model`), so the count is the same. The
rest is fixed by the request's parts: the middleware around it, the decoder (which reads the body through
the body limit, validates with the schema and resolves the model), the inference (registry, batcher,
metrics), the softmax and the response. Since the keyed call became one flow shared with the Open
Inference Protocol's keyed `infer` (`service.flows.keyed.serve`, issue 28) the route hands it over in one
call: one stay more (the flow's own module), the same returns (the answer's headers are built there, not in
the route). The licensee's watermark (issue 25) adds its module's stay (`watermarks.issuer.enabled_for`,
asked before the call opens, so that it is no return into the crud context). The bars keep it from growing.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests._support.api import ApiHelper
from tests._support.walk import WalkRecorder, profiled

MAX_STAYS = 25
MAX_RETURNS = 11


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
