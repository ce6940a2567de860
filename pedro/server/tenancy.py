"""Which adapters a caller may see, use and manage, and the register / delete flows that enforce it.

A tenant's adapters live in its own namespace: ``model="support-bot"`` from tenant ``alice`` means
``alice:support-bot`` in the engine, so two tenants may use the same name and neither can reach the other's.
The admin key addresses any adapter as ``tenant:name``. An adapter a caller may not see is reported exactly
like one that does not exist (404), so probing never reveals another tenant's names.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Optional

from pedro.server.adapter_registry import AdapterRecord, AdapterRegistry
from pedro.server.auth import Principal, check_name
from pedro.server.backend import Backend
from pedro.server.config import ServerConfig
from pedro.server.errors import APIError, not_found
from pedro.server.validate import ADAPTER_FILES

log = logging.getLogger("pedro.server")


class TenantAdapters:
    def __init__(self, registry: AdapterRegistry, backend: Backend, config: ServerConfig) -> None:
        self.registry, self.backend, self.config = registry, backend, config
        self._lock = asyncio.Lock()  # one registration / removal at a time: name checks and commits stay consistent
        self.unavailable: dict[str, str] = {}  # engine name -> why it failed its checks at start-up

    async def restore(self) -> int:
        """Register every adapter of the on-disk registry with the engine (server start-up), each checked again
        exactly as an upload is. One that no longer passes (a stricter server, another backbone) does not stop
        the server for everyone: it stays listed, answers 409 ``adapter_unavailable`` naming why, and can be
        deleted. -> how many were restored."""
        records = self.registry.open()
        for record in records:
            directory = self.registry.path(record.tenant, record.name)
            if not directory.is_dir():
                self.unavailable[record.engine_name] = "its files are gone from the server's adapters directory"
                log.error(
                    "registered adapter %s is unavailable: its folder %s is gone", record.qualified_name, directory
                )
                continue
            try:
                await self.backend.check(directory)
                await self.backend.add_adapter(record.engine_name, directory)
            except APIError as err:
                self.unavailable[record.engine_name] = err.message
                log.error("registered adapter %s is unavailable: %s", record.qualified_name, err.message)
        return len(records) - len(self.unavailable)

    # ------------------------------------------------------------------------------------------ lookup

    def resolve(self, principal: Principal, model: str) -> Optional[AdapterRecord]:
        """The adapter a request's ``model`` names (None: the base model), or 404."""
        if model == self.config.served_model_name:
            return None
        tenant, sep, name = model.rpartition(":")
        if not sep:
            tenant = principal.tenant
        elif not principal.admin:
            raise not_found(model)
        record = self.registry.get(tenant, name)
        if record is None:
            raise not_found(model)
        return record

    def usable(self, principal: Principal, model: str) -> Optional[AdapterRecord]:
        """``resolve``, and 409 for an adapter that failed its checks when the server started."""
        record = self.resolve(principal, model)
        if record is not None and record.engine_name in self.unavailable:
            raise APIError(
                409,
                f"adapter {model!r} failed its checks when the server started ({self.unavailable[record.engine_name]}); "
                "delete it and upload it again",
                code="adapter_unavailable",
                param="model",
            )
        return record

    def visible(self, principal: Principal) -> list[AdapterRecord]:
        return self.registry.records(None if principal.admin else principal.tenant)

    def display_name(self, principal: Principal, record: AdapterRecord) -> str:
        """How the caller names this adapter in ``model``: its bare name, or ``tenant:name`` for another tenant's."""
        return record.name if record.tenant == principal.tenant else record.qualified_name

    # ------------------------------------------------------------------------------------------ changes

    def _owner(self, principal: Principal, tenant: Optional[str]) -> str:
        if tenant is None or tenant == principal.tenant:
            return principal.tenant
        if not principal.admin:
            raise APIError(403, "only an admin key may manage another tenant's adapters", param="tenant")
        try:
            return check_name("tenant", tenant)
        except ValueError as err:
            raise APIError(400, str(err), param="tenant") from None

    def _check_new_name(self, name: Optional[str]) -> str:
        if not name:
            raise APIError(400, "give the adapter a name (form field or JSON key 'name')", param="name")
        try:
            check_name("adapter", name)
        except ValueError as err:
            raise APIError(400, str(err), param="name") from None
        if name == self.config.served_model_name:
            raise APIError(400, f"{name!r} is the base model's name; choose another", param="name")
        return name

    async def register(
        self, principal: Principal, name: Optional[str], tenant: Optional[str], staged: Path
    ) -> AdapterRecord:
        """Check the adapter files in ``staged`` and, only if every check passes, store and serve them."""
        owner = self._owner(principal, tenant)
        name = self._check_new_name(name)
        async with self._lock:
            if self.registry.get(owner, name) is not None:
                raise APIError(
                    409, f"adapter {name!r} already exists; delete it first", code="adapter_exists", param="name"
                )
            if len(self.registry.records(owner)) >= self.config.max_adapters_per_tenant:
                # 403, not 429: waiting never frees a slot, and clients retry a 429 on their own
                raise APIError(
                    403,
                    f"tenant {owner!r} has reached its limit of {self.config.max_adapters_per_tenant} adapters; "
                    "delete one to register another",
                    code="adapter_quota",
                )
            info = await self.backend.check(staged)
            record = self.registry.commit(staged, owner, name, info["kind"], info["parameters"], info["bytes"])
            try:
                await self.backend.add_adapter(record.engine_name, self.registry.path(owner, name))
            except BaseException:
                self.registry.remove(owner, name)
                raise
        log.info("registered adapter %s (%s, %d parameters)", record.qualified_name, record.kind, record.parameters)
        return record

    def stage_from_path(self, principal: Principal, source: str, staged: Path) -> None:
        """Copy a server-side adapter directory into ``staged`` (admin only: a path reads the server's disk)."""
        if not principal.admin:
            raise APIError(
                403, "registering from a server-side path needs an admin key; tenants upload files", param="path"
            )
        directory = Path(source)
        if not directory.is_absolute() or not directory.is_dir():
            raise APIError(400, f"path {source!r} is not an absolute path to a directory on the server", param="path")
        for file in ADAPTER_FILES:
            path = directory / file
            if not path.is_file():
                raise APIError(
                    400,
                    f"{directory} has no {file} (safetensors only; pickle checkpoints are never loaded)",
                    param="path",
                )
            if path.stat().st_size > self.config.max_upload_bytes:
                raise APIError(
                    413,
                    f"{path} is larger than the limit of {self.config.max_upload_bytes} bytes",
                    code="upload_too_large",
                )
            shutil.copyfile(path, staged / file)

    async def delete(self, principal: Principal, ref: str, param: str = "name") -> AdapterRecord:
        """Remove the adapter ``ref`` names; errors name ``param``, the path's field that named it."""
        async with self._lock:
            try:
                record = self.resolve(principal, ref)
            except APIError as err:  # the name at fault is the path's, not a request's model
                err.param = param
                raise
            if record is None:
                raise APIError(400, "the base model cannot be deleted", param=param)
            if self.unavailable.pop(record.engine_name, None) is None:
                try:
                    await self.backend.remove_adapter(record.engine_name)
                except APIError as err:  # the engine names its own versioned name: say the caller's
                    if err.code != "adapter_in_use":
                        raise
                    raise APIError(
                        409,
                        f"cannot remove the adapter now: {record.name!r} is in use by running or waiting requests",
                        code="adapter_in_use",
                    ) from None
            self.registry.remove(record.tenant, record.name)
        log.info("removed adapter %s", record.qualified_name)
        return record
