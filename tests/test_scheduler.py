"""The scheduler's decisions, with the clock and randomness given: no processes, no sleeping."""

import pytest

from job.outcome import CONFIG, CRASHED, DATABASE, OUTAGE, PERMANENT, RETRYABLE, Failure
from job.retry import RetryPolicy
from job.scheduler import (
    FAIL,
    MAX_DEPTH,
    MAX_REFUNDS,
    MIN_DEPTH,
    PROBE_BASE,
    PROBE_CAP,
    REFUND,
    RETRY,
    STOP,
    Scheduler,
    Task,
)

POLICY = RetryPolicy(max_attempts=3, backoff=1.0, max_backoff=60.0)


def tasks(*ids, attempt=1):
    return [Task(i, {}, attempt) for i in ids]


def scheduler(*ids, rand=0.0, policy=POLICY, depth=None, new=None):
    return Scheduler(iter(new if new is not None else tasks(*ids)), policy=policy, rand=lambda: rand,
                     fixed_depth=depth)


def outage(connecting=False):
    return Failure(OUTAGE, "OperationalError", "connection refused", code="08001", system=DATABASE,
                   reconnect=True, connecting=connecting)


def ids(batch):
    return [t.item_id for t in batch]


@pytest.mark.parametrize("room, expected", [(0, []), (1, ["a"]), (2, ["a", "b"]), (5, ["a", "b", "c"])])
def test_take_hands_out_new_items_up_to_the_room(room, expected):
    assert ids(scheduler("a", "b", "c").take(room, 0.0)) == expected


def test_sent_back_tasks_go_first_then_due_retries_then_new_items():
    s = scheduler("a", "b", "c", "d")
    first = s.take(2, 0.0)
    assert s.failed(first[0], Failure(RETRYABLE, "E", "m"), 0.0).action == RETRY
    s.put_back([first[1]])
    # rand 0.0 with equal jitter: the retry of "a" waits half of 1 s.
    assert ids(s.take(1, 0.1)) == ["b"]
    assert ids(s.take(5, 0.1)) == ["c", "d"]
    assert s.take(5, 0.4) == []
    later = s.take(5, 0.5)
    assert ids(later) == ["a"] and later[0].attempt == 2


def test_finished_only_when_new_items_retries_and_queue_are_used_up():
    s = scheduler("a", "b")
    assert not s.finished()
    [a] = s.take(1, 0.0)
    assert not s.finished()  # "b" is left
    s.succeeded(s.take(1, 0.0)[0], 0.01, 0.0)
    assert s.finished()      # what is out is the engine's to wait for
    s.failed(a, Failure(RETRYABLE, "E", "m"), 0.0)
    assert not s.finished()  # a retry waits
    assert s.next_wake(0.0) == pytest.approx(0.5)
    [again] = s.take(1, 0.5)
    assert s.succeeded(again, 0.01, 0.6) is None
    assert s.finished()


@pytest.mark.parametrize("kind, attempt, action", [
    (RETRYABLE, 1, RETRY),
    (RETRYABLE, 3, FAIL),     # the third attempt was the last
    (PERMANENT, 1, FAIL),
    (CRASHED, 2, RETRY),
    (CONFIG, 1, STOP),        # the run stops; the attempt is not charged
])
def test_what_a_failed_attempt_leads_to(kind, attempt, action):
    s = scheduler(new=[Task("a", {}, attempt)])
    [task] = s.take(1, 0.0)
    assert s.failed(task, Failure(kind, "E", "m"), 0.0).action == action


def test_attempts_are_counted_from_the_budget_start():
    # --retry-failed: attempts 1-3 were spent before; 4-6 are a new set.
    s = scheduler(new=[Task("a", {}, 4, budget_from=4)])
    [task] = s.take(1, 0.0)
    assert s.failed(task, Failure(RETRYABLE, "E", "m"), 0.0).action == RETRY


def test_progress_of_a_failed_attempt_goes_to_the_next_one():
    s = scheduler("a")
    [task] = s.take(1, 0.0)
    s.failed(task, Failure(RETRYABLE, "E", "m"), 0.0, progress={"step": "one"})
    [retry] = s.take(1, 10.0)
    assert retry.progress == {"step": "one"} and retry.attempt == 2


def test_one_environment_failure_in_mid_item_is_refunded_without_pausing():
    s = scheduler("a", "b")
    a, _b = s.take(2, 0.0)
    verdict = s.failed(a, outage(), 0.0)
    assert (verdict.action, verdict.opened, s.paused) == (REFUND, False, False)
    again = s.take(1, 0.0)
    assert ids(again) == ["a"] and again[0].attempt == 1  # the same attempt, at once


def test_a_failed_connect_pauses_at_once():
    s = scheduler("a", "b")
    a, _ = s.take(2, 0.0)
    verdict = s.failed(a, outage(connecting=True), 0.0)
    assert (verdict.action, verdict.opened, s.paused) == (REFUND, True, True)


def test_environment_failures_of_two_items_in_a_row_pause():
    s = scheduler("a", "b", "c")
    a, b, _c = s.take(3, 0.0)
    assert not s.failed(a, outage(), 0.0).opened
    assert s.failed(b, outage(), 0.1).opened
    assert s.paused and s.breaker.outage.refunded == 2


def test_a_success_between_two_environment_failures_does_not_pause():
    s = scheduler("a", "b", "c")
    a, b, c = s.take(3, 0.0)
    s.failed(a, outage(), 0.0)
    s.succeeded(b, 0.01, 0.1)
    assert not s.failed(c, outage(), 0.2).opened


def test_the_same_item_twice_is_not_an_outage():
    s = scheduler("a", "b")
    [a] = s.take(1, 0.0)
    s.failed(a, outage(), 0.0)
    [a] = s.take(1, 0.0)
    assert not s.failed(a, outage(), 0.1).opened


def test_while_paused_only_one_probe_goes_out_when_due():
    s = scheduler("a", "b", "c", rand=0.0)
    a, _b = s.take(2, 0.0)
    s.failed(a, outage(connecting=True), 10.0)
    # rand 0.0, jitter 0.5: the first probe waits half of PROBE_BASE.
    assert s.take(4, 10.0) == []
    assert s.next_wake(10.0) == pytest.approx(PROBE_BASE / 2)
    probe = s.take(4, 10.0 + PROBE_BASE / 2)
    assert ids(probe) == ["a"]
    assert s.take(4, 20.0) == []  # one probe at a time
    assert s.next_wake(20.0) is None


def test_a_probe_that_meets_the_outage_again_is_refunded_and_the_next_waits_longer():
    s = scheduler("a", "b", rand=0.0)
    [a] = s.take(1, 0.0)
    s.failed(a, outage(connecting=True), 0.0)
    waits = []
    now = 0.0
    for _ in range(12):
        now += s.next_wake(now)
        [probe] = s.take(1, now)
        assert probe.item_id == "a" and probe.attempt == 1
        verdict = s.failed(probe, outage(connecting=True), now)
        assert verdict.action == REFUND and not verdict.opened
        waits.append(s.next_wake(now))
    assert waits == sorted(waits) and waits[0] < waits[-1]
    assert max(waits) <= PROBE_CAP
    assert s.breaker.outage.probes == 12


def test_a_probe_that_succeeds_ends_the_outage():
    s = scheduler("a", "b", "c")
    a, b = s.take(2, 0.0)
    s.failed(a, outage(connecting=True), 100.0)
    s.failed(b, outage(), 100.5)
    [probe] = s.take(1, 130.0)
    ended = s.succeeded(probe, 0.01, 131.0)
    assert ended is not None and ended.seconds(999.0) == pytest.approx(31.0)
    assert (ended.refunded, ended.probes, ended.system) == (2, 1, DATABASE)
    assert probe.item_id == "b"  # the last one sent back goes out first
    assert not s.paused and ids(s.take(5, 131.0)) == ["a", "c"]
    assert s.breaker.history == [ended]


def test_an_item_failure_answering_a_probe_also_ends_the_outage():
    s = scheduler("a", "b")
    [a] = s.take(1, 0.0)
    s.failed(a, outage(connecting=True), 0.0)
    [probe] = s.take(1, 60.0)
    verdict = s.failed(probe, Failure(PERMANENT, "IntegrityError", "duplicate key", code="23505"), 61.0)
    assert verdict.action == FAIL and verdict.closed is not None and not s.paused


def test_an_item_whose_environment_failures_never_stop_is_charged_after_max_refunds():
    s = scheduler("a", "b")
    actions = []
    for n in range(MAX_REFUNDS + 1):
        [a] = s.take(1, float(n))
        actions.append(s.failed(a, outage(), float(n)).action)
        if n % 2 == 0:
            s.breaker.answered(float(n))  # other items succeed meanwhile: no outage
    assert actions == [REFUND] * MAX_REFUNDS + [RETRY]


def test_a_refund_is_forgiven_when_the_failures_in_a_row_turn_out_to_be_an_outage():
    """An item at the head of the queue meets each new outage first, while the breaker is still
    closed: that refund is the outage's, not the item's, once the next failure opens it."""
    cycles = MAX_REFUNDS + 2
    s = scheduler("h", *[f"j{n}" for n in range(cycles)])
    now = 0.0
    for n in range(cycles):
        h, j = s.take(2, now)
        assert (h.item_id, j.item_id) == ("h", f"j{n}")
        assert s.failed(h, outage(), now).action == REFUND
        assert s.failed(j, outage(), now).opened
        now += 100.0
        [probe] = s.take(1, now)
        assert probe.item_id == f"j{n}" and s.succeeded(probe, 0.01, now) is not None
    [h] = s.take(1, now)
    assert (h.item_id, h.attempt, h.refunds) == ("h", 1, 0)


def test_a_probe_sent_back_unstarted_is_due_again_at_once():
    s = scheduler("a", "b")
    [a] = s.take(1, 0.0)
    s.failed(a, outage(connecting=True), 0.0)
    [probe] = s.take(1, 5.0)
    s.put_back([probe])
    assert ids(s.take(1, 5.0)) == ["a"]


def test_a_suspect_goes_out_alone_once_nothing_else_is_out():
    s = scheduler(new=[Task("a", {}, 1), Task("s", {}, 2, suspect=True), Task("b", {}, 1)])
    assert ids(s.take(5, 0.0)) == ["a"]          # "s" waits for "a" to end
    assert s.take(5, 0.0, busy=1) == []
    [suspect] = s.take(5, 0.0, busy=0)
    assert suspect.item_id == "s" and suspect.record_start
    assert s.worker_depth == 1
    assert s.take(5, 0.0, busy=1) == []          # nothing goes out beside it
    s.succeeded(suspect, 0.01, 0.1)
    assert ids(s.take(5, 0.1)) == ["b"]


def test_careful_tasks_go_out_one_per_worker_with_their_start_recorded():
    s = scheduler("a", "b", "c", "d")
    s.careful = 2
    assert s.worker_depth == 1
    first = s.take(1, 0.0) + s.take(1, 0.0)
    assert [t.record_start for t in first] == [True, True]
    assert s.worker_depth == MIN_DEPTH
    assert [t.record_start for t in s.take(2, 0.0)] == [False, False]


@pytest.mark.parametrize("seconds, depth", [(10.0, MIN_DEPTH), (0.02, MIN_DEPTH), (0.004, 5), (1e-5, MAX_DEPTH)])
def test_adaptive_depth_queues_about_20_ms_of_work(seconds, depth):
    s = scheduler(*"abc")
    for t in s.take(3, 0.0):
        s.succeeded(t, seconds, 0.0)
    assert s.depth == depth


def test_a_fixed_depth_does_not_adapt():
    s = scheduler("a", depth=7)
    [a] = s.take(1, 0.0)
    s.succeeded(a, 1e-5, 0.0)
    assert s.depth == 7


def test_a_source_that_says_not_yet_keeps_the_scheduler_unfinished_until_it_ends():
    from job.scheduler import NOT_YET

    claimed: list = [Task("a", {}, 1)]
    state = {"ended": False}

    def source():  # as a claim queue's: what is claimed, NOT_YET while more may come, then the end
        while True:
            if claimed:
                yield claimed.pop(0)
            elif state["ended"]:
                return
            else:
                yield NOT_YET

    s = Scheduler(source(), policy=POLICY, rand=lambda: 0.0)
    assert ids(s.take(5, 0.0)) == ["a"]
    assert s.take(5, 0.0) == [] and not s.finished()  # NOT_YET is no end
    claimed.append(Task("b", {}, 1))
    assert ids(s.take(5, 0.0)) == ["b"]
    assert not s.finished()
    state["ended"] = True
    assert s.take(5, 0.0) == [] and s.finished()


def test_a_discarded_suspect_lets_the_others_go_out():
    s = scheduler(new=[Task("s", {}, 2, suspect=True), *tasks("a", "b")])
    [suspect] = s.take(5, 0.0)
    assert suspect.suspect and s.take(5, 0.0) == []  # nothing follows a suspect while it runs
    s.discard(suspect)  # its claim went to another runner: it never runs here
    assert ids(s.take(5, 0.0)) == ["a", "b"]
