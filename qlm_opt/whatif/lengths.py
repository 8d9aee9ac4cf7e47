"""Synthetic request lengths: (prompt, output) token counts from a workload's ``[lengths]``
section (one lognormal each, or a weighted mixture of them). Shared by the synthetic traces
(``workload.py``) and the Batch API jobs of a what-if run (``batch_jobs.py``)."""
from __future__ import annotations

import numpy as np


def sample_lengths(L, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (prompt, output) token counts from a ``[lengths]`` section: one lognormal each,
    clipped to its min/max; with a ``mixture``, each row's component is drawn by weight first,
    then every component's rows are drawn together (prompts, then outputs)."""
    if L.mixture is None:
        pr = np.clip(np.rint(rng.lognormal(L.prompt_log_mu, L.prompt_log_sigma, n)),
                     L.prompt_min, L.prompt_max).astype(np.int64)
        out = np.clip(np.rint(rng.lognormal(L.output_log_mu, L.output_log_sigma, n)),
                      L.output_min, L.output_max).astype(np.int64)
        return pr, out
    comps = L.components()
    which = rng.choice(len(comps), size=n, p=np.asarray(L.weights()))
    pr = np.empty(n, dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    for i, c in enumerate(comps):
        rows = np.flatnonzero(which == i)
        pr[rows], out[rows] = sample_lengths(c, rng, len(rows))
    return pr, out
