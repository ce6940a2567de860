"""API keys -> tenants.

Keys come from a YAML keys file and/or the environment::

    # keys.yaml
    tenants:
      alice: [sk-alice-1]
      bob: [sk-bob-1, sk-bob-2]
    admin: [sk-admin]

    PEDRO_API_KEYS="alice=sk-alice-1,bob=sk-bob-1"   PEDRO_ADMIN_KEYS="sk-admin"

Only SHA-256 digests of the keys are kept in memory, so a key never sits in a dict where a crash dump or a debug
print would show it, and lookups compare digests, not the secrets. With no key configured at all the server runs
open (one tenant, ``default``, with admin rights): meant for a single user on loopback, and logged loudly.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import yaml

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SAFE_NAME_RULE = "1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
ADMIN_TENANT = "admin"
OPEN_TENANT = "default"


def check_name(kind: str, name: str) -> str:
    """Refuse anything that could escape a directory or confuse a path (``..``, ``/``, ``:``, empty)."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"invalid {kind} name {name!r}: use {SAFE_NAME_RULE} (no '..')")
    return name


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant, and whether it may act on every tenant's adapters."""

    tenant: str
    admin: bool = False


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """Resolves the ``Authorization: Bearer <key>`` of a request to a Principal (or None: 401); the scheme
    is matched case-insensitively (``bearer``, ``BEARER``)."""

    def __init__(self, tenants: Mapping[str, list[str]], admin_keys: list[str]) -> None:
        self._principals: dict[str, Principal] = {}
        for tenant, keys in tenants.items():
            check_name("tenant", tenant)
            if tenant == ADMIN_TENANT:
                raise ValueError(f"tenant name {ADMIN_TENANT!r} is reserved for admin keys")
            for key in keys:
                self._add(key, Principal(tenant))
        for key in admin_keys:
            self._add(key, Principal(ADMIN_TENANT, admin=True))

    def _add(self, key: str, principal: Principal) -> None:
        if not isinstance(key, str) or len(key) < 8:
            raise ValueError(f"API keys must be strings of at least 8 characters (tenant {principal.tenant!r})")
        digest = _digest(key)
        if digest in self._principals and self._principals[digest] != principal:
            raise ValueError(
                f"an API key is given to two tenants ({self._principals[digest].tenant!r}, {principal.tenant!r})"
            )
        self._principals[digest] = principal

    @property
    def open(self) -> bool:
        return not self._principals

    def resolve(self, authorization: Optional[str]) -> Optional[Principal]:
        if self.open:
            return Principal(OPEN_TENANT, admin=True)
        scheme, _, credentials = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():  # auth schemes are case-insensitive (RFC 7235)
            return None
        return self._principals.get(_digest(credentials.strip()))

    @classmethod
    def load(cls, keys_file: Optional[Path], environ: Mapping[str, str] = os.environ) -> "KeyRing":
        """Keys from ``keys_file`` plus ``PEDRO_API_KEYS`` / ``PEDRO_ADMIN_KEYS``; ValueError on a bad file."""
        tenants: dict[str, list[str]] = {}
        admin: list[str] = []
        if keys_file is not None:
            try:
                data = yaml.safe_load(Path(keys_file).read_text()) or {}
            except (OSError, yaml.YAMLError) as err:
                raise ValueError(f"cannot read the keys file {keys_file}: {err}") from err
            if not isinstance(data, dict) or set(data) - {"tenants", "admin"}:
                raise ValueError(f"the keys file {keys_file} must be a mapping with 'tenants' and/or 'admin'")
            for tenant, keys in (data.get("tenants") or {}).items():
                tenants.setdefault(str(tenant), []).extend([keys] if isinstance(keys, str) else list(keys or []))
            admin.extend([data["admin"]] if isinstance(data.get("admin"), str) else list(data.get("admin") or []))
        for pair in filter(None, environ.get("PEDRO_API_KEYS", "").split(",")):
            tenant, sep, key = pair.strip().partition("=")
            if not sep:
                raise ValueError("PEDRO_API_KEYS must look like 'tenant=key,tenant=key'")
            tenants.setdefault(tenant, []).append(key)
        admin.extend(k.strip() for k in environ.get("PEDRO_ADMIN_KEYS", "").split(",") if k.strip())
        return cls(tenants, admin)
