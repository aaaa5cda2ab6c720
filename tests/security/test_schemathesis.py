"""Property-based fuzzing of the live server from its own OpenAPI document (schemathesis).

At least 1,000 generated requests over every operation: no 5xx, and every
response conforms to the documented status codes, content types and schemas.
Loopback only, bounded by the example counts below. Driven through plain
hypothesis (schemathesis's pytest plugin does not support this pytest).
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES_PER_OPERATION = 80
CHECKS = [schemathesis.checks.not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


def test_fuzz_every_operation(live_server):
    schema = schemathesis.openapi.from_url(f"{live_server.url}/openapi.json")
    calls = 0
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            nonlocal calls
            case.call_and_validate(checks=CHECKS, timeout=30)
            calls += 1

        run()
    print(f"schemathesis: {calls} generated requests over {len(operations)} operations")
    assert calls >= 1000, calls
