"""OpenAI's Batch API: files and batch jobs, persisted, whose lines are scheduled through the
global queue against their completion window. See ``runner`` for how lines are fed, ``store``
for the database and ``routes`` for the HTTP side."""

from qlm_opt.server.batch.routes import batches_router, files_router
from qlm_opt.server.batch.service import BatchService

__all__ = ["BatchService", "batches_router", "files_router"]
