"""The scheduler core, the same under both clocks: the global queue (``queue``), the RWT
estimator (``estimator``), the policy interface (``policy``), the runtime that owns the fleet's
engines (``runtime``) and the executor, the one place that turns decisions into LSOs
(``executor``)."""
