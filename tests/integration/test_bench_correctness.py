"""The benchmark harness's correctness race, small: sixteen processes after a stock of 100.

Never a speed assertion (benchmarks are not timed tests). The naive read-then-write is run and
reported beside the engine, but not asserted to oversell: on a given run the scheduler may not
interleave the two round trips.
"""

from __future__ import annotations

from bench.correctness import check_invariant, run_races
from tests.factories import make_variant

PROCESSES = 16
ATTEMPTS = 300
STOCK = 100


def test_sixteen_processes_racing_for_a_hundred_units_get_exactly_a_hundred_through_the_engine(
    container, sessions, env, capsys
):
    vid = make_variant(sessions, on_hand=STOCK)

    report = run_races(dict(env), vid, processes=PROCESSES, attempts=ATTEMPTS, stock=STOCK)

    by_seller = {race["seller"]: race for race in report["races"]}
    with capsys.disabled():
        for race in report["races"]:
            print(
                f"\n  {race['seller']}: sold {race['sold']} of {race['stock']} (oversold {race['oversold']})",
                end="",
            )
        print()
    engine = by_seller["engine (Holds.reserve)"]
    assert engine["sold"] == STOCK
    assert engine["oversold"] == 0
    assert engine["invariant"]["ok"], engine["invariant"]["problems"]
    assert by_seller["minimal Lua reserve"]["sold"] == STOCK
    naive = by_seller["naive GET+DECRBY (Redis)"]
    assert naive["sold"] >= STOCK  # it may oversell; it never sells less than there is

    after = check_invariant(container, vid)
    assert after["ok"], after["problems"]
    assert (after["available"], after["reserved"], after["live_holds"]) == (0, STOCK, STOCK)
