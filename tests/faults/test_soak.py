"""The soak test's 60-second version (`make soak MINUTES=10` runs the long one): mixed load from
several processes, the invariant checked every second, the order ledger at the end; 0 violations."""
from __future__ import annotations

import io

from bench import soak

SECONDS = 60


def test_a_minute_of_mixed_load_from_several_processes_has_no_violation(redis_url, database_url, clean_stores,
                                                                         capsys):
    out = io.StringIO()
    figures = soak.run(SECONDS, redis_url=redis_url, database_url=database_url, workers=3, out=out)
    with capsys.disabled():
        print("\n" + out.getvalue().rstrip())
    assert figures["violations"] == 0, figures["violation_samples"]
    # it really was mixed load: every kind of operation ran, orders were made, holds lapsed
    assert figures["operations"] > 1000
    assert set(figures["by_operation"]) >= {"add", "change", "remove", "checkout", "adjust", "cart", "price"}
    assert figures["orders"] > 0 and figures["lapsed_holds_released"] > 0
    assert figures["invariant_checks"] > 0
