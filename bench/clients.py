"""Client processes: fork N workers, start them together, run for a fixed time, collect latencies.

Each worker builds its own connections after the fork (a `setup(index)` callable returns the
operation and a closer), warms up, waits at a barrier, then calls the operation in a loop until the
common deadline, timing each call with a monotonic clock into a compact array. Latencies come back
to the parent as bytes and are merged there.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
import traceback
from array import array
from dataclasses import dataclass, field
from typing import Callable

CTX = multiprocessing.get_context("fork")

# The load generator runs below the servers it measures (redis-server, Postgres, gunicorn): nice 5 and
# SCHED_BATCH, so a client woken by its reply does not preempt the server mid-loop on a shared core.
# On a real deployment the clients are other machines; on this one, 64 clients at the servers'
# priority spend the servers' cores. Every approach's clients get the same treatment (row lock,
# minimal Lua, engine; wrk for each HTTP endpoint), so the ratios compare the servers' work.
# BENCH_CLIENT_NICE=0 turns it off (then the clients share the cores equally with the servers).
CLIENT_NICE = int(os.environ.get("BENCH_CLIENT_NICE", "5"))


def lower_priority() -> None:
    """Make this process a load-generator client (see CLIENT_NICE); a no-op where it cannot."""
    if CLIENT_NICE <= 0:
        return
    try:
        os.nice(CLIENT_NICE)
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or not allowed: the clients stay as they are
        pass


Op = Callable[[], bool]  # True: done, False: refused (e.g. insufficient stock); raises on error
Setup = Callable[[int], tuple[Op, Callable[[], None]]]


def percentile(sorted_values, q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


@dataclass
class RunResult:
    processes: int
    seconds: float
    ok: int = 0
    refused: int = 0
    errors: int = 0
    warmup_ok: int = 0
    first_error: str = ""
    latencies_ns: array = field(default_factory=lambda: array("q"))
    cpu: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def pct_ms(self, q: float) -> float:
        return percentile(self._sorted(), q) / 1e6

    def _sorted(self):
        if not hasattr(self, "_sorted_cache"):
            self._sorted_cache = sorted(self.latencies_ns)
        return self._sorted_cache

    def merge(self, other: "RunResult") -> "RunResult":
        """Two runs of the same clients as one (rounds of a case)."""
        merged = RunResult(
            self.processes,
            self.seconds + other.seconds,
            self.ok + other.ok,
            self.refused + other.refused,
            self.errors + other.errors,
            self.warmup_ok + other.warmup_ok,
            self.first_error or other.first_error,
        )
        merged.latencies_ns = self.latencies_ns + other.latencies_ns
        return merged

    def summary(self) -> dict:
        return {
            "processes": self.processes,
            "seconds": round(self.seconds, 3),
            "ok": self.ok,
            "refused": self.refused,
            "errors": self.errors,
            "first_error": self.first_error,
            "per_second": round(self.rate, 1),
            "p50_ms": round(self.pct_ms(50), 3),
            "p99_ms": round(self.pct_ms(99), 3),
            "max_ms": round(self.pct_ms(100), 3),
        }


def _worker(setup: Setup, index: int, warmup: int, ready, go, start_at, seconds: float, results) -> None:
    ok = refused = errors = warm_ok = 0
    first_error = ""
    lat = array("q")
    closer = None
    lower_priority()
    try:
        op, closer = setup(index)
        for _ in range(warmup):
            if op():
                warm_ok += 1
    except Exception:  # noqa: BLE001 - reported to the parent
        first_error = traceback.format_exc(limit=3)
    try:
        ready.wait(120)
        go.wait(120)
    except Exception:  # noqa: BLE001 - a broken barrier: report what we have
        pass
    if not first_error:
        start = start_at.value
        deadline = start + int(seconds * 1e9)
        clock = time.monotonic_ns
        while clock() < start:
            time.sleep(0.0005)
        t0 = clock()
        while t0 < deadline:
            try:
                done = op()
            except Exception:  # noqa: BLE001 - counted, the run goes on
                errors += 1
                if not first_error:
                    first_error = traceback.format_exc(limit=3)
                t0 = clock()
                continue
            t1 = clock()
            if done:
                ok += 1
                lat.append(t1 - t0)
            else:
                refused += 1
            t0 = t1
    try:
        if closer is not None:
            closer()
    except Exception:  # noqa: BLE001
        pass
    results.put((index, ok, refused, errors, warm_ok, first_error, lat.tobytes()))


# --- CPU accounting: was this machine busy with something else while we measured? ----------------

_TICK = os.sysconf("SC_CLK_TCK")


def _sleep_until(monotonic_ns: int) -> None:
    delay = (monotonic_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)


def _proc_ticks(pid: int) -> int:
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def _kernel_thread_ticks() -> int:
    """CPU of the kernel's own threads (children of kthreadd, pid 2): softirq work such as loopback
    networking runs there under load, and it is this benchmark's traffic, not somebody else's."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == "2" or entry == "2":  # ppid 2
            total += int(fields[11]) + int(fields[12])
    return total


def cpu_snapshot(pids: list[int]) -> tuple[float, int, int, int, int]:
    """(monotonic s, machine busy ticks, machine steal ticks, ticks of `pids`, kernel-thread ticks)."""
    try:
        cpu = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        busy = cpu[0] + cpu[1] + cpu[2]  # user, nice, system: what processes use (not irq time)
        steal = cpu[7] if len(cpu) > 7 else 0
    except (OSError, ValueError):
        busy = steal = 0
    return time.monotonic(), busy, steal, sum(_proc_ticks(p) for p in pids), _kernel_thread_ticks()


def cpu_use(before: tuple, after: tuple) -> dict:
    """Cores used over the window: ours (clients + watched), the kernel's threads, every other process
    on this machine (including ones that exited meanwhile), and the hypervisor's steal."""
    secs = max(1e-6, after[0] - before[0])
    busy, steal, ours, kernel = ((after[i] - before[i]) / _TICK / secs for i in (1, 2, 3, 4))
    return {
        "seconds": round(secs, 3),
        "our_cores": round(ours, 2),
        "kernel_cores": round(kernel, 2),
        "other_cores": round(max(0.0, busy - ours - kernel), 2),
        "steal_cores": round(steal, 2),
    }


def run_clients(
    setup: Setup, processes: int, seconds: float, *, warmup: int = 20, watch_pids: tuple[int, ...] = ()
) -> RunResult:
    """Run `processes` workers of `setup` for `seconds` after a common start; merged result.

    During the measured window it also reads the machine's CPU accounting (cpu_use):
    how many cores the clients and `watch_pids` (the redis-server) used, how many everything else
    on the machine used, and the hypervisor's steal, so a run disturbed by other load shows it.
    """
    ready = CTX.Barrier(processes + 1)
    go = CTX.Barrier(processes + 1)
    start_at = CTX.Value("q", 0)
    results = CTX.Queue()
    procs = [
        CTX.Process(
            target=_worker, args=(setup, i, warmup, ready, go, start_at, seconds, results), daemon=True
        )
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    result = RunResult(processes=processes, seconds=seconds)
    try:
        ready.wait(180)
        start_at.value = time.monotonic_ns() + 200_000_000
        go.wait(60)
        watched = [p.pid for p in procs] + list(watch_pids)
        _sleep_until(start_at.value)
        before = cpu_snapshot(watched)
        _sleep_until(start_at.value + int(seconds * 1e9))
        result.cpu = cpu_use(before, cpu_snapshot(watched))
        for _ in procs:
            index, ok, refused, errors, warm_ok, first_error, lat = results.get(timeout=seconds + 120)
            result.ok += ok
            result.refused += refused
            result.errors += errors
            result.warmup_ok += warm_ok
            if first_error and not result.first_error:
                result.first_error = first_error
            chunk = array("q")
            chunk.frombytes(lat)
            result.latencies_ns.extend(chunk)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
    return result


def fork_all(target: Callable[[int], object], processes: int, timeout: float = 600) -> list:
    """Run target(index) in `processes` forked workers at once; their return values, in index order."""
    results = CTX.Queue()

    def body(index: int) -> None:
        try:
            results.put((index, target(index), ""))
        except Exception:  # noqa: BLE001
            results.put((index, None, traceback.format_exc(limit=5)))

    procs = [CTX.Process(target=body, args=(i,), daemon=True) for i in range(processes)]
    for p in procs:
        p.start()
    out: list = [None] * processes
    try:
        for _ in procs:
            index, value, error = results.get(timeout=timeout)
            if error:
                raise RuntimeError(f"worker {index} failed:\n{error}")
            out[index] = value
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return out
