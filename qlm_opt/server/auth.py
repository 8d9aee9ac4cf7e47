"""API keys, tenants and per-key rate limits.

Keys come from ``server.toml`` (``[[auth.keys]]``, literally or through ``key_env``) and from
``$QLM_API_KEYS``. A presented key is hashed (SHA-256) to find its candidate, and the digests
are then compared with ``hmac.compare_digest``, so the time taken does not depend on how many
leading characters of a key match. Unknown keys cost the same comparison against a dummy.

Rate limits are token buckets per key, counted in requests: ``rate_per_s`` refill and ``burst``
capacity. An empty bucket answers 429 with ``Retry-After``.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from qlm_opt.errors import ConfigError
from qlm_opt.server.errors import APIError
from qlm_opt.server.settings import ServerSettings

_DUMMY = hashlib.sha256(b"qlm-opt: no such key").digest()


class TokenBucket:
    """Requests per second with a burst; ``now`` is monotonic seconds."""

    __slots__ = ("rate_per_s", "capacity", "tokens", "updated_at", "_now")

    def __init__(self, rate_per_s: float, capacity: float, now: Callable[[], float]) -> None:
        self.rate_per_s = rate_per_s
        self.capacity = capacity
        self.tokens = capacity
        self._now = now
        self.updated_at = now()

    def take(self) -> float:
        """Take one token. Returns 0.0 on success, else the seconds until one is available."""
        now = self._now()
        tokens = self.tokens + (now - self.updated_at) * self.rate_per_s
        if tokens > self.capacity:
            tokens = self.capacity
        self.updated_at = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / self.rate_per_s


@dataclass(slots=True)
class Principal:
    """Who sent a request: the key's tenant, default SLO class and rate limit."""

    tenant: str
    default_class: str
    classes: frozenset[str] | None = None  # allowed classes (None: all)
    bucket: TokenBucket | None = None
    is_admin: bool = False
    name: str = field(default="")  # a key's non-secret label for logs: tenant#index
    digest: bytes = b""  # sha256 of the key

    def check_rate(self) -> None:
        if self.bucket is not None:
            wait = self.bucket.take()
            if wait > 0.0:
                raise APIError(
                    429,
                    f"rate limit exceeded for tenant '{self.tenant}'",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _bucket(rate: float | None, burst: int | None, now) -> TokenBucket | None:
    if rate is None:
        return None
    return TokenBucket(rate, float(burst or max(1, math.ceil(2 * rate))), now)


class KeyStore:
    """Looks up API keys; see the module docstring."""

    def __init__(
        self,
        principals: dict[bytes, Principal],
        admin_digest: bytes | None,
        anonymous: Principal | None,
    ) -> None:
        self._by_digest = principals  # sha256(key) -> principal
        self._admin = admin_digest
        self.anonymous = anonymous  # None unless auth.allow_unauthenticated

    @property
    def num_keys(self) -> int:
        return len(self._by_digest)

    @classmethod
    def from_settings(
        cls,
        settings: ServerSettings,
        env: Mapping[str, str],
        now: Callable[[], float] = time.monotonic,
    ) -> KeyStore:
        a = settings.auth
        out: dict[bytes, Principal] = {}

        def add(key: str, tenant: str, cls_name: str | None, allowed, rate, burst, where) -> None:
            if len(key) < 8:
                raise ConfigError(f"{where}: API keys must be at least 8 characters")
            default = cls_name or settings.default_class
            if default not in settings.classes:
                raise ConfigError(f"{where}: unknown class '{default}'")
            d = _digest(key)
            if d in out:
                raise ConfigError(f"{where}: duplicate API key")
            out[d] = Principal(
                tenant=tenant,
                default_class=default,
                classes=frozenset(allowed) if allowed else None,
                bucket=_bucket(rate, burst, now),
                name=f"{tenant}#{len(out)}",
                digest=d,
            )

        for i, k in enumerate(a.keys):
            key = k.key
            if k.key_env is not None:
                key = env.get(k.key_env)
                if not key:
                    raise ConfigError(
                        f"field 'auth.keys.{i}.key_env': environment variable "
                        f"{k.key_env} is not set"
                    )
            add(key, k.tenant, k.default_class, k.classes, k.rate_per_s, k.burst,
                f"field 'auth.keys.{i}'")
        for j, entry in enumerate(x.strip() for x in env.get(a.keys_env, "").split(",")):
            if not entry:
                continue
            parts = entry.split(":")
            if len(parts) > 4:
                raise ConfigError(f"${a.keys_env} entry {j}: expected key[:tenant[:class[:rate]]]")
            key = parts[0]
            tenant = parts[1] if len(parts) > 1 and parts[1] else "default"
            cname = parts[2] if len(parts) > 2 and parts[2] else None
            try:
                rate = float(parts[3]) if len(parts) > 3 and parts[3] else None
            except ValueError:
                raise ConfigError(f"${a.keys_env} entry {j}: bad rate '{parts[3]}'") from None
            add(key, tenant, cname, None, rate, None, f"${a.keys_env} entry {j}")
        admin = a.admin_key or env.get(a.admin_key_env) or None
        anonymous = None
        if a.allow_unauthenticated:
            anonymous = Principal(
                tenant=a.anonymous_tenant,
                default_class=settings.default_class,
                bucket=_bucket(a.anonymous_rate_per_s, None, now),
                name=a.anonymous_tenant,
            )
        return cls(out, _digest(admin) if admin else None, anonymous)

    def lookup(self, key: str | None) -> Principal | None:
        """The principal for ``key``; None when it is unknown (or missing)."""
        if not key:
            return None
        d = _digest(key)
        p = self._by_digest.get(d)
        # The dict finds the candidate by SHA-256 digest, which a client cannot steer byte by
        # byte; the final check is constant-time, and runs on a miss too (against a dummy).
        ok = hmac.compare_digest(d, p.digest if p is not None else _DUMMY)
        return p if ok else None

    def is_admin(self, key: str | None) -> bool:
        if not key or self._admin is None:
            return False
        return hmac.compare_digest(_digest(key), self._admin)


def bearer_token(authorization: str | None, x_api_key: str | None = None) -> str | None:
    """The key from ``Authorization: Bearer <key>`` (or an ``x-api-key`` header)."""
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return x_api_key or None
