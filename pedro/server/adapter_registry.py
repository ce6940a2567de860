"""The server's adapter registry on disk: which tenant owns which adapter, crash-safe (the engine's in-memory
set of loaded adapters is pedro.engine.adapters.AdapterStore; PEFT method registration is pedro.peft_method).

Layout under ``adapters_dir``::

    registry.json            the index: the only source of truth for what is registered
    store/<tenant>/<name>/   adapter_config.json + adapter_model.safetensors of each registered adapter
    .staging/                uploads being received and checked

An adapter becomes registered in two atomic steps: its checked staging directory is renamed into ``store/``,
then the index is rewritten (temp file, fsync, ``os.replace``). A crash between or before them leaves a
directory the index does not name; :meth:`AdapterRegistry.open` deletes those and empties ``.staging``, so a
half-written upload never appears after a restart. Removal rewrites the index first, then deletes the files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from pedro.server.auth import check_name

log = logging.getLogger("pedro.server")

INDEX_NAME = "registry.json"
INDEX_VERSION = 1


@dataclass(frozen=True)
class AdapterRecord:
    tenant: str
    name: str
    kind: str
    parameters: int
    bytes: int
    created: int
    version: str

    @property
    def qualified_name(self) -> str:
        """How the admin names it in the API."""
        return f"{self.tenant}:{self.name}"

    @property
    def engine_name(self) -> str:
        """The adapter's name inside the engine (and its multiplexed model id on Ray): tenants' names never
        collide, and a deleted-then-re-registered name gets a new version, so no replica can mistake the new
        adapter for an old one it still knows."""
        return f"{self.qualified_name}@{self.version}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdapterRegistry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.store = self.root / "store"
        self.staging_root = self.root / ".staging"
        self.index = self.root / INDEX_NAME
        self._records: dict[tuple[str, str], AdapterRecord] = {}

    # ------------------------------------------------------------------------------------------ start-up

    def open(self) -> list[AdapterRecord]:
        """Load the index and clean up what a crash may have left; -> the registered adapters."""
        self.store.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.staging_root, ignore_errors=True)
        self.staging_root.mkdir()
        records: list[AdapterRecord] = []
        if self.index.is_file():
            try:
                data = json.loads(self.index.read_text())
                records = [AdapterRecord(**item) for item in data["adapters"]]
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"the adapter registry {self.index} is unreadable: {err}") from err
        # an indexed adapter whose folder is gone is kept (never a crash's doing: a delete rewrites the index first):
        # it fails its checks at start-up, so its owner is told so (409) instead of finding the name gone
        self._records = {(record.tenant, record.name): record for record in records}
        for tenant_dir in self.store.iterdir():
            for adapter_dir in tenant_dir.iterdir() if tenant_dir.is_dir() else [tenant_dir]:
                if (tenant_dir.name, adapter_dir.name) not in self._records:
                    log.warning("removing %s: not in the registry (an interrupted registration)", adapter_dir)
                    shutil.rmtree(adapter_dir) if adapter_dir.is_dir() else adapter_dir.unlink()
        if len(self._records) != len(records):
            self._write_index()
        return list(self._records.values())

    # ------------------------------------------------------------------------------------------ queries

    def path(self, tenant: str, name: str) -> Path:
        return self.store / check_name("tenant", tenant) / check_name("adapter", name)

    def get(self, tenant: str, name: str) -> Optional[AdapterRecord]:
        return self._records.get((tenant, name))

    def records(self, tenant: Optional[str] = None) -> list[AdapterRecord]:
        return [r for r in self._records.values() if tenant is None or r.tenant == tenant]

    # ------------------------------------------------------------------------------------------ changes

    def new_staging(self) -> Path:
        """A fresh directory for an upload, on the same filesystem as the store (so commit is a rename)."""
        return Path(tempfile.mkdtemp(dir=self.staging_root))

    def commit(self, staged: Path, tenant: str, name: str, kind: str, parameters: int, size: int) -> AdapterRecord:
        """Move a checked staging directory into the store and record it in the index."""
        final = self.path(tenant, name)
        if final.exists() or (tenant, name) in self._records:
            raise FileExistsError(f"adapter {name!r} is already registered")
        final.parent.mkdir(exist_ok=True)
        os.rename(staged, final)
        _fsync_dir(final.parent)
        record = AdapterRecord(tenant, name, kind, parameters, size, int(time.time()), uuid.uuid4().hex[:12])
        self._records[(tenant, name)] = record
        try:
            self._write_index()
        except OSError:
            del self._records[(tenant, name)]
            shutil.rmtree(final, ignore_errors=True)
            raise
        return record

    def remove(self, tenant: str, name: str) -> None:
        self._records.pop((tenant, name))
        self._write_index()
        shutil.rmtree(self.path(tenant, name), ignore_errors=True)

    def _write_index(self) -> None:
        data = {"version": INDEX_VERSION, "adapters": [asdict(r) for r in self._records.values()]}
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{INDEX_NAME}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(data, handle, indent=1)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.index)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.root)
