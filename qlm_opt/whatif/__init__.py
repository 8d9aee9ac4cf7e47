"""What-if runs: workloads and traces (``workload``), Batch API jobs (``batch_jobs``), a run of
policies over them (``run``), its summary (``summary``), table (``table``) and plots
(``plots``), the attainment upper bound (``bound``) and the capacity search (``capacity``)."""
