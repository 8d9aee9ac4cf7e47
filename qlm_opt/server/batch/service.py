"""The Batch API's parts for one app: store, file storage, runner and metrics.

``BatchService(settings, gateway, registry)`` builds them when the app is built (no I/O).
``start()``, after the gateway has started, opens the store (applying schema migrations) and
resumes unfinished jobs; a SQLite store that does not exist yet is created only by the first
Batch API request (``ready()``), so a server that never sees a batch writes nothing.
``stop()`` stops the runner and closes the store, before the gateway stops.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry

from qlm_opt.server.batch.files import FileStorage
from qlm_opt.server.batch.metrics import BatchMetrics
from qlm_opt.server.batch.runner import BatchRunner
from qlm_opt.server.batch.store import BatchStore, database_url
from qlm_opt.server.gateway import Gateway
from qlm_opt.server.settings import ServerSettings

log = logging.getLogger(__name__)


class BatchService:
    """See the module docstring."""

    def __init__(self, settings: ServerSettings, gateway: Gateway,
                 registry: CollectorRegistry) -> None:
        cfg = settings.batch
        self.settings = settings
        self.gateway = gateway
        self.store = BatchStore(database_url(cfg.store_url, cfg.sqlite_path))
        self.storage = FileStorage(cfg.files_dir)
        self.metrics = BatchMetrics(registry)
        self.runner = BatchRunner(settings, self.store, self.storage, gateway, self.metrics)
        self._open = False
        self._lock = asyncio.Lock()

    def known_model(self, model: str) -> bool:
        """True when the fleet serves ``model`` (now or after a swap)."""
        try:
            self.gateway.backend.max_context(model)
        except KeyError:
            return False
        return True

    async def start(self) -> None:
        if self.store.exists():
            await self.ready()

    async def ready(self) -> None:
        """Open the store and start the runner, once."""
        if self._open:
            return
        async with self._lock:
            if self._open:
                return
            self.storage.ensure()
            await self.store.open()
            log.info("batch store: %s (schema version %d), files in %s", self.store.dialect,
                     await self.store.schema_version(), self.storage.dir)
            await self.runner.start()
            self._open = True

    async def stop(self) -> None:
        if not self._open:
            return
        try:
            await self.runner.stop()
        finally:
            await self.store.close()
