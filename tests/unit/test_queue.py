"""Global queue: grouping, group deadline, order, cancel and re-queue after eviction."""

from qlm_opt.domain import Request, RequestState
from qlm_opt.core.queue import UNPLACED, GlobalQueue, QueueConfig, length_bucket


def _req(i, at, cls="interactive", ttft=2.0, prompt=100, model="m"):
    return Request(i, model, cls, prompt, 50, at, at + ttft)


def test_grouping_by_key_cap_and_age():
    q = GlobalQueue(QueueConfig(max_group_size=2, max_group_age_s=1.0))
    g1, new1 = q.add(_req(0, 0.0), 0.0)
    g2, new2 = q.add(_req(1, 0.1), 0.1)
    g3, new3 = q.add(_req(2, 0.2), 0.2)  # cap reached
    g4, new4 = q.add(_req(3, 0.3, cls="batch", ttft=600), 0.3)  # other class
    g5, new5 = q.add(_req(4, 5.0), 5.0)
    g6, new6 = q.add(_req(5, 7.0), 7.0)  # g5 too old
    assert (new1, new2, new3, new4, new6) == (True, False, True, True, True)
    assert g1 is g2 and g3 is not g1 and g4 is not g3 and g6 is not g5
    assert len(q) == 6


def test_group_deadline_is_earliest_member_and_order_is_edf():
    q = GlobalQueue()
    gb, _ = q.add(_req(0, 0.0, cls="batch", ttft=600), 0.0)
    gi, _ = q.add(_req(1, 0.5, ttft=2.0), 0.5)
    q.place(gb, 3)
    q.place(gi, 3)
    assert gi.deadline_at == 2.5 and gb.deadline_at == 600.0
    assert q.vq(3).head() is gi
    assert [r.id for r in (q.pop(3), q.pop(3))] == [1, 0]
    assert q.pop(3) is None and len(q) == 0


def test_arrival_order_inside_group_and_cancel():
    q = GlobalQueue()
    reqs = [_req(i, 0.01 * i) for i in range(5)]
    for r in reqs:
        g, _ = q.add(r, r.arrived_at)
    q.place(g, 0)
    assert q.remove(reqs[0]) and not q.remove(reqs[0])
    assert g.deadline_at == reqs[1].deadline_at  # deadline moved with the cancel
    assert [q.pop(0).id for _ in range(4)] == [1, 2, 3, 4]


def test_requeue_after_eviction_keeps_place_and_tokens():
    q = GlobalQueue()
    reqs = [_req(i, 0.01 * i) for i in range(4)]
    for r in reqs:
        g, _ = q.add(r, r.arrived_at)
    q.place(g, 1)
    first = q.pop(1)
    first.num_generated = 17  # ran, then evicted
    first.state = RequestState.SWAPPED_OUT
    g2, new = q.requeue(first, 1.0)
    assert g2 is g and not new and g2.instance_id == 1
    assert first.state == RequestState.QUEUED and first.num_generated == 17
    assert q.pop(1) is first  # back at its original place


def test_requeue_recreates_group_when_gone():
    q = GlobalQueue()
    r = _req(0, 0.0)
    g, _ = q.add(r, 0.0)
    q.place(g, 2)
    assert q.pop(2) is r and len(q.groups) == 0
    g2, new = q.requeue(r, 3.0)
    assert new and g2.instance_id == UNPLACED and g2.deadline_at == r.deadline_at


def test_bucket_and_many_requests():
    assert length_bucket(10) == 0 and length_bucket(300) == 1 and length_bucket(5000) == 3
    q = GlobalQueue(QueueConfig(max_group_size=64))
    n = 20000
    for i in range(n):
        g, new = q.add(_req(i, i * 0.001, prompt=50 + i % 3000), i * 0.001)
        if new:
            q.place(g, i % 4)
    got = sum(1 for k in range(4) for _ in iter(lambda k=k: q.pop(k), None))
    assert got == n and len(q) == 0


def test_group_knows_members_queued_with_generated_tokens():
    q = GlobalQueue()
    reqs = [_req(i, 0.01 * i) for i in range(4)]
    for r in reqs:
        g, _ = q.add(r, r.arrived_at)
    q.place(g, 1)
    assert not g.has_generated()
    first = q.pop(1)
    first.num_generated = 17  # ran, then evicted
    q.requeue(first, 1.0)
    assert g.has_generated()
    assert q.pop(1) is first and not g.has_generated()  # popped: gone from the group
    second = q.pop(1)
    second.num_generated = 3
    q.requeue(second, 1.5)
    assert g.has_generated()
    assert q.remove(second) and not g.has_generated()  # cancelled: gone too
