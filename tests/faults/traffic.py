"""Mixed shopper traffic through the app's test client, from threads, recording every answer.

Every answer is checked as it comes: never a 5xx other than 503 `unavailable` with Retry-After,
never a stack trace. Each checkout carries an Idempotency-Key, so a 503 can be retried later.
"""
from __future__ import annotations

import random
import threading
import time
import uuid
from dataclasses import dataclass, field

ALLOWED = {200, 201, 204, 400, 404, 409, 410, 503}


@dataclass
class Answer:
    op: str
    status: int
    body: dict | None
    at: float
    key: str | None = None
    user: str | None = None


@dataclass
class Traffic:
    client: object
    variant_ids: list[int]
    users: list[str]
    threads: int = 4
    max_ops_per_thread: int = 5000
    answers: list[Answer] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []

    # -- running ------------------------------------------------------------------------------

    def start(self) -> "Traffic":
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i,), daemon=True, name=f"traffic-{i}")
            t.start()
            self._workers.append(t)
        return self

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._workers:
            t.join(max(0.1, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._workers), "traffic threads did not stop"

    def _run(self, index: int) -> None:
        rng = random.Random(index)
        mine = self.users[index::self.threads]
        for _ in range(self.max_ops_per_thread):
            if self._stop.is_set():
                return
            user = rng.choice(mine)
            roll = rng.random()
            if roll < 0.5:
                self._add(user, rng.choice(self.variant_ids), rng.randint(1, 2))
            elif roll < 0.65:
                self._remove(user)
            elif roll < 0.9:
                self._checkout(user)
            else:
                self._record("cart", user, self.client.get(f"/api/cart/{user}/"))
            time.sleep(0.002)

    def _add(self, user, vid, qty):
        self._record("add", user, self.client.post("/api/cart/add/", json={
            "user_id": user, "variant_id": vid, "quantity": qty}))

    def _remove(self, user):
        response = self.client.get(f"/api/cart/{user}/")
        self._record("cart", user, response)
        if response.status_code == 200 and response.get_json()["items"]:
            item = response.get_json()["items"][0]["id"]
            self._record("remove", user, self.client.delete(f"/api/cart/{item}/"))

    def _checkout(self, user):
        key = uuid.uuid4().hex
        self._record("checkout", user, self.client.post(f"/api/cart/{user}/checkout/",
                                                        headers={"Idempotency-Key": key}), key)

    def _record(self, op, user, response, key=None):
        status = response.status_code
        text = response.get_data(as_text=True)
        body = response.get_json(silent=True)
        answer = Answer(op, status, body, time.monotonic(), key, user)
        problem = None
        if status not in ALLOWED:
            problem = f"{op}: unexpected {status}: {text[:200]}"
        elif "Traceback" in text or "File \"" in text:
            problem = f"{op}: stack trace in a {status} body"
        elif status >= 400 and not (isinstance(body, dict) and "error" in body):
            problem = f"{op}: {status} without the error body: {text[:200]}"
        elif status == 503 and (body["error"]["code"] != "unavailable" or not response.headers.get("Retry-After")):
            problem = f"{op}: 503 without `unavailable` and Retry-After: {text[:200]}"
        with self._lock:
            self.answers.append(answer)
            if problem:
                self.problems.append(problem)

    # -- reading --------------------------------------------------------------------------------

    def count(self, *, status=None, op=None, since: float = 0.0) -> int:
        with self._lock:
            return sum(1 for a in self.answers if a.at >= since and (status is None or a.status == status)
                       and (op is None or a.op == op))

    def successes(self, since: float = 0.0) -> int:
        with self._lock:
            return sum(1 for a in self.answers if a.at >= since and a.status in (200, 201, 204))

    def orders(self) -> list[dict]:
        with self._lock:
            return [a.body for a in self.answers if a.op == "checkout" and a.status == 201]

    def unavailable_checkouts(self) -> list[Answer]:
        with self._lock:
            return [a for a in self.answers if a.op == "checkout" and a.status == 503]

    def summary(self) -> str:
        with self._lock:
            by = {}
            for a in self.answers:
                by[(a.op, a.status)] = by.get((a.op, a.status), 0) + 1
        return ", ".join(f"{op} {status}: {n}" for (op, status), n in sorted(by.items()))
