"""Property-based fuzzing of every route in the app's OpenAPI schema: no 5xx, ever, plus
schemathesis' default checks (responses match the documented schemas and status codes,
schema-valid requests are accepted) except ``negative_data_rejection``, which also counts an
unknown extra HTTP header as invalid data that must be rejected, and HTTP servers accept those.
One schema-valid request may be refused: a completion whose prompt plus ``max_tokens`` exceed
the model's context gets 400 ``context_length_exceeded`` (as from OpenAI and vLLM); the schema
cannot say so, since the limit depends on the model and on the prompt's token count.

The schema comes from an app built with the test settings (the same as the live server's);
requests go to the live ``fast`` server. (``schemathesis.pytest.from_fixture`` would load it
from the server, but it breaks on pytest 9, so the schema is built in-process.)
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import negative_data_rejection, positive_data_acceptance

from qlm_opt.server.app import create_app
from tests.e2e.conftest import auth, settings_for

schema = schemathesis.openapi.from_dict(create_app(settings_for(50.0), env={}).openapi())


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, fast):
    response = case.call(base_url=fast.url, headers=auth(), timeout=30)
    excluded = [negative_data_rejection]
    if _over_context(response):
        excluded.append(positive_data_acceptance)
    case.validate_response(response, excluded_checks=excluded)


def _over_context(response) -> bool:
    """The 400 a completion gets when its prompt plus max_tokens exceed the context."""
    if response.status_code != 400:
        return False
    try:
        err = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return err.get("code") == "context_length_exceeded" and err.get("param") == "max_tokens"
