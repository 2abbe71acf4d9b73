"""hints.py: a real file, real reopen; a hint leaves only when the owner acknowledged all of it."""

from __future__ import annotations

import os
from pathlib import Path

from shmkv.cluster.hints import FILENAME, HintStore
from shmkv.cluster.versions import VersionSet


def vs(value: bytes, actor: str = "c@1", base: VersionSet | None = None) -> VersionSet:
    return (base or VersionSet()).put(value, None, actor)


def test_hints_survive_the_holders_restart(tmp_path: Path) -> None:
    h = HintStore(str(tmp_path))
    one = vs(b"v1")
    assert h.add("b", b"k1", one) and h.add("b", b"k2", vs(b"v2")) and h.add("d", b"k1", vs(b"x"))
    h.ack("b", b"k2", vs(b"v2"))
    h.close()  # as if the process died here: every call above was fsynced before it returned
    again = HintStore(str(tmp_path))
    assert again.owners() == {"b": 1, "d": 1}
    assert again.get("b", b"k1") == one and again.pending("b") == [(b"k1", one)]
    assert again.bytes == h.bytes
    again.close()


def test_a_torn_tail_keeps_every_complete_record(tmp_path: Path) -> None:
    h = HintStore(str(tmp_path))
    for i in range(5):
        h.add("b", b"k%d" % i, vs(b"v%d" % i))
    h.close()
    f = tmp_path / FILENAME
    size = f.stat().st_size
    with open(f, "ab") as out:
        out.write(b"\x00\x00\x01\x00partial")  # a crash mid-append
    again = HintStore(str(tmp_path))
    assert len(again) == 5 and f.stat().st_size == size  # the tail is cut off
    again.add("b", b"k9", vs(b"later"))
    again.close()
    with HintStore(str(tmp_path)) as third:
        assert len(third) == 6


def test_a_hint_that_grew_during_its_delivery_is_not_deleted_by_the_older_ack(tmp_path: Path) -> None:
    h = HintStore(str(tmp_path))
    first = vs(b"v1")
    h.add("b", b"k", first)
    delivered = h.get("b", b"k")
    assert delivered is not None
    second = vs(b"v2", "e@1")  # another write for b lands here while the delivery is in flight
    h.add("b", b"k", second)
    assert h.ack("b", b"k", delivered) is False  # the owner has not seen v2 yet
    assert h.get("b", b"k") == first.merge(second)
    assert h.ack("b", b"k", first.merge(second)) is True and len(h) == 0
    h.close()
    with HintStore(str(tmp_path)) as again:
        assert len(again) == 0


def test_the_bound_refuses_new_hints_and_counts_them(tmp_path: Path) -> None:
    h = HintStore(str(tmp_path), max_hints=3)
    h.close()
    h = HintStore(None, max_hints=3)
    for i in range(3):
        assert h.add("b", b"k%d" % i, vs(b"v"))
    assert h.add("b", b"k3", vs(b"v")) is False and h.stats.refused == 1
    assert h.add("b", b"k0", vs(b"w", "e@1"))  # merging into a held hint still works
    assert len(h) == 3
    small = HintStore(None, max_bytes=100)
    assert small.add("b", b"k", vs(b"x" * 50)) and not small.add("b", b"j", vs(b"y" * 80))
    assert small.stats.refused == 1


def test_compaction_keeps_the_live_hints(tmp_path: Path) -> None:
    h = HintStore(str(tmp_path), fsync=False)  # 3000 records: the fsyncs are tested above
    for round_ in range(3):
        for i in range(600):
            v = vs(b"r%d" % round_)
            h.add("b", b"k%d" % i, v)
            if i % 3:
                h.ack("b", b"k%d" % i, v)
    live = dict(((o, k), v) for o, k, v in h.all())
    size = os.path.getsize(tmp_path / FILENAME)
    h.close()
    with HintStore(str(tmp_path)) as again:
        assert dict(((o, k), v) for o, k, v in again.all()) == live
        assert len(again) == 200
    assert size < 200 * 1024  # compacted: far fewer than the 3000 records written


def test_hints_of_an_owner_that_left_are_dropped_and_counted() -> None:
    h = HintStore(None)
    h.add("gone", b"k", vs(b"v"))
    h.add("b", b"k", vs(b"v"))
    assert h.drop_owner("gone") == 1 and h.owners() == {"b": 1} and h.stats.dropped == 1
