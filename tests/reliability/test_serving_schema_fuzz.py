"""Schema-driven tests of the serving API, in-process.

* schemathesis generates requests from the app's own OpenAPI document (valid and invalid ones)
  for every operation; each answer must not be a 5xx and must be documented (status code,
  content type, response schema). A bounded number of examples keeps it to a few seconds.
* hypothesis: events with an extra field or a wrong-typed field are 422 and write nothing.
"""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tests.conftest_serving import world  # noqa: F401  (fixture)
from tests.reliability.test_serving_hardening import LOCAL, event, make_app, nothing_written

EXAMPLES = 30  # per operation, valid and invalid requests


@pytest.fixture
def served(world):
    settings, *_ = world
    app = make_app(settings, feedback_flush_seconds=0)
    with TestClient(app, base_url=LOCAL, raise_server_exceptions=False) as client:
        yield client, settings


def test_schemathesis_no_5xx_and_every_answer_documented(served):
    from hypothesis import strategies as st_
    from schemathesis import GenerationMode
    from schemathesis.checks import (
        content_type_conformance,
        negative_data_rejection,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    client, _ = served
    schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              negative_data_rejection]
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {(o.method.upper(), o.path) for o in operations} >= {("POST", "/feedback"), ("GET", "/recommend"),
                                                                 ("GET", "/search"), ("GET", "/model")}
    calls = {"n": 0}
    for operation in operations:
        @hsettings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                   suppress_health_check=list(HealthCheck))
        @given(case=st_.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                               operation.as_strategy(GenerationMode.NEGATIVE)))
        def run(case):
            kwargs = case.as_transport_kwargs(base_url=LOCAL)
            kwargs.pop("url", None)
            for key in ("verify", "cert", "allow_redirects", "timeout"):
                kwargs.pop(key, None)
            response = client.request(case.method, case.formatted_path, params=kwargs.pop("params", None),
                                      headers=kwargs.pop("headers", None), cookies=kwargs.pop("cookies", None),
                                      **{k: v for k, v in kwargs.items() if k in ("content", "data", "json", "files")})
            calls["n"] += 1
            assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
            case.validate_response(response, checks=checks)

        run()
    print("schemathesis requests:", calls["n"])
    assert calls["n"] >= 10 * len(operations), calls


_VALUE = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
                   st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
_FIELDS = ["event_id", "user_id", "item_id", "event_type", "label", "timestamp", "query", "model_version",
           "impression_id"]
_WRONG = {  # values of a type the field never accepts
    "event_id": st.one_of(st.integers(), st.lists(st.text(max_size=3), max_size=2), st.booleans()),
    "user_id": st.one_of(st.integers(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
    "item_id": st.one_of(st.floats(allow_nan=False), st.lists(st.integers(), max_size=2)),
    "event_type": st.one_of(st.integers(), st.text(max_size=10).filter(
        lambda t: t not in ("impression", "click", "like", "dislike", "purchase"))),
    "label": st.one_of(st.text(alphabet="abcxyz _-", min_size=1, max_size=5), st.lists(st.integers(), max_size=2)),
    "timestamp": st.one_of(st.booleans(), st.lists(st.integers(), max_size=2),
                           st.text(alphabet="abcxyz :-", max_size=8)),  # (a numeric string is a unix time)
    "query": st.one_of(st.integers(), st.lists(st.text(max_size=3), max_size=2)),
    "impression_id": st.one_of(st.integers(), st.booleans()),
}


@hsettings(max_examples=60, deadline=None, database=None, derandomize=True,
           suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_extra_or_wrong_typed_fields_are_422_and_nothing_is_written(served, data):
    client, settings = served
    body = event("prop-1")
    if data.draw(st.booleans(), label="extra field"):
        name = data.draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in _FIELDS), label="name")
        body[name] = data.draw(_VALUE, label="value")
    else:
        name = data.draw(st.sampled_from(sorted(_WRONG)), label="field")
        body[name] = data.draw(_WRONG[name], label="value")
    batch = data.draw(st.booleans(), label="as batch")
    r = client.post("/feedback", json={"events": [event("prop-0"), body]} if batch else body)
    assert r.status_code == 422, (body, r.status_code, r.text[:300])
    assert nothing_written(settings)
