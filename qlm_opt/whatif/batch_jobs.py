"""Batch API jobs in what-if runs (the workload's ``[[batch_jobs]]``).

A job is ``num_lines`` requests submitted together at ``submit_at_s``, on one model, with
lognormal prompt and output lengths (``lengths``, by default the Azure conversation fit).
Each line is a request of the job's class whose deadline is the end of the job's window, as in
the server (``qlm_opt.server.batch``). A line's ``tenant`` is the job's name, which is how
``job_report`` finds a job's lines again.

``job_report`` says, per job, how many lines were done inside the window (completed by the
window's end, not merely started) and when the last one finished, as a fraction of the window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qlm_opt.config import BatchJobSection, Workload, window_s
from qlm_opt.domain import Request, RequestState


def job_name(job: BatchJobSection, index: int) -> str:
    return job.name or f"batch-job-{index}"


def job_requests(job: BatchJobSection, index: int, workload: Workload, first_id: int,
                 rng: np.random.Generator, slo_class: str | None = None) -> list[Request]:
    """The lines of one job as requests (ids from ``first_id``). ``slo_class`` overrides the
    job's class (e.g. the same lines sent as ordinary interactive requests)."""
    cname = slo_class or job.slo_class
    cls = workload.classes[cname]
    L = job.lengths
    n = job.num_lines
    pr = np.clip(np.rint(rng.lognormal(L.prompt_log_mu, L.prompt_log_sigma, n)),
                 L.prompt_min, L.prompt_max).astype(np.int64)
    out = np.clip(np.rint(rng.lognormal(L.output_log_mu, L.output_log_sigma, n)),
                  L.output_min, L.output_max).astype(np.int64)
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
    """Per job: lines, lines done inside the window, their share, and the time from
    submission to the last line's completion as a fraction of the window (NaN while lines
    are unfinished)."""
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
        in_window = sum(1 for r in lines if r.state == RequestState.FINISHED
                        and r.completed_at is not None and r.completed_at <= end_at + 1e-9)
        done = [r.completed_at for r in lines if r.completed_at is not None]
        all_done = len(done) == len(lines) and lines
        last = (max(done) - job.submit_at_s) / w if all_done else float("nan")
        out[name] = {"num_lines": len(lines), "num_in_window": in_window,
                     "in_window": in_window / len(lines) if lines else float("nan"),
                     "completion_window_fraction": last}
    return out


# -- feeding lines as the server's batch runner does ------------------------------------------
@dataclass(frozen=True, slots=True)
class FeedRule:
    """How a job's lines enter the global queue (``qlm_opt.server.batch.runner`` applies the
    same rule).

    - Pace: keep as many lines in flight as it takes to finish the remaining lines by
      ``pace_fraction`` of the window (the rest is margin), by Little's law from the measured
      mean line latency (``target_in_flight``), between ``min_lines_in_flight`` and
      ``max_lines_in_flight``. A job that falls behind (slower lines, less time) gets more; a
      job with slack occupies few engine slots, which interactive work then has.
    - Gate: new lines only while no more urgent request has waited for its first token
      longer than ``urgent_wait_fraction`` of its class's TTFT target (``urgent_ok``).
    """

    max_lines_in_flight: int = 48
    urgent_wait_fraction: float = 0.5
    min_lines_in_flight: int = 4
    pace_fraction: float = 0.8
    poll_s: float = 0.05  # how often a blocked feeder looks again

    def target_in_flight(self, lines_left: int, now: float, submitted_at: float,
                         window_s: float, mean_line_s: float | None) -> int:
        """Lines to keep in flight at ``now``. ``mean_line_s``: mean admission-to-end time of
        the job's finished lines (None before the first); all times on one clock (s)."""
        lo, hi = self.min_lines_in_flight, self.max_lines_in_flight
        if mean_line_s is None or lines_left <= 0:
            return min(lo, hi)
        left_s = submitted_at + self.pace_fraction * window_s - now
        if left_s <= mean_line_s:
            return hi
        return max(lo, min(hi, math.ceil(lines_left / left_s * mean_line_s)))

    def urgent_ok(self, now: float, waiting, limit_s_by_class: dict[str, float]) -> bool:
        """``waiting``: requests without a first token (of any class); True when none of the
        more urgent classes (the keys of ``limit_s_by_class``, TTFT targets in s) has waited
        past its share of the target."""
        f = self.urgent_wait_fraction
        for r in waiting:
            lim = limit_s_by_class.get(r.slo_class)
            if lim is not None and r.first_token_at is None and now - r.arrived_at > f * lim:
                return False
        return True


class LineLatency:
    """Mean admission-to-end time of a job's lines: an exponentially weighted mean."""

    __slots__ = ("mean_s", "alpha")

    def __init__(self, alpha: float = 0.05) -> None:
        self.mean_s: float | None = None
        self.alpha = alpha

    def add(self, s: float) -> None:
        self.mean_s = s if self.mean_s is None else self.mean_s + self.alpha * (s - self.mean_s)


class _Feeder:
    """One job's lines, fed into a simulated runtime by ``FeedRule``."""

    def __init__(self, lines: list[Request], submit_at: float, end_at: float, rule: FeedRule,
                 sim, admit, urgent_ok) -> None:
        self.lines = lines
        self.submit_at = submit_at
        self.next = 0
        self.inflight: dict[int, Request] = {}  # request id -> line
        self.end_at = end_at
        self.rule = rule
        self.sim = sim
        self.admit = admit
        self.urgent_ok = urgent_ok
        self.timer = False
        self.ended = False
        self.latency = LineLatency()

    @property
    def left(self) -> bool:
        return not self.ended and (self.next < len(self.lines) or bool(self.inflight))

    def _on_timer(self) -> None:
        self.timer = False
        self.pump()

    def _look_again(self, after_s: float) -> None:
        """One pending timer at most (line ends call ``pump`` too)."""
        if not self.timer:
            self.timer = True
            self.sim.call_at(self.sim.now() + after_s, self._on_timer)

    def pump(self) -> None:
        if self.ended:
            return
        now = self.sim.now()
        rule = self.rule
        target = rule.target_in_flight(len(self.lines) - self.next, now, self.submit_at,
                                       self.end_at - self.submit_at, self.latency.mean_s)
        if self.next < len(self.lines) and len(self.inflight) >= target:
            self._look_again(max(rule.poll_s, 1.0))  # the target grows as the window runs out
        while self.next < len(self.lines) and len(self.inflight) < target:
            if not self.urgent_ok(now):
                self._look_again(rule.poll_s)
                return
            r = self.lines[self.next]
            self.next += 1
            r.arrived_at = now  # admitted now; its deadline stays the window's end
            self.inflight[r.id] = r
            self.admit(r)

    def ended_line(self, req: Request) -> None:
        if self.inflight.pop(req.id, None) is not None:
            if req.completed_at is not None:
                self.latency.add(req.completed_at - req.arrived_at)
            self.pump()


def simulate(policy_name: str, fleet, workload: Workload, traffic: list[Request],
             rule: FeedRule | None = None, drain_s: float = 3600.0, seed: int = 0,
             policy_options: dict | None = None) -> list[Request]:
    """A what-if run of ``traffic`` (sorted by arrival) plus the workload's batch jobs fed
    into the queue by ``rule``, as the server does. At a job's window end its lines still in
    flight are cancelled and unfed lines never run (they are ``batch_expired``). Returns every
    request: the traffic and all lines (``job_report`` reads the lines)."""
    from qlm_opt.policies import make_policy
    from qlm_opt.core.runtime import Runtime
    from qlm_opt.hosts.simulated import Simulator

    rule = rule or FeedRule()
    sim = Simulator()
    rt = Runtime(fleet, sim)
    for inst in rt.instances:
        inst.engine.set_waker(sim.engine_waker)
    policy = make_policy(policy_name, workload=workload, fleet=fleet, **(policy_options or {}))
    if hasattr(policy, "make_deterministic"):
        policy.make_deterministic()
    rt.bind(policy)
    rng = np.random.default_rng(seed + 104_729)
    next_id = max((r.id for r in traffic), default=-1) + 1
    feeders: list[_Feeder] = []
    all_lines: list[Request] = []
    waiting: dict[int, Request] = {}  # urgent requests without a first token
    by_id: dict[int, _Feeder] = {}

    def admit(req: Request) -> None:
        rt.accept(req)
        policy.on_arrival(req)

    for i, job in enumerate(workload.data.batch_jobs):
        lines = job_requests(job, i, workload, next_id, rng)
        next_id += len(lines)
        all_lines.extend(lines)
        prio = workload.classes[job.slo_class].priority
        limits = {n: c.ttft_s for n, c in workload.classes.items() if c.priority < prio}
        end_at = job.submit_at_s + window_s(job.window)
        f = _Feeder(lines, job.submit_at_s, end_at, rule, sim, admit,
                    lambda now, lim=limits: rule.urgent_ok(now, waiting.values(), lim))
        feeders.append(f)
        for r in lines:
            by_id[r.id] = f
        sim.call_at(job.submit_at_s, f.pump)

        def expire(f=f) -> None:
            f.ended = True
            for req in list(f.inflight.values()):
                if not req.is_done:
                    rt.cancel(req, "batch_expired")
            f.inflight.clear()

        sim.call_at(end_at, expire)

    def first_token(req: Request) -> None:
        waiting.pop(req.id, None)

    def ended(req: Request) -> None:
        waiting.pop(req.id, None)
        f = by_id.get(req.id)
        if f is not None:
            f.ended_line(req)

    rt.first_token_hooks.append(first_token)
    rt.finish_hooks.append(ended)
    rt.drop_hooks.append(ended)

    def arrive(req: Request) -> None:
        if req.first_token_at is None:
            waiting[req.id] = req
        admit(req)

    def active() -> bool:
        return (sim.arrivals_left > 0 or rt.num_outstanding > 0
                or any(f.left for f in feeders))

    if policy.epoch_s:
        def epoch() -> None:
            policy.on_epoch()
            if active():
                sim.call_at(sim.now() + policy.epoch_s, epoch)

        sim.call_at(0.0, epoch)
    last_at = max([traffic[-1].arrived_at if traffic else 0.0]
                  + [j.submit_at_s + window_s(j.window) for j in workload.data.batch_jobs])
    sim.run(traffic, arrive, until_at=last_at + drain_s)
    for r in traffic:
        if not r.is_done:
            r.state = RequestState.DROPPED
            r.drop_reason = "unfinished_at_horizon"
    for r in all_lines:
        if not r.is_done:  # never fed, or still running at the horizon
            r.state = RequestState.DROPPED
            r.drop_reason = "batch_expired"
    return traffic + all_lines
