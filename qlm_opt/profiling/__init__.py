"""Measuring real engines: the profiler that records a vLLM engine's steps and fits the
engine model's calibration to them (``profiler``; the calibration data and fits are
``engines.calibration``), the catalog and fleet of a device outside the GPU table
(``devices``) and the tiny local model the tests and the CPU profile use (``tinymodel``)."""
