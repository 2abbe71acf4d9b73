"""What the daemon's configuration hook needs of a configuration service (a Protocol).

Two implement it: config_service.ConfigService, the built-in Raft group among the daemons
(``--raft-dir``/``--join``), and etcd_config.EtcdConfigService, the same configuration kept in
an existing etcd cluster (``--config etcd://``). Both hold a cluster_config.ClusterConfig,
adopt every newer one they learn through the same code (ConfigService._adopt: the node's ring
and defaults, the Store for the other workers, the rebalancer), and answer the same wire codes
(CONFIG, CONFIG_CHANGE, CONFIG_PUSH), so ``shmkv cluster add/remove/weight/status`` work the
same against either.

How each learns its first ring differs (a Raft log, seeds, a join; or the etcd key), so that is
config_hook.ConfigHook.learn's business, not part of this interface.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from .cluster_config import ClusterConfig


class ConfigSource(Protocol):
    #: more facts for ``status()`` (the daemon adds the rebalancer's progress)
    extra_status: Callable[[], dict[str, Any]] | None

    def start(self) -> None:
        """Serve the wire codes and start learning configurations (the node knows its ring)."""

    async def close(self) -> None:
        """Stop every task; answer waiting changes "shutting down"."""

    def status(self) -> dict[str, Any]:
        """This node's view, for ``shmkv cluster status`` (the CONFIG reply's ``raft`` map)."""

    async def change(self, cmd: dict[str, Any], *, hops: int = 0, timeout: float = ...) -> ClusterConfig:
        """Commit one cluster_config command; the configuration it made.
        :raises ConfigError: refused, named. :raises Overloaded: not now, retry."""


__all__ = ["ConfigSource"]
