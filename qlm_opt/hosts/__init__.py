"""The two hosts of the runtime: ``simulated`` (a discrete-event simulator on a virtual clock,
for what-if runs) and ``live`` (the asyncio event loop on the wall clock, for serving)."""
