"""Batch API jobs in what-if runs (the workload's ``[[batch_jobs]]``).

A job is ``num_lines`` requests submitted together at ``submit_at_s``, on one model, with
lognormal prompt and output lengths (``lengths``, by default the Azure conversation fit; a
``mixture`` of lognormals there as in the traffic's).
Each line is a request of the job's class whose deadline is the end of the job's window, as in
the server (``qlm_opt.server.batch``). A line's ``tenant`` is the job's name, which is how
``job_report`` finds a job's lines again.

The lines enter the queue as the server's batch runner feeds them (``core.batch_feed.FeedRule``, one
implementation for both; ``BatchFeed`` applies it in a simulated run, ``qlm_opt.whatif.run``
uses it), not all at submission. ``add_batch_jobs`` (all lines at submission) is what
``build_requests`` gives the bound and capacity tools.

``job_report`` says, per job, how many lines were done, how many inside the window (completed
by the window's end, not merely started), how many expired, the p50 and p99 completion time and
when the last one finished, as a fraction of the window.
"""

from __future__ import annotations

import math

import numpy as np

from qlm_opt.config import BatchJobSection, Workload, window_s
from qlm_opt.core.batch_feed import FeedRule, Footprint, LineLatency, fleet_seats
from qlm_opt.domain import Request, RequestState
from qlm_opt.whatif.lengths import sample_lengths


def job_name(job: BatchJobSection, index: int) -> str:
    return job.name or f"batch-job-{index}"


def job_requests(job: BatchJobSection, index: int, workload: Workload, first_id: int,
                 rng: np.random.Generator, slo_class: str | None = None) -> list[Request]:
    """The lines of one job as requests (ids from ``first_id``). ``slo_class`` overrides the
    job's class (e.g. the same lines sent as ordinary interactive requests)."""
    cname = slo_class or job.slo_class
    cls = workload.classes[cname]
    n = job.num_lines
    pr, out = sample_lengths(job.lengths, rng, n)
    at = float(job.submit_at_s)
    due = at + window_s(job.window) if slo_class is None else at + cls.ttft_s
    name = job_name(job, index)
    return [
        Request(id=first_id + k, model=job.model, slo_class=cname,
                prompt_tokens=int(pr[k]), output_tokens=int(out[k]), arrived_at=at,
                deadline_at=due, tpot_s=cls.tpot_s if slo_class is not None else None,
                priority=cls.priority, tenant=name)
        for k in range(n)
    ]


def add_batch_jobs(reqs: list[Request], workload: Workload, seed: int,
                   slo_class: str | None = None) -> list[Request]:
    """``reqs`` plus every job's lines, sorted by arrival (ties: traffic first)."""
    rng = np.random.default_rng(seed + 104_729)
    out = list(reqs)
    next_id = max((r.id for r in reqs), default=-1) + 1
    for i, job in enumerate(workload.data.batch_jobs):
        lines = job_requests(job, i, workload, next_id, rng, slo_class)
        next_id += len(lines)
        out.extend(lines)
    out.sort(key=lambda r: r.arrived_at)  # stable: equal times keep their order
    return out


def job_report(requests: list[Request], workload: Workload) -> dict[str, dict]:
    """Per job, every line counted once: ``num_done`` (finished, at any time),
    ``num_in_window`` (finished by the window's end), ``num_expired`` (no result when the
    window ended: ``batch_expired``), ``num_failed`` (dropped for another reason); a line still running or queued is in none
    of them, so they add up to ``num_lines`` only once every line has ended; the share
    ``in_window``; p50 and p99 of the finished lines' completion time from the job's
    submission (s); and the last line's completion as a fraction of the window (NaN while
    lines are unfinished)."""
    jobs = {job_name(j, i): j for i, j in enumerate(workload.data.batch_jobs)}
    acc: dict[str, list[Request]] = {n: [] for n in jobs}
    for r in requests:
        if r.tenant in acc:
            acc[r.tenant].append(r)
    out: dict[str, dict] = {}
    for name, lines in acc.items():
        job = jobs[name]
        w = window_s(job.window)
        end_at = job.submit_at_s + w
        done = np.array([r.completed_at - job.submit_at_s for r in lines
                         if r.state == RequestState.FINISHED and r.completed_at is not None])
        in_window = int(np.sum(done <= w + 1e-9))
        dropped = [r for r in lines if r.state == RequestState.DROPPED]
        expired = sum(1 for r in dropped if r.drop_reason == "batch_expired")
        failed = len(dropped) - expired  # a line neither finished nor dropped is in none
        all_done = len(done) == len(lines) and lines
        p50, p99 = ((float(np.quantile(done, 0.5)), float(np.quantile(done, 0.99)))
                    if len(done) else (float("nan"), float("nan")))
        out[name] = {"num_lines": len(lines), "num_done": len(done),
                     "num_in_window": in_window, "num_expired": expired,
                     "num_failed": failed,
                     "in_window": in_window / len(lines) if lines else float("nan"),
                     "p50_completion_s": p50, "p99_completion_s": p99,
                     "window_s": w, "window_end_at": end_at,
                     "completion_window_fraction": float(done.max()) / w if all_done
                     else float("nan")}
    return out


class _Feeder:
    """One job's lines, fed into a simulated runtime by ``FeedRule``."""

    def __init__(self, feed: BatchFeed, lines: list[Request], model: str, submit_at: float,
                 end_at: float, limits: dict[str, float]) -> None:
        self.feed = feed
        self.lines = lines
        self.model = model
        self.submit_at = submit_at
        self.end_at = end_at
        self.limits = limits  # more urgent class -> TTFT target (s)
        self.next = 0
        self.inflight: dict[int, Request] = {}  # request id -> line
        self.last_fed_at: float | None = None
        self.timer_at = math.inf
        self.ended = False
        self.footprint = Footprint()
        self.latency = LineLatency()
        self.peak_in_flight = 0

    @property
    def left(self) -> bool:
        return not self.ended and (self.next < len(self.lines) or bool(self.inflight))

    def _on_timer(self) -> None:
        self.timer_at = math.inf
        self.pump()

    def _look_again(self, after_s: float) -> None:
        """One pending timer at most, the earliest asked for (line events call ``pump``
        too)."""
        at = self.feed.sim.now() + max(after_s, 1e-6)
        if at < self.timer_at:
            self.timer_at = at
            self.feed.sim.call_at(at, self._timer(at))

    def _timer(self, at: float):
        def fire() -> None:
            if self.timer_at == at:
                self._on_timer()
        return fire

    def pump(self) -> None:
        if self.ended or self.next >= len(self.lines) or self.feed.sim.now() < self.submit_at:
            return
        feed = self.feed
        rule = feed.rule
        while self.next < len(self.lines):
            now = feed.sim.now()
            instances = feed.rt.ready_instances(self.model)
            target = rule.target_in_flight(
                len(self.lines) - self.next, now, self.submit_at, self.end_at - self.submit_at,
                self.latency.mean_s,
                fleet_seats(instances, self.footprint.mean))
            if len(self.inflight) >= target:
                self._look_again(1.0)  # the target grows as the window runs out
                return  # a line's end pumps again
            # requests of the model without a first token: lines and other requests alike
            busy = feed.unstarted.get(self.model, 0) + sum(
                1 for r in feed.waiting.values() if r.model == self.model)
            if not rule.fleet_ok(busy, len(instances)):
                return  # a line's first token (or end) pumps again
            if not rule.urgent_ok(now, feed.waiting.values(), self.limits):
                self._look_again(rule.poll_s)
                return
            r = self.lines[self.next]
            self.next += 1
            self.last_fed_at = now
            r.arrived_at = now  # admitted now; its deadline stays the window's end
            self.inflight[r.id] = r
            self.peak_in_flight = max(self.peak_in_flight, len(self.inflight))
            feed.unstarted[self.model] = feed.unstarted.get(self.model, 0) + 1
            feed.admit(r)

    def expire(self) -> None:
        """The window ended: lines in flight are cancelled, unfed lines never run."""
        self.ended = True
        for req in list(self.inflight.values()):
            if not req.is_done:
                self.feed.rt.cancel(req, "batch_expired")
        for req in self.inflight.values():
            if req.first_token_at is None:
                self.feed.started(self.model)
        self.inflight.clear()


class BatchFeed:
    """The workload's ``[[batch_jobs]]`` in a simulated run: each job's lines are fed into the
    queue by ``rule``, as the server's batch runner feeds them. ``arrived(req)`` must see
    every other request as it arrives (the gate watches the more urgent ones); ``finish()``
    after the run marks every line without a result ``batch_expired``."""

    def __init__(self, sim, rt, policy, workload: Workload, rule: FeedRule, first_id: int,
                 seed: int) -> None:
        self.sim = sim
        self.rt = rt
        self.policy = policy
        self.rule = rule
        self.workload = workload
        self.waiting: dict[int, Request] = {}  # other requests without a first token
        self.unstarted: dict[str, int] = {}  # model -> batch lines in flight, no first token
        self.feeders: list[_Feeder] = []
        self.lines: list[Request] = []
        self._by_id: dict[int, _Feeder] = {}
        rng = np.random.default_rng(seed + 104_729)
        next_id = first_id
        for i, job in enumerate(workload.data.batch_jobs):
            lines = job_requests(job, i, workload, next_id, rng)
            next_id += len(lines)
            self.lines.extend(lines)
            prio = workload.classes[job.slo_class].priority
            limits = {n: c.ttft_s for n, c in workload.classes.items() if c.priority < prio}
            end_at = job.submit_at_s + window_s(job.window)
            f = _Feeder(self, lines, job.model, job.submit_at_s, end_at, limits)
            self.feeders.append(f)
            for r in lines:
                self._by_id[r.id] = f
            sim.call_at(job.submit_at_s, f.pump)
            sim.call_at(end_at, f.expire)
        rt.first_token_hooks.append(self._first_token)
        rt.finish_hooks.append(self._ended)
        rt.drop_hooks.append(self._ended)

    @property
    def last_window_end_at(self) -> float:
        return max((f.end_at for f in self.feeders), default=0.0)

    def admit(self, req: Request) -> None:
        self.rt.accept(req)
        self.policy.on_arrival(req)

    def arrived(self, req: Request) -> None:
        """Another request arrived (call before the policy sees it): until its first token it
        counts in the backpressure, and in the gate when its class is more urgent."""
        if req.first_token_at is None:
            self.waiting[req.id] = req

    def active(self) -> bool:
        return any(f.left for f in self.feeders)

    def started(self, model: str) -> None:
        self.unstarted[model] = max(0, self.unstarted.get(model, 0) - 1)

    def _pump_model(self, model: str) -> None:
        for f in self.feeders:
            if f.model == model:
                f.pump()

    def _first_token(self, req: Request) -> None:
        self.waiting.pop(req.id, None)
        f = self._by_id.get(req.id)
        if f is not None and req.id in f.inflight:
            self.started(f.model)
            self._pump_model(f.model)

    def _ended(self, req: Request) -> None:
        self.waiting.pop(req.id, None)
        f = self._by_id.get(req.id)
        if f is None or f.inflight.pop(req.id, None) is None:
            return
        if req.first_token_at is None:  # dropped before its first token
            self.started(f.model)
        if req.completed_at is not None:
            f.footprint.add(req.prompt_tokens, req.num_generated)
            f.latency.add(req.completed_at - req.arrived_at)
        self._pump_model(f.model)

    def finish(self) -> None:
        """After the run: every line without a result never ran in time."""
        for r in self.lines:
            if not r.is_done:
                r.state = RequestState.DROPPED
                r.drop_reason = "batch_expired"

    def report(self) -> dict[str, dict]:
        out = job_report(self.lines, self.workload)
        for i, f in enumerate(self.feeders):
            out[job_name(self.workload.data.batch_jobs[i], i)]["peak_lines_in_flight"] = (
                f.peak_in_flight)
        return out


def traffic_workload(workload: Workload) -> Workload:
    """``workload`` without its batch jobs (the traffic they are fed beside)."""
    if not workload.data.batch_jobs:
        return workload
    return Workload(workload.data.model_copy(update={"batch_jobs": []}), workload.source)
