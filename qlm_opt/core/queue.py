"""The global queue: request groups and one virtual queue per instance.

A *request group* gathers queued requests with the same (model, SLO class, output-length
bucket), up to ``max_group_size`` members that arrived within ``max_group_age_s`` of the
group's first member. Inside a group, members stay in arrival order; the group's deadline is
its earliest member deadline. Groups are the unit of placement: each group sits either in the
*unplaced* pool or in exactly one instance's virtual queue, where groups are ordered by
(tier, deadline, seq): EDF with a deterministic tie-break, except that groups the plan cannot
get on time (tier 1, set by the executor) go behind the others so they push nobody late.

Output-length bucket. True output lengths are unknown to the scheduler, so the bucket comes
from what is known at arrival: the prompt length, in log2 bands (``prompt_bucket_edges``). A
client-supplied ``max_tokens`` hint would refine it; traces do not carry one, and in what-if
runs ``Request.output_tokens`` is the hidden ground truth, so it is never read here.

Complexity, with G groups and n queued requests: add, cancel, re-queue, pop and head are
O(log G + log m) (heaps with lazy deletion, dict indexes; m = group size, bounded by the cap),
independent of n. Counting the requests ahead of a deadline in one virtual queue is O(G_i log
G_i); the RWT estimator calls it once per candidate instance per placement.

Evicted requests come back through ``requeue``: they keep ``num_generated`` and go back into
their original group (or a group re-created with their original arrival order and deadline),
so they lose neither tokens nor position.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from qlm_opt.domain import Request, RequestState

log = logging.getLogger(__name__)

UNPLACED = -1  # instance id of the pool of groups not placed on any instance


class QueueConfig(BaseModel):
    """Grouping settings (a config-file boundary, hence pydantic)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_group_size: int = Field(32, gt=0)  # requests per group
    max_group_age_s: float = Field(1.0, ge=0)  # a group takes new members this long
    prompt_bucket_edges: tuple[int, ...] = (256, 1024, 4096)  # prompt tokens, ascending


def length_bucket(prompt_tokens: int, edges: tuple[int, ...] = (256, 1024, 4096)) -> int:
    """Output-length bucket of a request, from its prompt length (see module docstring)."""
    return bisect.bisect_right(edges, prompt_tokens)


GroupKey = tuple[str, str, int]  # (model, slo_class, output-length bucket)


@dataclass(slots=True)
class SchedInfo:
    """Scheduler bookkeeping stored on ``Request._sched``."""

    group_id: int = -1
    bucket: int = 0
    placed_at: float | None = None  # when last put in an instance's virtual queue
    pred_mean_s: float | None = None  # predicted wait from ``placed_at`` to first token
    pred_std_s: float | None = None


@dataclass(slots=True, eq=False)
class RequestGroup:
    """Queued requests of one key, in arrival order. ``deadline_at`` is the earliest member
    deadline (seconds on the run's clock)."""

    id: int
    key: GroupKey
    created_at: float
    seq: int  # tie-break in virtual queues
    instance_id: int = UNPLACED
    # (arrived_at, req id, request), sorted; arrival order inside the group
    members: list[tuple[float, int, Request]] = field(default_factory=list)
    prompt_tokens: int = 0  # sum over members
    version: int = 0  # bumped when the group's heap key changes (lazy deletion)
    tier: int = 0  # 0: on time in the plan (or not planned yet); 1: the plan has it late
    _deadlines: list[tuple[float, int]] = field(default_factory=list)  # heap (deadline, id)
    _ids: set[int] = field(default_factory=set)
    _dl: float = float("inf")  # earliest member deadline, kept up to date (``deadline_at``)
    # its entry in its virtual queue's ``_AheadIndex`` and the (requests, prompt tokens) the
    # index counts for it (None: not indexed)
    _vkey: tuple | None = None
    _vn: int = 0
    _vp: int = 0
    _reqs: list | None = None  # ``requests()`` until the members change
    # ids of members queued with tokens already generated (evicted and re-queued); None:
    # none. Lets a planner treat the usual group (nothing generated yet) by its size alone.
    _gen: set | None = None

    @property
    def model(self) -> str:
        return self.key[0]

    @property
    def slo_class(self) -> str:
        return self.key[1]

    @property
    def bucket(self) -> int:
        return self.key[2]

    @property
    def size(self) -> int:
        return len(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def deadline_at(self) -> float:
        """Earliest member deadline; +inf for an empty group."""
        return self._dl

    def _refresh_deadline(self) -> None:
        """Recompute ``_dl`` from the heap of member deadlines (lazy deletion)."""
        h = self._deadlines
        ids = self._ids
        while h and h[0][1] not in ids:
            heapq.heappop(h)
        self._dl = h[0][0] if h else float("inf")

    def requests(self) -> list[Request]:
        rs = self._reqs
        if rs is None:
            rs = self._reqs = [r for _, _, r in self.members]
        return list(rs)

    def _add(self, req: Request) -> None:
        bisect.insort(self.members, (req.arrived_at, req.id, req))
        self._reqs = None
        self._ids.add(req.id)
        self.prompt_tokens += req.prompt_tokens
        heapq.heappush(self._deadlines, (req.deadline_at, req.id))
        if req.deadline_at < self._dl:
            self._dl = req.deadline_at
        if req.num_generated:
            if self._gen is None:
                self._gen = set()
            self._gen.add(req.id)

    def has_generated(self) -> bool:
        """Whether a member was queued with tokens already generated."""
        return bool(self._gen)

    def _remove(self, req: Request) -> bool:
        if req.id not in self._ids:
            return False
        i = bisect.bisect_left(self.members, (req.arrived_at, req.id))
        if i < len(self.members) and self.members[i][1] == req.id:
            del self.members[i]
            self._reqs = None
        self._forget(req)
        return True

    def _pop_first(self) -> Request:
        _, _, req = self.members.pop(0)
        self._reqs = None
        self._forget(req)
        return req

    def _forget(self, req: Request) -> None:
        """The bookkeeping of a member that left ``members``: ids, generated-token members,
        prompt tokens and the earliest deadline."""
        self._ids.discard(req.id)
        if self._gen:
            self._gen.discard(req.id)
        self.prompt_tokens -= req.prompt_tokens
        if req.deadline_at <= self._dl or not self._ids:
            self._refresh_deadline()


class _AheadIndex:
    """The groups of one virtual queue sorted by (tier, deadline, seq), in blocks of about
    ``LOAD`` entries that know their requests and prompt tokens: the requests ahead of a key
    cost a bisection, a sum over the blocks before it and a walk inside one block, instead
    of a pass over every group. Entries are ``(tier, deadline, seq, group)``; seq is unique,
    so a group is never compared. A group's counted sizes are ``_vn``/``_vp``."""

    __slots__ = ("blocks", "maxes", "bn", "bp")
    LOAD = 48

    def __init__(self) -> None:
        self.blocks: list[list[tuple]] = []
        self.maxes: list[tuple] = []  # last entry of each block
        self.bn: list[int] = []  # requests per block
        self.bp: list[int] = []  # prompt tokens per block

    def add(self, g: RequestGroup) -> None:
        e = (g.tier, g._dl, g.seq, g)
        n = len(g._ids)
        pt = g.prompt_tokens
        g._vkey, g._vn, g._vp = e, n, pt
        blocks = self.blocks
        if not blocks:
            blocks.append([e])
            self.maxes.append(e)
            self.bn.append(n)
            self.bp.append(pt)
            return
        maxes = self.maxes
        i = bisect.bisect_left(maxes, e)
        if i == len(blocks):
            i -= 1
            blocks[i].append(e)
            maxes[i] = e
        else:
            bisect.insort(blocks[i], e)
        self.bn[i] += n
        self.bp[i] += pt
        blk = blocks[i]
        if len(blk) > 2 * self.LOAD:
            half = blk[self.LOAD:]
            del blk[self.LOAD:]
            hn = hp = 0
            for x in half:
                hn += x[3]._vn
                hp += x[3]._vp
            blocks.insert(i + 1, half)
            maxes[i] = blk[-1]
            maxes.insert(i + 1, half[-1])
            self.bn[i] -= hn
            self.bp[i] -= hp
            self.bn.insert(i + 1, hn)
            self.bp.insert(i + 1, hp)

    def _find(self, e: tuple) -> int:
        return bisect.bisect_left(self.maxes, e)

    def remove(self, g: RequestGroup) -> None:
        e = g._vkey
        if e is None:
            return
        i = self._find(e)
        blk = self.blocks[i]
        j = bisect.bisect_left(blk, e)
        if blk[j] is not e:
            raise RuntimeError(f"group {g.id} is not where its virtual queue indexed it")
        del blk[j]
        if blk:
            self.maxes[i] = blk[-1]
            self.bn[i] -= g._vn
            self.bp[i] -= g._vp
        else:
            del self.blocks[i], self.maxes[i], self.bn[i], self.bp[i]
        g._vkey = None
        g._vn = g._vp = 0

    def sync(self, g: RequestGroup) -> None:
        """Bring ``g``'s entry and sizes up to date (after any change to the group)."""
        e = g._vkey
        if e is None or e[0] != g.tier or e[1] != g._dl:
            self.remove(g)
            self.add(g)
            return
        n = len(g._ids)
        pt = g.prompt_tokens
        if n != g._vn or pt != g._vp:
            i = self._find(e)
            self.bn[i] += n - g._vn
            self.bp[i] += pt - g._vp
            g._vn, g._vp = n, pt

    def ahead(self, key: tuple) -> tuple[int, int]:
        """(requests, prompt tokens) of the entries before ``key`` = (tier, deadline, seq)."""
        i = bisect.bisect_left(self.maxes, key)
        n = sum(self.bn[:i]) if i else 0
        p = sum(self.bp[:i]) if i else 0
        if i < len(self.blocks):
            blk = self.blocks[i]
            for e in blk[: bisect.bisect_left(blk, key)]:
                g = e[3]
                n += g._vn
                p += g._vp
        return n, p

    def groups(self) -> list[RequestGroup]:
        return [e[3] for blk in self.blocks for e in blk]

    def groups_before(self, key: tuple) -> Iterator[RequestGroup]:
        """The groups of the entries before ``key`` = (tier, deadline, seq), in order."""
        i = bisect.bisect_left(self.maxes, key)
        for blk in self.blocks[:i]:
            for e in blk:
                yield e[3]
        if i < len(self.blocks):
            blk = self.blocks[i]
            for e in blk[: bisect.bisect_left(blk, key)]:
                yield e[3]


class VirtualQueue:
    """Groups assigned to one instance, in (tier, deadline, seq) order; a heap with lazy
    deletion, and an ``_AheadIndex`` for counting what lies ahead of a key."""

    def __init__(self, instance_id: int) -> None:
        self.instance_id = instance_id
        # (tier, deadline, seq, version, group)
        self._heap: list[tuple[int, float, int, int, RequestGroup]] = []
        self.groups: dict[int, RequestGroup] = {}  # group id -> group
        self.num_requests = 0
        self.prompt_tokens = 0
        self._index = _AheadIndex()

    def __len__(self) -> int:
        return len(self.groups)

    def _push(self, g: RequestGroup) -> None:
        g.version += 1
        heapq.heappush(self._heap, (g.tier, g.deadline_at, g.seq, g.version, g))

    def _clean(self) -> None:
        h = self._heap
        while h:
            _, _, _, ver, g = h[0]
            if g.id in self.groups and g.version == ver and g.instance_id == self.instance_id:
                return
            heapq.heappop(h)

    def head(self) -> RequestGroup | None:
        """The earliest-deadline group, or None."""
        self._clean()
        return self._heap[0][4] if self._heap else None

    def ordered(self) -> list[RequestGroup]:
        """Groups in queue order (O(G))."""
        return self._index.groups()

    def requests_ahead(self, deadline_at: float, seq: int, tier: int = 0) -> tuple[int, int]:
        """(requests, prompt tokens) in groups ordered before (tier, deadline_at, seq)."""
        return self._index.ahead((tier, deadline_at, seq))

    def groups_ahead(self, deadline_at: float, seq: int,
                     tier: int = 0) -> Iterator[RequestGroup]:
        """The groups ordered before (tier, deadline_at, seq), in queue order: those whose
        requests ``requests_ahead`` counts."""
        return self._index.groups_before((tier, deadline_at, seq))

    def __iter__(self) -> Iterator[RequestGroup]:
        return iter(self.ordered())


class GlobalQueue:
    """All queued requests of the fleet, grouped, with one virtual queue per instance."""

    def __init__(self, config: QueueConfig | None = None) -> None:
        self.config = config or QueueConfig()
        self.groups: dict[int, RequestGroup] = {}  # group id -> group
        self._open: dict[GroupKey, RequestGroup] = {}  # key -> group accepting members
        self.vqs: dict[int, VirtualQueue] = {UNPLACED: VirtualQueue(UNPLACED)}
        self._ids = itertools.count()
        self.num_requests = 0
        # called as on_place(group) after a group moved into an instance's virtual queue
        # (placement, rebalancing, re-planning): the policy re-predicts its members' waits
        self.on_place = None

    # -- queries -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_requests

    def vq(self, instance_id: int) -> VirtualQueue:
        q = self.vqs.get(instance_id)
        if q is None:
            q = self.vqs[instance_id] = VirtualQueue(instance_id)
        return q

    def group_of(self, req: Request) -> RequestGroup | None:
        info = req._sched
        if not isinstance(info, SchedInfo):
            return None
        g = self.groups.get(info.group_id)
        return g if g is not None and req.id in g._ids else None

    def __contains__(self, req: Request) -> bool:
        return self.group_of(req) is not None

    def key_of(self, req: Request) -> GroupKey:
        return (req.model, req.slo_class,
                length_bucket(req.prompt_tokens, self.config.prompt_bucket_edges))

    # -- mutations ---------------------------------------------------------------------------
    def add(self, req: Request, now_at: float) -> tuple[RequestGroup, bool]:
        """Queue a request. Returns its group and whether the group is new (to be placed).
        A new member joins its key's open group when that group has room and is younger than
        ``max_group_age_s``."""
        key = self.key_of(req)
        info = req._sched if isinstance(req._sched, SchedInfo) else SchedInfo()
        info.bucket = key[2]
        req._sched = info
        cfg = self.config
        g = self._open.get(key)
        new = (
            g is None
            or g.id not in self.groups
            or g.size >= cfg.max_group_size
            or now_at - g.created_at > cfg.max_group_age_s
        )
        if new:
            g = self._new_group(key, now_at)
            self._open[key] = g
        self._insert(g, req)
        return g, new

    def requeue(self, req: Request, now_at: float) -> tuple[RequestGroup, bool]:
        """Put back a request that left an engine without finishing (evicted, drained). It
        keeps ``num_generated`` and returns to its original group when that group is still
        queued (same place in arrival order), else to a new group on the same instance."""
        if req in self:
            return self.group_of(req), False
        req.state = RequestState.QUEUED
        info = req._sched if isinstance(req._sched, SchedInfo) else SchedInfo()
        req._sched = info
        g = self.groups.get(info.group_id)
        if g is not None:
            self._insert(g, req)
            return g, False
        key = self.key_of(req)
        info.bucket = key[2]
        g = self._new_group(key, now_at)
        self._insert(g, req)
        return g, True

    def remove(self, req: Request) -> bool:
        """Cancel: take a queued request out (client disconnect, drop). False if absent."""
        g = self.group_of(req)
        old = g.deadline_at if g is not None else 0.0
        if g is None or not g._remove(req):
            return False
        self.num_requests -= 1
        q = self.vqs[g.instance_id]
        q.num_requests -= 1
        q.prompt_tokens -= req.prompt_tokens
        self._after_change(g, old)
        return True

    def pop(self, instance_id: int) -> Request | None:
        """Take the first request of the earliest-deadline group of ``instance_id``."""
        q = self.vq(instance_id)
        g = q.head()
        if g is None:
            return None
        old = g.deadline_at
        req = g._pop_first()
        self.num_requests -= 1
        q.num_requests -= 1
        q.prompt_tokens -= req.prompt_tokens
        self._after_change(g, old)
        return req

    def place(self, g: RequestGroup, instance_id: int) -> None:
        """Move a group to ``instance_id``'s virtual queue (UNPLACED: the pool)."""
        if g.instance_id == instance_id:
            return
        old = self.vqs[g.instance_id]
        old.groups.pop(g.id, None)
        old._index.remove(g)
        old.num_requests -= g.size
        old.prompt_tokens -= g.prompt_tokens
        g.instance_id = instance_id
        q = self.vq(instance_id)
        q.groups[g.id] = g
        q._index.add(g)
        q.num_requests += g.size
        q.prompt_tokens += g.prompt_tokens
        q._push(g)
        if self.on_place is not None and instance_id != UNPLACED:
            self.on_place(g)

    # -- internals ---------------------------------------------------------------------------
    def _new_group(self, key: GroupKey, now_at: float) -> RequestGroup:
        gid = next(self._ids)
        g = RequestGroup(id=gid, key=key, created_at=now_at, seq=gid)
        self.groups[gid] = g
        q = self.vqs[UNPLACED]
        q.groups[gid] = g
        q._index.add(g)
        return g

    def _insert(self, g: RequestGroup, req: Request) -> None:
        old_deadline = g.deadline_at
        g._add(req)
        req._sched.group_id = g.id
        req.state = RequestState.QUEUED
        self.num_requests += 1
        q = self.vqs[g.instance_id]
        if g.id not in q.groups:
            q.groups[g.id] = g
        q.num_requests += 1
        q.prompt_tokens += req.prompt_tokens
        q._index.sync(g)
        if g.deadline_at != old_deadline or g.size == 1:
            q._push(g)

    def _after_change(self, g: RequestGroup, old_deadline_at: float) -> None:
        q = self.vqs[g.instance_id]
        if g.size == 0:
            q.groups.pop(g.id, None)
            q._index.remove(g)
            del self.groups[g.id]
            if self._open.get(g.key) is g:
                del self._open[g.key]
            return
        q._index.sync(g)
        if g.deadline_at != old_deadline_at:
            q._push(g)  # the deadline moved; the old heap entry goes stale

    def set_tier(self, g: RequestGroup, tier: int) -> None:
        """Set a group's tier (0: on time in the plan, 1: late in the plan; see
        ``VirtualQueue``) and re-order its virtual queue."""
        if g.tier == tier or g.id not in self.groups:
            return
        g.tier = tier
        q = self.vqs[g.instance_id]
        q._index.sync(g)
        q._push(g)
