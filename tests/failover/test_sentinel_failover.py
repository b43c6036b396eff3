"""A Sentinel-watched primary lost mid-sale (one primary, one replica, three sentinels, down-after 1 s).

The same flash sale as tests/failover/test_cluster_failover.py, on the real web server (gunicorn,
4 workers) finding its primary through the sentinels (REDIS_SENTINELS): the replica is stopped for
a moment with a backlog ahead of it, the primary is killed (SIGKILL), a sentinel promotes the
replica, which lacks what the primary acknowledged in that moment. Adds are refused with 503 and
Retry-After meanwhile, never a 500 or a hang, and succeed again within RECOVERY_BOUND_S; nothing
oversells; after a reconcile the counters are exact; every acknowledged hold is held or reported
lost, or was lost together with its cart line.

On one primary a customer's cart and the variant's holds live on the same server, so a hold and
its cart line are lost together: the figures printed (run with -s) say how many were.
"""
from __future__ import annotations

import signal
import time

import pytest

from app.embedded import EmbeddedSentinelGroup, free_port
from tests.conftest import wait_for
from tests.factories import make_variant
from tests.failover.sale import Topology, replicas_for, print_figures, ready, sale_across_failover, web_command

pytestmark = [pytest.mark.slow, pytest.mark.single_node]  # it starts its own servers

# down-after (1 s) + the sentinels' agreement, election and promotion (a few seconds on loopback)
# + every worker's client asking the sentinels again, with a margin for a loaded machine
RECOVERY_BOUND_S = 15.0
HOT_ON_HAND = 300
SPREAD_ON_HAND = 1000


@pytest.fixture
def group(tmp_path, request):
    sentinels = EmbeddedSentinelGroup(tmp_path / "sentinel", replicas=replicas_for(request)).start()
    try:
        yield sentinels
    finally:
        sentinels.stop()


class SentinelPrimaryLost(Topology):
    def __init__(self, group: EmbeddedSentinelGroup):
        self.group = group

    def replica_pids(self) -> list[int]:
        return [self.group.servers[port].process.pid for port in self.group.replica_ports]

    def backlog(self, data: bytes) -> None:
        with self.group.client(self.group.primary_port) as r:
            r.set("backlog", data)

    def kill_primary(self) -> None:
        self.group.kill_primary()

    def wait_healed(self) -> float:
        t0 = time.monotonic()
        self.group.wait_for_promotion(30)
        return time.monotonic() - t0

    def reader(self):
        return self.group.client(self.group.primary_port)


@pytest.mark.parametrize("durability", ["local", "replicated"])
def test_a_sentinel_primary_lost_mid_sale_oversells_nothing_and_heals(group, base_env, build, processes, tmp_path,
                                                                       durability):
    env = {k: v for k, v in base_env.items() if k not in ("REDIS_URL", "RQ_REDIS_URL", "API_KEYS")}
    env.update(group.env, REDIS_CLUSTER="0", WEB_CONCURRENCY="4", PORT=str(free_port()),
               PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"), LOG_LEVEL="WARNING")
    env["HOLD_DURABILITY"] = durability
    _client, c = build(env)
    env.update(REDIS_URL="", RQ_REDIS_URL="")  # the child must not take this process's own from os.environ
    hot = [make_variant(c.sessions, on_hand=HOT_ON_HAND) for _ in range(2)]
    spread = [make_variant(c.sessions, on_hand=SPREAD_ON_HAND) for _ in range(4)]
    web = processes.start("web", web_command(), env)
    port = int(env["PORT"])
    wait_for(lambda: ready(port), timeout=40, interval=0.1, message="gunicorn ready through the sentinels")

    on_hand = {**{vid: HOT_ON_HAND for vid in hot}, **{vid: SPREAD_ON_HAND for vid in spread}}
    figures = sale_across_failover(
        port, c, SentinelPrimaryLost(group), hot, spread, on_hand, RECOVERY_BOUND_S,
        lambda: wait_for(lambda: _reconciled(c), timeout=20, interval=0.2, message="a reconcile on the new primary"))
    print_figures(f"sentinel failover, HOLD_DURABILITY={durability}", figures)
    if durability == "local":
        assert figures["acked_lost"] > 0  # the replica was behind: the scenario did lose holds
    else:  # an add answers 201 only once the replica has it: the same scenario loses none
        assert figures["acked_lost"] == 0, figures
    processes.kill(web, signal.SIGTERM)


def _reconciled(c):
    try:
        return c.reconciler.reconcile(grace_ms=0)
    except Exception:  # noqa: BLE001 - the client still asking the sentinels for the new primary
        return None
