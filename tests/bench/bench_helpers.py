"""Helpers shared by the bench tests (a module, not conftest, so tests can import it)."""

from __future__ import annotations

import uuid

from shmkv.bench.adapters import BackendConfig


def small_config(**kw: object) -> BackendConfig:
    args: dict[str, object] = {
        "keys": 200,
        "key_size": 16,
        "item_bytes": 116,
        "max_item_bytes": 116,
        "run_id": uuid.uuid4().hex[:8],
    }
    args.update(kw)
    return BackendConfig(**args)  # type: ignore[arg-type]
