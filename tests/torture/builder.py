"""Build synthetic histories by hand, with contexts minted by the real version algebra.

``Replicas`` keeps one VersionSet per node and key, exactly as replica stores would, so the
contexts a test records are the ones a correct cluster hands out; a test then breaks one thing
on purpose (drops a replica's copy, forgets a sibling, returns a stale read) and the checker
must notice.
"""

from __future__ import annotations

from typing import Any

from shmkv.cluster.versions import Context, VersionSet
from shmkv.torture.history import Op


class Builder:
    def __init__(self) -> None:
        self.ops: list[Op] = []

    def add(self, f: str, key: str = "k", *, p: int = 0, t: tuple[float, float | None] = (0, 1),
            o: str = "ok", v: Any = None, r: Any = None, ci: dict[str, int] | None = None,
            co: dict[str, int] | None = None) -> Op:
        op = Op(len(self.ops), p, key, f, t[0], t[1], o, v, r, ci, co)
        self.ops.append(op.validate())
        return op

    def write(self, v: str, t: tuple[float, float | None], **kw: Any) -> Op:
        return self.add("write", v=v, t=t, **kw)

    def read(self, r: list[Any], t: tuple[float, float | None], **kw: Any) -> Op:
        return self.add("read", r=r, t=t, **kw)

    def delete(self, t: tuple[float, float | None], **kw: Any) -> Op:
        return self.add("delete", t=t, **kw)


class Replicas:
    """N replicas of some keys, with coordinator-side puts and merging replication."""

    def __init__(self, nodes: list[str]) -> None:
        self.state: dict[str, dict[str, VersionSet]] = {n: {} for n in nodes}

    def get(self, node: str, key: str) -> VersionSet:
        return self.state[node].get(key, VersionSet())

    def put(self, key: str, value: str | None, ctx: dict[str, int] | None, coord: str,
            to: list[str]) -> dict[str, int]:
        """The coordinator's new version, merged into the replicas ``to``; its context."""
        new = self.get(coord, key).put(
            None if value is None else value.encode(), None if ctx is None else Context(ctx), coord
        )
        for n in {coord, *to}:
            self.state[n][key] = self.get(n, key).merge(new)
        return new.clock

    def read(self, key: str, frm: list[str]) -> tuple[list[str | None], dict[str, int]]:
        vs = VersionSet()
        for n in frm:
            vs = vs.merge(self.get(n, key))
        return [None if v is None else v.decode() for v in vs.values], vs.clock

    def merged(self) -> dict[str, VersionSet]:
        out: dict[str, VersionSet] = {}
        for keys in self.state.values():
            for k, vs in keys.items():
                out[k] = out[k].merge(vs) if k in out else vs
        return out
