"""The data plane's engine: a dispatcher per delivery worker process.

A ``delivery.send`` message only wakes it; what to send is decided by the database
(``models.attempts.claim_due``), fairly across organizations and endpoints, and only when a
posting slot is free, so a claimed delivery never waits for a thread while its lease runs.
Three kinds of thread per process:

* the dispatcher: claims as many due deliveries as there are free slots (one transaction),
  hands each to a posting thread, and sleeps until a slot frees, a message wakes it, or the
  next delivery falls due;
* ``delivery_concurrency`` posting threads: each sends one request at a time on a keep-alive
  ``Sender`` to that receiver borrowed from the process's ``SenderPool``, bounded by the total
  deadline (workers/http.py), so a slow receiver costs one thread for at most that long, never
  a worker;
* the recorder: records finished attempts in batches (one transaction for all that finished
  meanwhile) and frees their slots.

Nothing here is a Celery task, so Celery's time limits never cut a request off half-recorded.
A worker that dies anyway leaves leased deliveries behind: their leases run out, they fall due
again, and the lost attempt is logged when one is claimed again (docs/operating.md,
"Isolation").
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from models import attempts
from models.db import Database
from workers.http import SendResult
from workers.sending import SenderPool, report_attempt

log = logging.getLogger("rotator.dispatcher")

# How long an idle dispatcher sleeps at most before it looks at the database again: a wake-up
# message usually comes first; this bounds the delay when one was lost.
IDLE_POLL_S = 1.0
# After a failed claim or record (database unreachable): wait, then try again.
ERROR_PAUSE_S = 1.0
RECORD_TRIES = 5
# The recorder takes at most this many results per transaction, and waits this long after the
# first for more to finish: one transaction per several attempts, not one each.
RECORD_BATCH = 200
RECORD_GATHER_S = 0.005
# With work still due, the dispatcher claims again once a quarter of its slots are free (under
# a cap: once the recorder has freed a batch of them), or this long after the first one freed:
# a claim per batch of work, not per finished request.
CLAIM_GATHER_S = 0.02
# Work is due but every candidate's endpoint or organization is at its cap: look again after
# this long, or as soon as one of this process's requests ends.
CAPPED_POLL_S = 0.1

_Sent = tuple[attempts.AttemptPlan, SendResult]


class Dispatcher:
    """Claims, sends and records deliveries for one process until ``stop``."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.slots = db.settings.delivery_concurrency
        self._free = self.slots
        self._changed = threading.Condition()
        self._woken = False
        self._stopping = False
        self._done: queue.Queue[_Sent | None] = queue.Queue()
        # Idle keep-alive connections: room for every slot's, and as many again for receivers
        # that were busy a moment ago.
        self._senders = SenderPool(db.settings, idle_max=2 * self.slots)
        self._posting = ThreadPoolExecutor(
            max_workers=self.slots, thread_name_prefix="delivery-post"
        )
        self._threads = [
            threading.Thread(target=self._dispatch, name="delivery-dispatch", daemon=True),
            threading.Thread(target=self._record, name="delivery-record", daemon=True),
        ]

    def start(self) -> Dispatcher:
        for thread in self._threads:
            thread.start()
        log.info("delivery dispatcher running", extra={"slots": self.slots})
        return self

    def wake(self) -> None:
        """Look at the database now (new work was committed)."""
        with self._changed:
            self._woken = True
            self._changed.notify_all()

    @property
    def in_flight(self) -> int:
        with self._changed:
            return self.slots - self._free

    def stop(self, timeout: float | None = None) -> None:
        """Claim nothing more; let the requests in flight finish and be recorded."""
        with self._changed:
            if self._stopping:
                return
            self._stopping = True
            self._changed.notify_all()
        wait = timeout if timeout is not None else 2 * self.db.settings.delivery_timeout_seconds
        self._threads[0].join(wait)
        self._posting.shutdown(wait=True)
        self._senders.close()
        self._done.put(None)
        self._threads[1].join(wait)

    # --- the dispatcher thread ------------------------------------------------------------------

    def _dispatch(self) -> None:
        low_water = max(1, self.slots // 4)
        backlog = False  # the last claim filled every free slot: more work is waiting
        capped = False  # work was due that the last claim left to requests still in flight
        free_after = 0  # free slots right after the last claim
        while True:
            with self._changed:
                while self._free == 0 and not self._stopping:
                    self._changed.wait()
                if (backlog or capped) and not self._stopping:
                    # Claim per batch of finished requests, not per request: wait a moment for
                    # a quarter of the slots to free up. Under a cap, for the next batch the
                    # recorder frees (it records in batches already): what those requests
                    # held of the cap is what the next claim can take, and waiting longer
                    # only leaves it unused (docs/performance.md, "With the dispatcher").
                    batch = low_water if backlog else 1
                    deadline = time.monotonic() + CLAIM_GATHER_S
                    while not self._stopping and self._free - free_after < batch:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._changed.wait(left)
                if self._stopping:
                    return
                free = self._free
                self._woken = False
            try:
                with self.db.session() as session:
                    plans = attempts.claim_due(session, free)
                    backlog = len(plans) == free
                    # Some claimed but not as many as asked: a cap held the rest back (or the
                    # due work ran out, which the next claim finds out). Only an empty claim
                    # asks when work falls due next: one query less per claim under a cap.
                    due_in = 0.0 if plans else attempts.next_due_in(session, longest=IDLE_POLL_S)
            except Exception:
                log.exception("claiming deliveries failed")
                plans, due_in, backlog = [], ERROR_PAUSE_S, False
            # Due now yet not claimed: held back by a cap until a request in flight ends.
            capped = not backlog and due_in == 0
            idle_for = CAPPED_POLL_S if capped else due_in
            with self._changed:
                self._free -= len(plans)
                free_after = self._free
            for plan in plans:
                self._posting.submit(self._post, plan)
            if idle_for > 0:
                with self._changed:
                    if not self._woken and not self._stopping:
                        self._changed.wait(idle_for)  # a freed slot or a wake-up ends it

    def _post(self, plan: attempts.AttemptPlan) -> None:
        try:
            result = self._senders.post(plan.url, plan.body, plan.headers)
        except Exception:  # post never raises; should it, the attempt is still recorded
            log.exception("posting a delivery failed")
            result = SendResult(None, 0, "", "unexpected error", None)
        self._done.put((plan, result))

    # --- the recorder thread --------------------------------------------------------------------

    def _record(self) -> None:
        finished = False
        while not finished:
            item = self._done.get()
            if item is None:
                return
            batch = [item]
            gather_until = time.monotonic() + RECORD_GATHER_S
            while len(batch) < RECORD_BATCH:
                try:
                    more = self._done.get(timeout=max(0.0, gather_until - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:
                    finished = True
                    break
                batch.append(more)
            recorded = self._record_batch(batch)
            with self._changed:
                self._free += len(batch)
                self._changed.notify_all()
            for row in recorded:
                report_attempt(self.db, row)

    def _record_batch(self, batch: list[_Sent]) -> list[attempts.LoggedAttempt]:
        for attempt in range(1, RECORD_TRIES + 1):
            try:
                with self.db.session() as session:
                    return attempts.record_logged(session, batch)
            except Exception:
                log.exception("recording deliveries failed", extra={"attempt": attempt})
                threading.Event().wait(ERROR_PAUSE_S)
        # Their leases run out and the deliveries fall due again; each lost attempt is logged
        # when it is claimed again.
        return []


_lock = threading.Lock()
_current: tuple[int, Dispatcher] | None = None


def running(db: Database) -> Dispatcher:
    """This process's dispatcher, started on first use (after a prefork worker forks)."""
    global _current
    with _lock:
        if _current is None or _current[0] != os.getpid():
            _current = (os.getpid(), Dispatcher(db).start())
        return _current[1]


def stop_running() -> None:
    """Stop this process's dispatcher, if it runs, letting its requests finish."""
    global _current
    with _lock:
        current, _current = _current, None
    if current is not None and current[0] == os.getpid():
        current[1].stop()
