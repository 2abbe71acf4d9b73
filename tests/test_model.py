"""The store against a plain dict model (hypothesis stateful testing)."""

from __future__ import annotations

import uuid

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import shmkv

keys = st.binary(min_size=1, max_size=40) | st.text(min_size=1, max_size=20)
values = st.binary(max_size=3000)


def kb(k: bytes | str) -> bytes:
    return k.encode() if isinstance(k, str) else k


class StoreModel(RuleBasedStateMachine):
    """A store big enough never to evict behaves exactly like a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.name = f"model-{uuid.uuid4().hex[:10]}"
        self.kv = shmkv.attach(self.name, size="16MiB")
        self.model: dict[bytes, bytes] = {}

    @rule(k=keys, v=values)
    def put(self, k, v):
        self.kv.put(k, v)
        self.model[kb(k)] = v

    @rule(k=keys)
    def get(self, k):
        assert self.kv.get(k) == self.model.get(kb(k))

    @rule(k=keys)
    def delete(self, k):
        assert self.kv.delete(k) == (kb(k) in self.model)
        self.model.pop(kb(k), None)

    @rule(k=keys, v=values)
    def add(self, k, v):
        stored = self.kv.add(k, v)
        assert stored == (kb(k) not in self.model)
        self.model.setdefault(kb(k), v)

    @rule(k=keys, d=st.integers(-1000, 1000))
    def incr(self, k, d):
        cur = self.model.get(kb(k), b"0")
        try:
            n = int(cur.decode("ascii"))
            numeric = cur.strip() == cur and cur.decode("ascii").lstrip("+-").isdigit()
        except (UnicodeDecodeError, ValueError):
            numeric = False
        if numeric and -(2**63) <= n + d < 2**63:
            assert self.kv.incr(k, d) == n + d
            self.model[kb(k)] = str(n + d).encode()
        elif not numeric:
            try:
                self.kv.incr(k, d)
            except shmkv.NotACounter:
                pass
            else:
                raise AssertionError(f"incr on {cur!r} did not raise")

    @rule(ks=st.lists(keys, max_size=10))
    def get_many(self, ks):
        got = self.kv.get_many(ks)
        assert {kb(k): v for k, v in got.items()} == {kb(k): self.model[kb(k)] for k in ks if kb(k) in self.model}

    @rule(items=st.dictionaries(keys, values, max_size=10))
    def put_many(self, items):
        self.kv.put_many(items)
        for k, v in items.items():
            self.model[kb(k)] = v

    @precondition(lambda self: len(self.model) > 50)
    @rule()
    def clear(self):
        self.kv.clear()
        self.model.clear()

    @invariant()
    def same_size(self):
        assert len(self.kv) == len(self.model)

    def teardown(self):
        try:
            assert dict(self.kv.items()) == self.model
            assert self.kv.verify() == []
        finally:
            self.kv.close()
            shmkv.unlink(self.name)


TestStoreModel = StoreModel.TestCase
TestStoreModel.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)
