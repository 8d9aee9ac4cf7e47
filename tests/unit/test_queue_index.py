"""The virtual queue's order index: ``requests_ahead``, ``groups_ahead``, ``ordered`` and a
group's deadline agree with a pass over every group, through random adds, pops, cancels, re-queues,
placements and tier changes."""

import random

from qlm_opt.domain import Request, RequestState
from qlm_opt.core.queue import UNPLACED, GlobalQueue, QueueConfig, _AheadIndex


def _brute_ahead(vq, deadline_at, seq, tier):
    n = p = 0
    key = (tier, deadline_at, seq)
    for g in vq.groups.values():
        dl = min((r.deadline_at for r in g.requests()), default=float("inf"))
        if (g.tier, dl, g.seq) < key:
            n += g.size
            p += g.prompt_tokens
    return n, p


def _check(q: GlobalQueue, rnd: random.Random) -> None:
    for iid, vq in q.vqs.items():
        gs = list(vq.groups.values())
        for g in gs:
            assert g.deadline_at == min(r.deadline_at for r in g.requests())
        want = sorted(gs, key=lambda g: (g.tier, g.deadline_at, g.seq))
        assert vq.ordered() == want
        keys = [(g.deadline_at, g.seq, g.tier) for g in rnd.sample(gs, min(len(gs), 8))]
        keys += [(rnd.uniform(0, 60), rnd.randrange(0, 10_000), rnd.randrange(2))
                 for _ in range(5)]
        for d, s, t in keys:
            assert vq.requests_ahead(d, s, t) == _brute_ahead(vq, d, s, t)
            # the groups behind that count, in queue order
            assert list(vq.groups_ahead(d, s, t)) == [
                g for g in want if (g.tier, g.deadline_at, g.seq) < (t, d, s)]


def test_index_matches_brute_force_under_random_operations(monkeypatch):
    monkeypatch.setattr(_AheadIndex, "LOAD", 3)  # small blocks: splits and merges happen
    rnd = random.Random(7)
    q = GlobalQueue(QueueConfig(max_group_size=4, max_group_age_s=0.5))
    out: list[Request] = []
    now = 0.0
    rid = 0
    for step in range(2000):
        now += rnd.expovariate(20.0)
        op = rnd.random()
        if op < 0.45:
            cls, ttft = rnd.choice([("i", 2.0), ("b", 30.0), ("x", 5.0)])
            r = Request(rid, rnd.choice("mn"), cls, rnd.randrange(1, 3000), 10, now,
                        now + ttft * rnd.uniform(0.5, 1.5))
            rid += 1
            g, new = q.add(r, now)
            if new or rnd.random() < 0.1:
                q.place(g, rnd.choice([0, 1, 2, UNPLACED]))
        elif op < 0.65:
            r = q.pop(rnd.choice([0, 1, 2, UNPLACED]))
            if r is not None:
                out.append(r)
        elif op < 0.72 and out:
            r = out.pop(rnd.randrange(len(out)))
            r.state = RequestState.SWAPPED_OUT
            q.requeue(r, now)
        elif op < 0.80 and q.groups:
            g = rnd.choice(list(q.groups.values()))
            q.remove(rnd.choice(g.requests()))
        elif op < 0.90 and q.groups:
            g = rnd.choice(list(q.groups.values()))
            q.set_tier(g, rnd.randrange(2))
        elif q.groups:
            g = rnd.choice(list(q.groups.values()))
            q.place(g, rnd.choice([0, 1, 2, UNPLACED]))
        if step % 40 == 0:
            _check(q, rnd)
    _check(q, rnd)
    assert max(len(vq._index.blocks) for vq in q.vqs.values()) > 3
    assert sum(len(vq._index.groups()) for vq in q.vqs.values()) == len(q.groups)
