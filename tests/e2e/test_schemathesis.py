"""Property-based fuzzing of every route in the app's OpenAPI schema: no 5xx, ever, plus
schemathesis' default checks (responses match the documented schemas and status codes,
schema-valid requests are accepted) except ``negative_data_rejection``, which also counts an
unknown extra HTTP header as invalid data that must be rejected, and HTTP servers accept those.

The schema comes from an app built with the test settings (the same as the live server's);
requests go to the live ``fast`` server. (``schemathesis.pytest.from_fixture`` would load it
from the server, but it breaks on pytest 9, so the schema is built in-process.)
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import negative_data_rejection

from qlm_opt.server.app import create_app
from tests.e2e.conftest import auth, settings_for

schema = schemathesis.openapi.from_dict(create_app(settings_for(50.0), env={}).openapi())


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, fast):
    case.call_and_validate(base_url=fast.url, headers=auth(),
                           excluded_checks=[negative_data_rejection], timeout=30)
