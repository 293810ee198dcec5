"""The scheduler with the in-memory queue: retries, expiry, DSNs, pause."""

from __future__ import annotations

import asyncio
import email
import email.policy
import time

from homemail.mda import DeliveryError
from homemail.queue import Envelope, new_evpid, new_msgid
from homemail.queue_ram import RamQueue
from homemail.scheduler import Scheduler, next_retry

MESSAGE = b"From: alice@example.org\r\nSubject: test\r\n\r\nbody\r\n"


def envelope(*, sender: str = "alice@localhost", ttl: float = 3600, **kw: object) -> Envelope:
    msgid = new_msgid()
    now = time.time()
    env = Envelope(evpid=new_evpid(msgid), sender=sender, rcpt="bob@localhost",
                   dest="bob@localhost", user="bob", action="local", ctime=now,
                   expire=now + ttl, next_try=now)
    for k, v in kw.items():
        setattr(env, k, v)
    return env


class Harness:
    def __init__(self, outcomes: list[DeliveryError | None], **kw: object) -> None:
        self.queue = RamQueue()
        self.outcomes = outcomes
        self.attempts: list[float] = []
        self.bounces: list[tuple[str, bytes]] = []
        self.sched = Scheduler(self.queue, self.deliver, self.bounce, hostname="mx.test",
                               warn_intervals=[3600], **kw)  # type: ignore[arg-type]

    async def deliver(self, env: Envelope) -> None:
        self.attempts.append(time.time())
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome is not None:
            raise outcome

    async def bounce(self, rcpt: str, message: bytes) -> None:
        self.bounces.append((rcpt, message))

    async def add(self, env: Envelope) -> None:
        await self.queue.commit(MESSAGE, [env])
        self.sched.schedule([env])


async def run_until(h: Harness, predicate, timeout: float = 5.0) -> None:
    task = asyncio.create_task(h.sched.run())
    deadline = time.time() + timeout
    try:
        while not predicate() and time.time() < deadline:
            await asyncio.sleep(0.01)
    finally:
        await h.sched.stop()
        task.cancel()
    assert predicate()


async def stop_when(h: Harness, task: asyncio.Task[None], done, seconds: float = 3) -> None:
    """Let the running scheduler work until done() or the time is up, then stop it."""
    deadline = time.time() + seconds
    while not done() and time.time() < deadline:
        await asyncio.sleep(0.01)
    await h.sched.stop()
    task.cancel()


async def test_success_removes_envelope():
    h = Harness([None])
    env = envelope()
    await h.add(env)
    await run_until(h, lambda: not h.queue.envelopes)
    assert h.sched.stats["scheduler.delivery.ok"] == 1
    assert h.bounces == []


async def test_tempfail_retries_on_n_squared_schedule():
    h = Harness([DeliveryError("busy", permanent=False, status="4.2.0")] * 2, retry_base=0.2)
    env = envelope()
    await h.add(env)
    await run_until(h, lambda: len(h.attempts) == 3 and not h.queue.envelopes)
    # attempt n+1 comes at creation + base * n^2: 0.2 s, then 0.8 s after creation
    assert h.attempts[1] - env.ctime >= 0.2 - 0.02
    assert h.attempts[2] - env.ctime >= 0.8 - 0.02
    assert h.sched.stats["scheduler.delivery.tempfail"] == 2


def test_next_retry_follows_the_schedule_when_on_time():
    ctime = 1_000_000.0
    # tried on time at each point: the next point is creation + 10 s × retries²
    assert next_retry(ctime, 1, ctime) == ctime + 10
    assert next_retry(ctime, 2, ctime + 10.2) == ctime + 40
    assert next_retry(ctime, 3, ctime + 40.5) == ctime + 90
    # a point less than a second away is put back to a second
    assert next_retry(ctime, 2, ctime + 39.5) == ctime + 40.5


def test_next_retry_skips_the_points_that_passed():
    ctime = 1_000_000.0
    # 11 minutes late with 2 retries made: not ctime + 40 (past, so at once), but the first
    # point still to come, 10 s × 9² = 810 s
    assert next_retry(ctime, 2, ctime + 660) == ctime + 810
    assert next_retry(ctime, 3, ctime + 810.3) == ctime + 1000
    assert next_retry(ctime, 2, ctime + 810) == ctime + 1000  # a point at now is not ahead
    # whatever the lateness, the next try is ahead of now and on a point of the schedule
    for late in (0.0, 0.5, 38.5, 40.0, 3599.0, 86_400.0 * 4 + 0.3):
        nxt = next_retry(ctime, 1, ctime + late)
        step = round(((nxt - ctime) / 10) ** 0.5)
        assert nxt > ctime + late and nxt == ctime + 10 * step * step
        assert 10 * (step - 1) ** 2 <= late or step == 1  # the point before it has passed


async def test_a_late_envelope_is_retried_once_not_in_a_burst():
    # Created 11 minutes ago with 2 temporary failures, its next points all passed while the
    # mda was paused (or the daemon down): one attempt now, then the next point to come.
    h = Harness([DeliveryError("busy", permanent=False, status="4.2.0")] * 10)
    env = envelope(retry=2)
    env.ctime -= 660
    env.next_try = env.ctime + 40
    await h.add(env)
    task = asyncio.create_task(h.sched.run())
    await stop_when(h, task, lambda: False, seconds=1.5)
    assert len(h.attempts) == 1
    stored = h.queue.envelopes[env.evpid]
    assert stored.retry == 3  # attempts that failed, as show queue says
    assert stored.next_try == env.ctime + 810
    assert h.bounces == []  # no delay warning before an hour


async def test_tempfail_state_is_stored():
    h = Harness([DeliveryError("mailbox busy", permanent=False, status="4.2.0")],
                retry_base=100)
    env = envelope()
    await h.add(env)
    await run_until(h, lambda: h.queue.envelopes[env.evpid].retry == 1)
    stored = h.queue.envelopes[env.evpid]
    assert stored.last_error == "4.2.0 mailbox busy"
    assert stored.next_try >= env.ctime + 100


async def test_permfail_bounces_to_sender_with_real_status():
    h = Harness([DeliveryError("mail loop", permanent=True, status="5.4.6")])
    await h.add(envelope())
    await run_until(h, lambda: bool(h.bounces) and not h.queue.envelopes)
    rcpt, raw = h.bounces[0]
    assert rcpt == "alice@localhost"
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Subject"] == "Delivery Status Notification (Failure)"
    assert msg.get_content_type() == "multipart/report"
    status = next(p for p in msg.walk() if p.get_content_type() == "message/delivery-status")
    text = status.as_string()
    assert "Status: 5.4.6" in text
    assert "Action: failed" in text


async def test_expiry_turns_tempfail_into_failure():
    h = Harness([DeliveryError("busy", permanent=False, status="4.2.0")])
    await h.add(envelope(ttl=-1))
    await run_until(h, lambda: bool(h.bounces) and not h.queue.envelopes)
    assert b"4.4.7" in h.bounces[0][1]


async def test_bounce_is_never_bounced():
    h = Harness([DeliveryError("gone", permanent=True, status="5.1.1")])
    await h.add(envelope(sender="", bounce=True))
    await run_until(h, lambda: not h.queue.envelopes)
    assert h.bounces == []


async def test_notify_never_and_success():
    h = Harness([DeliveryError("gone", permanent=True, status="5.1.1"), None])
    await h.add(envelope(dsn_notify=["NEVER"]))
    await h.add(envelope(dsn_notify=["SUCCESS"]))
    await run_until(h, lambda: not h.queue.envelopes and len(h.bounces) == 1)
    assert b"Delivery Status Notification (Success)" in h.bounces[0][1]


async def test_delay_warning_once_per_interval():
    h = Harness([DeliveryError("busy", permanent=False, status="4.2.0")] * 3, retry_base=0.05)
    h.sched.warn_intervals = [0.0]
    await h.add(envelope())
    await run_until(h, lambda: len(h.attempts) >= 4 and not h.queue.envelopes)
    assert len(h.bounces) == 1
    assert b"Delivery Status Notification (Delay)" in h.bounces[0][1]


async def test_pause_holds_deliveries_and_schedule_now_releases():
    h = Harness([], retry_base=100)
    env = envelope()
    env.paused = True
    await h.add(env)
    task = asyncio.create_task(h.sched.run())
    await asyncio.sleep(0.2)
    assert h.attempts == []
    env.paused = False
    assert h.sched.schedule_now(env.evpid) == 1
    await stop_when(h, task, lambda: not h.queue.envelopes)
    assert not h.queue.envelopes


async def test_schedule_now_leaves_paused_envelopes_alone():
    h = Harness([], retry_base=100)
    held, other = envelope(), envelope()
    held.paused = True
    held.next_try = other.next_try = time.time() + 1000
    await h.add(held)
    await h.add(other)
    task = asyncio.create_task(h.sched.run())
    assert h.sched.schedule_now(held.evpid) == 0
    assert h.sched.schedule_now() == 1
    await stop_when(h, task, lambda: list(h.queue.envelopes) == [held.evpid])
    assert list(h.queue.envelopes) == [held.evpid]
    assert len(h.attempts) == 1  # the other one's


async def test_unexpected_exception_is_a_tempfail_not_a_loss():
    h = Harness([], retry_base=100)

    async def broken(env: Envelope) -> None:
        raise RuntimeError("bug")

    h.sched.deliver = broken
    env = envelope()
    await h.add(env)
    await run_until(h, lambda: h.queue.envelopes.get(env.evpid) is not None
                    and h.queue.envelopes[env.evpid].retry == 1)
    assert "internal error" in h.queue.envelopes[env.evpid].last_error


async def test_attempts_never_exceed_the_parallel_limit_and_all_complete():
    h = Harness([], parallel=3)
    active = {"now": 0, "most": 0}
    gate = asyncio.Event()

    async def slow(env: Envelope) -> None:
        active["now"] += 1
        active["most"] = max(active["most"], active["now"])
        await gate.wait()
        active["now"] -= 1

    h.sched.deliver = slow
    for _ in range(10):
        await h.add(envelope())
    task = asyncio.create_task(h.sched.run())
    await asyncio.sleep(0.1)
    assert (active["now"], len(h.sched.running)) == (3, 3)  # the rest wait for a slot
    gate.set()
    await stop_when(h, task, lambda: not h.queue.envelopes)
    assert not h.queue.envelopes
    assert active["most"] == 3


async def test_one_users_hanging_deliveries_leave_slots_for_the_others():
    """System mode: at most per_user attempts for one user; the rest of the slots go to the
    others, and the user's held envelopes go when one of theirs ends."""
    h = Harness([], parallel=6)
    h.sched.per_user = 3
    gates = {"stuck": asyncio.Event(), "other": asyncio.Event()}
    started: list[str] = []

    async def deliver(env: Envelope) -> None:
        started.append(env.user)
        await gates[env.user].wait()

    h.sched.deliver = deliver
    for _ in range(8):
        await h.add(envelope(user="stuck"))
    for _ in range(2):
        await h.add(envelope(user="other"))
    task = asyncio.create_task(h.sched.run())
    await asyncio.sleep(0.1)
    assert sorted(started) == ["other"] * 2 + ["stuck"] * 3, started
    gates["stuck"].set()
    gates["other"].set()
    await stop_when(h, task, lambda: not h.queue.envelopes)
    assert not h.queue.envelopes and started.count("stuck") == 8


async def test_a_later_envelope_due_sooner_is_not_held_behind_the_armed_timer():
    h = Harness([])
    late = envelope()
    late.next_try = time.time() + 30
    await h.add(late)
    task = asyncio.create_task(h.sched.run())
    await asyncio.sleep(0.05)
    assert h.sched._timer_at == late.next_try  # a timer is armed 30 s out
    soon = envelope()
    soon.next_try = time.time() + 0.2
    await h.add(soon)
    await stop_when(h, task, lambda: soon.evpid not in h.queue.envelopes)
    assert soon.evpid not in h.queue.envelopes
    assert late.evpid in h.queue.envelopes
    assert len(h.attempts) == 1 and h.attempts[0] >= soon.next_try - 0.02


async def test_resuming_the_mda_starts_what_fell_due_while_paused():
    h = Harness([])
    h.sched.paused = True
    env = envelope()
    await h.add(env)
    task = asyncio.create_task(h.sched.run())
    await asyncio.sleep(0.1)
    assert h.attempts == []
    h.sched.paused = False
    h.sched.schedule([])  # what the daemon's resume does
    await stop_when(h, task, lambda: not h.queue.envelopes)
    assert not h.queue.envelopes and len(h.attempts) == 1


async def test_run_after_stop_returns_and_starts_nothing():
    h = Harness([])
    await h.add(envelope())
    await h.sched.stop()
    await asyncio.wait_for(h.sched.run(), 1)
    h.sched.schedule([envelope()])
    await asyncio.sleep(0.05)
    assert h.attempts == []


async def test_a_held_envelope_paused_meanwhile_does_not_hold_up_the_ones_behind_it():
    """A user's held attempts go back one a free slot, earliest first; one that was paused (or
    done) meanwhile is passed over, so that the next one still gets the slot."""
    h = Harness([], parallel=6)
    h.sched.per_user = 1
    gate = asyncio.Event()
    started: list[int] = []

    async def deliver(env: Envelope) -> None:
        started.append(env.evpid)
        await gate.wait()

    h.sched.deliver = deliver
    envs = [envelope(user="one") for _ in range(3)]
    for env in envs:
        await h.add(env)
    task = asyncio.create_task(h.sched.run())
    await asyncio.sleep(0.1)
    assert len(started) == 1
    held = next(e for e in envs if e.evpid not in started)
    held.paused = True  # as pause envelope does
    gate.set()
    await stop_when(h, task, lambda: len(started) == 2 and len(h.queue.envelopes) == 1)
    assert held.evpid not in started and len(started) == 2
    assert list(h.queue.envelopes) == [held.evpid]
