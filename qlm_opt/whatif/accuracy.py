"""How well the RWT estimator predicted waits in a what-if run: every policy's admission and
dispatch predictions against the waits observed (``RWTAccuracy``, fed by ``RWTTracker``
through the runtime's hooks), reported per class in ``report.json``."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qlm_opt.core.estimator import RWTEstimator
from qlm_opt.core.queue import SchedInfo
from qlm_opt.core.wait_calibration import Z90, WaitCalibrator, WaitEstimate
from qlm_opt.domain import Request, RequestState


@dataclass(slots=True)
class AccuracyRecord:
    slo_class: str
    placed_at: float
    mean_s: float
    std_s: float
    raw: WaitEstimate | None = None  # the model's estimate before calibration
    calib: WaitCalibrator | None = None  # fed (raw, observed) at the first token
    key: object = None  # calibration cell key
    # a second calibrator fed (its input, observed) at the first token: the one that set
    # the scored mean, when it is not ``calib`` (``RWTTracker.on_predict``)
    center_calib: WaitCalibrator | None = None
    center_raw: WaitEstimate | None = None


@dataclass(slots=True)
class RWTAccuracy:
    """Predicted vs observed waiting time of requests.

    Definition: the scored prediction of a request is its *admission* prediction, the first
    one made for it: by a global-queue policy when it first places the request in an
    instance's virtual queue (reported through ``Runtime.predict_hooks``), or, for policies
    without their own predictions, by the observer when the request is first dispatched into
    an engine's queue. Observed wait = first_token_at - admission time. It stays the scored
    one whatever happens afterwards: re-placement, late lane, eviction, swap, engine failure
    and re-queue. The *dispatch* prediction (the latest one in force when the request last
    entered an engine before its first token, measured from that moment) is reported beside
    it (``dispatch_*``), for the same requests.
    """

    records: dict[int, AccuracyRecord] = field(default_factory=dict)  # admission, by req id
    dispatch: dict[int, AccuracyRecord] = field(default_factory=dict)  # latest dispatch
    pairs: list[tuple[str, float, float, float]] = field(default_factory=list)
    # (class, predicted mean s, predicted std s, observed s): admission predictions
    dispatch_pairs: list[tuple[str, float, float, float]] = field(default_factory=list)
    # the same requests' dispatch predictions (one per entry of ``pairs``, same order)

    def predict(self, req: Request, placed_at: float, est: WaitEstimate,
                raw: WaitEstimate | None = None, calib: WaitCalibrator | None = None,
                key=None, center: tuple[WaitCalibrator, WaitEstimate] | None = None) -> None:
        """An admission prediction: kept only when it is the request's first. ``center``:
        (calibrator, its input) that set the mean, fed at the first token too."""
        if req.first_token_at is not None or req.id in self.records:
            return
        rec = AccuracyRecord(req.slo_class, placed_at, est.mean_s, est.std_s, raw, calib, key)
        if center is not None:
            rec.center_calib, rec.center_raw = center
        self.records[req.id] = rec

    def predict_dispatch(self, req: Request, placed_at: float, est: WaitEstimate,
                         raw: WaitEstimate | None = None, calib: WaitCalibrator | None = None,
                         key=None) -> None:
        """The prediction in force when ``req`` entered an engine (replaces earlier ones);
        also the admission prediction when none was made before."""
        if req.first_token_at is not None:
            return
        rec = AccuracyRecord(req.slo_class, placed_at, est.mean_s, est.std_s, raw, calib, key)
        self.dispatch[req.id] = rec
        if req.id not in self.records:
            self.records[req.id] = rec

    def observe_first_token(self, req: Request) -> None:
        rec = self.records.pop(req.id, None)
        disp = self.dispatch.pop(req.id, None)
        if rec is None or req.first_token_at is None:
            return
        obs = req.first_token_at - rec.placed_at
        self.pairs.append((rec.slo_class, rec.mean_s, rec.std_s, obs))
        d = disp if disp is not None else rec
        self.dispatch_pairs.append((d.slo_class, d.mean_s, d.std_s,
                                    req.first_token_at - d.placed_at))
        # each calibrator learns from the prediction it adjusted
        for r in (rec, disp) if disp is not rec else (rec,):
            if r is not None and r.calib is not None and r.raw is not None:
                r.calib.observe(r.key, r.raw.mean_s, r.raw.std_s,
                                req.first_token_at - r.placed_at, req.id)
        if rec.center_calib is not None:
            rec.center_calib.observe(rec.key, rec.center_raw.mean_s, rec.center_raw.std_s,
                                     obs, req.id)

    def forget(self, req: Request) -> None:
        """``req`` was dropped before its first token: it is not scored, and a censored
        calibrator stops counting it as still waiting."""
        self.dispatch.pop(req.id, None)
        rec = self.records.pop(req.id, None)
        if rec is not None and rec.calib is not None and rec.raw is not None:
            rec.calib.forget(rec.key, req.id, rec.raw.mean_s)
        if rec is not None and rec.center_calib is not None:
            rec.center_calib.forget(rec.key, req.id, rec.center_raw.mean_s)

    @staticmethod
    def _stats(rows) -> dict:
        if not rows:
            return {"median_abs_pct_error": None, "coverage_90": None, "num": 0}
        a = np.array([(m, s, o) for _, m, s, o in rows], dtype=float)
        m, s, o = a[:, 0], a[:, 1], a[:, 2]
        ape = np.abs(m - o) / np.maximum(o, 1e-3) * 100.0
        inside = (o >= m - Z90 * s) & (o <= m + Z90 * s)
        return {
            "median_abs_pct_error": float(np.median(ape)),
            "coverage_90": float(inside.mean()),
            "num": len(rows),
            "observed_p50_s": float(np.median(o)),
            "predicted_p50_s": float(np.median(m)),
        }

    def summary(self) -> dict:
        """``median_abs_pct_error`` (%), ``coverage_90`` (fraction of observed waits inside
        mean +- 1.645 std), ``num``, of admission predictions; ``dispatch_*`` the same for
        dispatch predictions; overall and ``per_class``."""

        def both(idx) -> dict:
            out = self._stats([self.pairs[i] for i in idx])
            d = self._stats([self.dispatch_pairs[i] for i in idx])
            out["dispatch_median_abs_pct_error"] = d["median_abs_pct_error"]
            out["dispatch_coverage_90"] = d["coverage_90"]
            return out

        out = both(range(len(self.pairs)))
        classes = sorted({c for c, *_ in self.pairs})
        out["per_class"] = {c: both([i for i, r in enumerate(self.pairs) if r[0] == c])
                            for c in classes}
        return out


class RWTTracker:
    """Observer that records predicted vs observed waits for any policy (see
    ``RWTAccuracy``). Attached to a ``Runtime`` through its hooks; it owns an estimator
    calibrated from the run's completions. Policies that make their own predictions leave
    them on ``Request._sched`` (``placed_at``, ``pred_mean_s``, ``pred_std_s``), and those win.
    """

    def __init__(self, rt, workload, estimator: RWTEstimator | None = None) -> None:
        from qlm_opt.core.queue import length_bucket

        self.rt = rt
        im_of = rt.iteration_model

        self.iter_model_of = im_of
        self.est = estimator or RWTEstimator.from_workload(workload, iter_model_of=im_of)
        self.acc = RWTAccuracy()
        # Policies' admission predictions, recalibrated online (split-conformal, per class
        # and band) from earlier admission predictions and their outcomes, the ones still
        # waiting counted as censored in the interval: a policy's own calibration learns
        # from its latest placement, not from admission. This sets the interval's width.
        self.admission_calib = WaitCalibrator(censored=True)
        # The scored mean, where the policy reports its model's estimate before its own
        # calibration: that estimate, times a bias factor (per class and band, from earlier
        # admission predictions) only while the factor has done better than none
        # (``WaitCalibrator(check_bias=True)``).
        self.admission_center = WaitCalibrator(check_bias=True)
        self.bucket_of = lambda r: length_bucket(r.prompt_tokens)
        # instance id -> sorted [(priority, req id, req)] believed waiting in the engine
        self._mirror: dict[int, list[tuple]] = {}
        self._mirror_prompt: dict[int, int] = {}
        rt.submit_hooks.append(self.on_submit)
        rt.predict_hooks.append(self.on_predict)
        rt.first_token_hooks.append(self.acc.observe_first_token)
        rt.finish_hooks.append(self.on_finish)
        rt.drop_hooks.append(self.acc.forget)

    def on_finish(self, req: Request) -> None:
        self.est.observe_completion(req, self.bucket_of(req))

    def on_predict(self, req: Request, at: float, est: WaitEstimate,
                   raw: WaitEstimate | None = None) -> None:
        """A policy predicted ``req``'s wait (placement): the first one is the admission
        prediction, reported as recalibrated now by ``admission_calib``. ``raw`` (the
        policy's model estimate before its own calibration, when it gives one): the mean is
        ``admission_center``'s of it instead, the interval's half-width
        ``admission_calib``'s."""
        if req.first_token_at is not None or req.id in self.acc.records:
            return
        cal = self.admission_calib
        key = req.slo_class
        scored = cal.adjust(key, est, at)
        center = None
        if raw is not None:
            cc = self.admission_center
            scored = WaitEstimate(cc.adjust(key, raw).mean_s, scored.std_s)
            cc.admit(key, req.id, raw.mean_s, raw.std_s, at)
            center = (cc, raw)
        self.acc.predict(req, at, scored, est, cal, key, center)
        cal.admit(key, req.id, est.mean_s, est.std_s, at)

    def on_submit(self, req: Request, inst, priority: tuple) -> None:
        import bisect

        now = self.rt.now()
        info = req._sched
        pm = info.pred_mean_s if isinstance(info, SchedInfo) else None
        if pm is not None and info.placed_at is not None:
            self.acc.predict_dispatch(req, info.placed_at,
                                      WaitEstimate(pm, info.pred_std_s or 0.0))
            return
        if req.first_token_at is not None:
            return
        mirror = self._mirror.setdefault(inst.id, [])
        prompt = self._mirror_prompt.get(inst.id, 0)
        # Engines admit in priority order: entries that left the waiting queue sit in front.
        drop = 0
        while drop < len(mirror):
            r = mirror[drop][2]
            if r.state == RequestState.WAITING and r.instance_id == inst.id:
                break
            prompt -= r.prompt_tokens
            drop += 1
        if drop:
            del mirror[:drop]
        entry = (priority, req.id, req)
        k = bisect.bisect_left(mirror, entry[:2])
        ahead_prompt = prompt * k / len(mirror) if mirror else 0.0
        self.est.observe_engine(inst)
        raw = self.est.wait_raw(inst, now, float(k), ahead_prompt, req.prompt_tokens,
                                self.bucket_of)
        key = req.slo_class
        est = self.est.calib.adjust(key, raw)
        self.acc.predict_dispatch(req, now, est, raw, self.est.calib, key)
        if req.state == RequestState.WAITING:
            mirror.insert(k, entry)
            prompt += req.prompt_tokens
        self._mirror_prompt[inst.id] = prompt

    def report(self) -> dict:
        out = self.acc.summary()
        out["output_length"] = self.est.out_model.report()
        return out
