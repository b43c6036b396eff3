"""Schemathesis against the app's own /openapi.json: no 5xx, no response that breaks its own schema.

Every operation gets a bounded number of generated requests, valid ones (positive) and invalid
ones (negative), sent with the admin key so no route is skipped. The operations are driven one by
one through Hypothesis (schemathesis's lazy pytest loader does not run on pytest 9), and the
failures of all of them are reported together.
"""
from __future__ import annotations

import time
from decimal import Decimal

import hypothesis
import schemathesis
from hypothesis import HealthCheck, Phase, given
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

from app import create_app
from app.composition import Container
from app.settings import load_settings
from persistence.models import PricingRule, Stock
from tests.conftest import ADMIN_KEY
from tests.factories import make_category, make_product, make_variant
from tests.faults.conftest import assert_stock_exact

MAX_EXAMPLES = 25
CHECKS = [not_a_server_error, response_schema_conformance]


def _seed(sessions) -> None:
    """A few rows, so generated ids sometimes name something that exists."""
    category = make_category(sessions)
    product = make_product(sessions, category_id=category)
    make_variant(sessions, product_id=product, on_hand=50)
    with sessions.begin() as s:
        s.add(PricingRule(name="Bulk", type="BULK", priority=1, percent=Decimal("10.00"), min_quantity=2,
                          active=True))


def test_no_operation_answers_5xx_or_breaks_its_own_schema(auth_env, clean_stores, capsys):
    container = Container(load_settings(auth_env))
    try:
        app = create_app(container=container)
        _seed(container.sessions)
        schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        failures: list[str] = []
        cases = operations = 0
        started = time.monotonic()
        for result in schema.get_all_operations():
            operation = result.ok()
            operations += 1
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                counter = [0]

                @given(case=operation.as_strategy(generation_mode=mode))
                @hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                                     phases=[Phase.explicit, Phase.generate],
                                     suppress_health_check=list(HealthCheck))
                def run(case):
                    counter[0] += 1  # noqa: B023 - run is called (and done) before counter is rebound
                    case.call_and_validate(headers=headers, checks=CHECKS)

                try:
                    run()
                except hypothesis.errors.Unsatisfiable:
                    pass  # no invalid request exists for an operation without inputs
                except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - collected, reported below
                    failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}):\n{exc}")
                cases += counter[0]
        took = time.monotonic() - started
        assert not failures, "\n\n".join(failures)
        with container.sessions() as s:
            variants = list(s.scalars(Stock.__table__.select().with_only_columns(Stock.variant_id)))
        assert_stock_exact(container, variants)  # whatever was sent, the counters still add up
        with capsys.disabled():
            print(f"\n[schemathesis] {operations} operations, {cases} generated requests (positive and negative, "
                  f"at most {MAX_EXAMPLES} each) in {took:.1f}s: no 5xx, every response matches its schema")
    finally:
        container.close()
