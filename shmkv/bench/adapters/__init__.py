"""The backends, by the name used on the command line and in reports.

Modules are imported on first use, so a missing peer library costs nothing until asked for,
and then only a skip reason (see ``Adapter.unavailable``).
"""

from __future__ import annotations

import importlib

from .base import Adapter, BackendConfig

# name -> (module, class). The order is the report's order: shmkv first, then the in-process
# bound, then peers from the nearest alternative to the farthest.
REGISTRY: dict[str, tuple[str, str]] = {
    "shmkv": ("shmkv_store", "ShmkvAdapter"),
    "shmkv-btree": ("shmkv_store", "ShmkvBtreeAdapter"),
    "dict": ("pydict", "DictAdapter"),
    "lmdb": ("lmdb_env", "LmdbAdapter"),
    "manager": ("manager_dict", "ManagerDictAdapter"),
    "diskcache": ("diskcache_cache", "DiskcacheAdapter"),
    "redis": ("redis_client", "RedisAdapter"),
    "memcached": ("memcached_client", "MemcachedAdapter"),
}
NAMES = tuple(REGISTRY)


def adapter_class(name: str) -> type[Adapter]:
    """:raises KeyError: unknown backend name."""
    module, cls = REGISTRY[name]
    mod = importlib.import_module(f"{__name__}.{module}")
    return getattr(mod, cls)  # type: ignore[no-any-return]


def make(name: str, config: BackendConfig) -> Adapter:
    return adapter_class(name)(config)


__all__ = ["Adapter", "BackendConfig", "NAMES", "REGISTRY", "adapter_class", "make"]
