"""The scheduler: when each envelope is tried, what a result does to it, and bounces.

Envelopes wait in a heap ordered by their next attempt.  Local delivery is retried at
``creation + 10 s × n²`` for the n-th retry (OpenSMTPD's formula); when those points are
already past (the mda was paused, the daemon was down), the next one still to come is taken, as
OpenSMTPD's scheduler does, so a late envelope is tried once and not once a second until it
catches up.  An envelope still failing at its expiry (``queue ttl``) fails permanently.  A
permanent failure sends a failure DSN to the sender, a delay of each ``bounce warn-interval``
sends a delay DSN; a DSN never answers a DSN (null sender) and honours ``NOTIFY=NEVER``.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from homemail import bounce, log
from homemail.mda import DeliveryError
from homemail.queue import Envelope, Queue, format_id

LOCAL_RETRY_BASE = 10.0
MAX_PARALLEL = 8


class NoRoute(Exception):
    """A DSN's recipient cannot be reached at all (raised by submit_bounce): it is dropped."""


@dataclass
class Outcome:
    ok: bool
    permanent: bool = False
    status: str = "2.0.0"
    text: str = "Ok"


def next_retry(ctime: float, retries: int, now: float, base: float = LOCAL_RETRY_BASE) -> float:
    """The time of the next try after ``retries`` temporary failures, the last one at ``now``.

    The first point ``ctime + base × k²`` with k ≥ retries that is still to come; points
    that passed while nothing was tried are skipped, never caught up with.  At least 1 s away.
    """
    if base <= 0:
        return now + 1.0
    elapsed = max(0.0, now - ctime)
    step = max(retries, math.isqrt(int(elapsed / base)))
    while ctime + base * step * step <= now:
        step += 1
    return max(now + 1.0, ctime + base * step * step)


Deliver = Callable[[Envelope], Awaitable[None]]  # raises DeliveryError
SubmitBounce = Callable[[str, bytes], Awaitable[None]]  # (recipient, message)


class Scheduler:
    def __init__(
        self,
        queue: Queue,
        deliver: Deliver,
        submit_bounce: SubmitBounce,
        *,
        hostname: str,
        warn_intervals: list[int],
        retry_base: float = LOCAL_RETRY_BASE,
        parallel: int = MAX_PARALLEL,
    ) -> None:
        self.queue = queue
        self.deliver = deliver
        self.submit_bounce = submit_bounce
        self.hostname = hostname
        self.warn_intervals = sorted(warn_intervals)
        self.retry_base = retry_base
        self.envelopes: dict[int, Envelope] = {}
        self.running: set[int] = set()
        self.stats: Counter[str] = Counter()
        self.paused = False
        self.parallel = parallel
        # at most this many attempts at once for one user (system mode), so that one whose
        # deliveries hang cannot hold every slot; the others' due envelopes wait beside
        self.per_user: int | None = None
        self._user_running: Counter[str] = Counter()
        self._held: dict[str, list[tuple[float, int]]] = {}
        self._heap: list[tuple[float, int]] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # set by run(): attempts may start
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._stopped: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.notify: Callable[[str, dict[str, object]], None] = lambda name, data: None

    # -- feeding -----------------------------------------------------------------------------

    def schedule(self, envelopes: list[Envelope]) -> None:
        for env in envelopes:
            self.envelopes[env.evpid] = env
            heapq.heappush(self._heap, (env.next_try, env.evpid))
        self._pump()

    def schedule_now(self, evpid: int | None = None) -> int:
        """Make one envelope (or all, for None) due now; returns how many.

        A paused envelope is left alone (and not counted): resuming it schedules it.
        """
        now = time.time()
        if evpid is None:
            chosen = [env for env in self.envelopes.values() if not env.paused]
        else:
            env = self.envelopes.get(evpid)
            chosen = [env] if env is not None and not env.paused else []
        for env in chosen:
            env.next_try = now
            heapq.heappush(self._heap, (now, env.evpid))
        self._pump()
        return len(chosen)

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Start attempts as they fall due, until stop()."""
        if self._stopping:
            return
        self._loop = asyncio.get_running_loop()
        self._stopped = self._loop.create_future()
        try:
            self._pump()
            await self._stopped
        finally:
            self._loop = None
            self._disarm()

    def _pump(self) -> None:
        """Start every due attempt a slot allows, then arm one timer for the next one due.

        Called wherever the answer may change (new or rescheduled envelopes, an attempt
        ending, a resume) instead of waking a scheduling task: an accepted message's first
        attempt starts two loop iterations after its 250 is written.  (An attempt never ends
        inside create_task here; an eager task factory would need a guard against re-entry.)
        """
        loop = self._loop
        if loop is None or self._stopping:
            return
        heap, running = self._heap, self.running
        if self._held:
            self._release_held()
        now = time.time()
        while heap and heap[0][0] <= now and not self.paused and len(running) < self.parallel:
            when, evpid = heapq.heappop(heap)
            env = self.envelopes.get(evpid)
            if env is None or env.next_try != when or env.paused or evpid in running:
                continue
            if self.per_user is not None:
                if self._user_running[env.user] >= self.per_user:
                    heapq.heappush(self._held.setdefault(env.user, []), (when, evpid))
                    continue
                self._user_running[env.user] += 1
            running.add(evpid)
            task = loop.create_task(self._attempt(env))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if not heap or self.paused or len(running) >= self.parallel:
            self._disarm()  # an attempt's end or a resume pumps again
            return
        due = heap[0][0]
        if self._timer is None or due < self._timer_at:
            self._disarm()
            self._timer_at = due
            self._timer = loop.call_later(max(0.0, due - now), self._timer_due)

    def _release_held(self) -> None:
        """Put back as many of each user's held attempts, earliest first, as they have free
        slots (releasing all at every attempt's end made a big backlog of one user's mail
        cost the square of its size)."""
        assert self.per_user is not None
        for user, held in list(self._held.items()):
            free = self.per_user - self._user_running[user]
            while free > 0 and held:
                when, evpid = heapq.heappop(held)
                env = self.envelopes.get(evpid)
                if env is None or env.next_try != when or env.paused or evpid in self.running:
                    continue  # rescheduled, paused or done meanwhile: not held any more
                heapq.heappush(self._heap, (when, evpid))
                free -= 1
            if not held:
                del self._held[user]

    def _timer_due(self) -> None:
        self._timer = None
        self._pump()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True
        self._disarm()
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    # -- one attempt -------------------------------------------------------------------------

    async def _attempt(self, env: Envelope) -> None:
        start = time.time()
        try:
            try:
                await self.deliver(env)
                outcome = Outcome(True)
            except DeliveryError as exc:
                outcome = Outcome(False, exc.permanent, exc.status, exc.text)
            except Exception as exc:  # a bug or I/O failure: never lose the envelope
                outcome = Outcome(False, False, "4.3.0", log.sanitize(f"internal error: {exc}"))
            try:
                await self._settle(env, outcome, start)
            except Exception as exc:  # the queue could not record the result: try again later
                log.event(format_id(env.evpid), "scheduler", "error", error=log.sanitize(str(exc)))
                if env.evpid in self.envelopes:
                    env.next_try = time.time() + 60.0
                    heapq.heappush(self._heap, (env.next_try, env.evpid))
        finally:
            self.running.discard(env.evpid)
            if self.per_user is not None:
                self._user_running[env.user] -= 1
                if self._user_running[env.user] <= 0:
                    del self._user_running[env.user]
            try:
                self._pump()
            except Exception as exc:  # a bug: say so; the next feed or attempt pumps again
                log.event("-", "scheduler", "error", error=log.sanitize(repr(exc)))

    async def _settle(self, env: Envelope, outcome: Outcome, start: float) -> None:
        now = time.time()
        result = "Ok" if outcome.ok else ("PermFail" if outcome.permanent else "TempFail")
        log.event(
            format_id(env.evpid),
            "mda",
            "delivery",
            evpid=format_id(env.evpid),
            from_=f"<{env.sender}>",
            to=f"<{env.dest}>",
            rcpt=f"<{env.rcpt}>",
            user=env.user,
            delay=f"{now - env.ctime:.3f}s",
            result=result,
            stat=f"{outcome.status} {outcome.text}",
        )
        env.last_try = now
        self.notify("delivery", {"evpid": format_id(env.evpid), "rcpt": env.rcpt,
                                 "dest": env.dest, "user": env.user, "result": result,
                                 "status": outcome.status, "text": outcome.text})
        if outcome.ok:
            self.stats["scheduler.delivery.ok"] += 1
            if "SUCCESS" in env.dsn_notify:
                await self._dsn("success", env, outcome)
            await self._done(env)
            return
        env.last_error = log.sanitize(f"{outcome.status} {outcome.text}")
        if not outcome.permanent and now >= env.expire:
            outcome = Outcome(
                False,
                True,
                "4.4.7",
                f"message expired after {int(now - env.ctime)} s: {outcome.text}",
            )
        if outcome.permanent:
            self.stats["scheduler.delivery.permfail"] += 1
            if await self._dsn("failure", env, outcome):
                await self._done(env)
                return
            # the failure notice could not be queued: keep the envelope and try again later
            outcome = Outcome(False, False, outcome.status, outcome.text)
            env.next_try = now + 300.0
            await self.queue.update(env)
            heapq.heappush(self._heap, (env.next_try, env.evpid))
            return
        self.stats["scheduler.delivery.tempfail"] += 1
        env.retry += 1
        env.next_try = next_retry(env.ctime, env.retry, now, self.retry_base)
        env.next_try = min(env.next_try, max(env.expire, now + 1.0))
        passed = sum(1 for interval in self.warn_intervals if now - env.ctime >= interval)
        if passed > env.warned:
            env.warned = passed
            await self._dsn("delay", env, outcome)
        await self.queue.update(env)
        if env.evpid in self.envelopes:
            heapq.heappush(self._heap, (env.next_try, env.evpid))

    async def _done(self, env: Envelope) -> None:
        self.envelopes.pop(env.evpid, None)
        await self.queue.remove(env)

    async def remove(self, evpid: int) -> bool:
        env = self.envelopes.pop(evpid, None)
        if env is None:
            return False
        await self.queue.remove(env)
        return True

    # -- delivery status notifications ------------------------------------------------------

    def _wants(self, kind: str, env: Envelope) -> bool:
        if env.bounce or not env.sender:
            return False
        if "NEVER" in env.dsn_notify:
            return False
        if not env.dsn_notify:
            return kind in ("failure", "delay")
        return {"failure": "FAILURE", "delay": "DELAY", "success": "SUCCESS"}[
            kind
        ] in env.dsn_notify

    async def _dsn(self, kind: str, env: Envelope, outcome: Outcome) -> bool:
        """Queue a DSN if one is due; False only when a due one could not be queued."""
        if not self._wants(kind, env):
            return True
        try:
            original = self.queue.read_message(env.msgid)
        except Exception as exc:
            log.event(format_id(env.evpid), "bounce", "failed", error=str(exc))
            return False
        orcpt = env.dsn_orcpt.partition(";")[2] if env.dsn_orcpt else None
        action = {"failure": "failed", "delay": "delayed", "success": "delivered"}[kind]
        status = outcome.status
        if kind == "delay" and not status.startswith("4"):
            status = "4.0.0"
        message = bounce.make_dsn(
            kind=kind,  # type: ignore[arg-type]
            reporting_mta=self.hostname,
            sender=env.sender,
            original=original,
            recipients=[
                bounce.RecipientStatus(
                    final_recipient=env.rcpt,
                    original_recipient=orcpt,
                    action=action,  # type: ignore[arg-type]
                    status=status,
                    diagnostic=f"x-local; {outcome.text}" if not outcome.ok else None,
                    remote_mta=None,
                    last_attempt=env.last_try,
                    will_retry_until=env.expire if kind == "delay" else None,
                )
            ],
            arrival_date=env.ctime,
            ret="FULL" if env.dsn_ret == "FULL" and kind != "delay" else "HDRS",
            envid=env.dsn_envid or None,
        )
        try:
            await self.submit_bounce(env.sender, message)
            self.stats[f"bounce.{kind}"] += 1
            self.notify("bounce", {"kind": kind, "evpid": format_id(env.evpid),
                                   "sender": env.sender, "rcpt": env.rcpt, "user": env.user})
            log.event(
                format_id(env.evpid),
                "bounce",
                kind,
                to=f"<{env.sender}>",
                rcpt=f"<{env.rcpt}>",
                stat=status,
            )
        except NoRoute as exc:
            log.event(format_id(env.evpid), "bounce", "dropped", to=f"<{env.sender}>",
                      error=log.sanitize(str(exc)))
            return True
        except Exception as exc:
            log.event(
                format_id(env.evpid),
                "bounce",
                "not-queued",
                to=f"<{env.sender}>",
                error=log.sanitize(str(exc)),
            )
            return False
        return True
