"""A plain ``dict`` in one process: the in-process bound, not a shared store.

Each worker would have its own dict, so the runner measures it at 1 process only (max_procs).
"""

from __future__ import annotations

from collections.abc import Mapping

from .base import Adapter


class DictAdapter(Adapter):
    name = "dict"
    label = "Python dict in one process: the in-process bound (not shared, 1 process only)"
    shared = False
    max_procs = 1
    evicts = False

    def open(self) -> None:
        d: dict[bytes, bytes] = {}
        self._h_dict = d
        self.get = d.get
        self.put = d.__setitem__

        def delete(key: bytes) -> bytes | None:
            return d.pop(key, None)

        def get_many(keys: list[bytes]) -> Mapping[bytes, bytes]:
            return {k: d[k] for k in keys if k in d}

        def delete_many(keys: list[bytes]) -> int:
            pop = d.pop
            return sum(pop(k, None) is not None for k in keys)

        def incr(key: bytes) -> int:
            n = int(d.get(key, b"0")) + 1
            d[key] = b"%d" % n
            return n

        self.delete = delete
        self.get_many = get_many
        self.put_many = d.update
        self.delete_many = delete_many
        self.incr = incr

    def close(self) -> None:
        self.__dict__.pop("_h_dict", None)
        super().close()
