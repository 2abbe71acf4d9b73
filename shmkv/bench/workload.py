"""What a benchmark run does: the workload spec and the op streams generated from it.

A :class:`Workload` is plain data (picklable, JSON-able). From it each worker process builds its
own :class:`OpStream` *before* the start barrier, so generating keys, values and the random
choices costs nothing inside the timed loop; the loop then cycles over the stream.

Contracts:

- Keys are exactly ``key_size`` bytes: ``make_key(i)`` is ``b"k"`` + zero-padded ``i``; key ``i``
  is the same bytes in every process and every backend.
- The key distribution picks a key *index* in ``[0, keys)``. Zipfian ranks are mapped to indices
  through one permutation fixed by the seed, so every worker shares the same hot keys (as the
  workers of one web app share hot sessions) while a B-tree peer does not get them adjacent.
- A workload with ``incr`` in its mix stores decimal counters: the fill and every put write
  ``b"0"`` whatever the value size says, so ``incr`` never meets a non-number.
- Streams are deterministic for a given (workload, worker index).
"""

from __future__ import annotations

import bisect
import itertools
import random
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

# Op codes, in this order everywhere (stream entries, latency tables, JSON).
GET, PUT, DELETE, INCR, SCAN = 0, 1, 2, 3, 4
# SCAN: an ordered read of up to Workload.scan_length pairs from a key on (one op, one latency
# sample; the report's keys/s for it is ops/s x the length).
OP_NAMES = ("get", "put", "delete", "incr", "scan")

# Keys in a generated stream before it repeats; large enough that a cache-sized working set is
# touched, small enough to build in well under a second.
STREAM_KEYS = 1 << 16
# Distinct value objects per stream: values are shared, so a 10 KiB workload does not hold
# STREAM_KEYS x 10 KiB of memory in every worker.
VALUE_POOL = 256

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Parse a byte size: ``100``, ``1k``, ``1KiB``, ``64MiB``, ``2G``.

    K/KB/KiB all mean 1024 (as memcached's ``-m`` and most cache tooling do).

    :raises ValueError: not a size, or not positive.
    """
    if isinstance(text, int):
        n = text
    else:
        m = _SIZE_RE.match(text)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"not a size: {text!r} (examples: 100, 1KiB, 64MiB)")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return n


def format_size(n: int) -> str:
    """The shortest exact spelling of a byte count: ``100B``, ``1KiB``, ``10KiB``, ``1536B``."""
    for unit, mult in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return f"{n}B"


@dataclass(frozen=True)
class SizeDist:
    """A value-size distribution.

    ``kind`` is ``"fixed"`` (one size), ``"range"`` (uniform integer in ``[sizes[0],
    sizes[1]]``) or ``"choice"`` (one of ``sizes`` with the given relative ``weights``).
    """

    kind: str
    sizes: tuple[int, ...]
    weights: tuple[float, ...] = ()

    @classmethod
    def parse(cls, text: str | int) -> SizeDist:
        """``100`` | ``100-10KiB`` (uniform range) | ``100:70,1KiB:20,10KiB:10`` (weighted) |
        ``100,1KiB`` (equal weights).

        :raises ValueError: on a malformed spec.
        """
        if isinstance(text, int):
            return cls("fixed", (parse_size(text),))
        text = text.strip()
        if "," in text or ":" in text:
            sizes, weights = [], []
            for part in text.split(","):
                size, _, weight = part.partition(":")
                sizes.append(parse_size(size))
                weights.append(float(weight) if weight else 1.0)
            if any(w <= 0 for w in weights):
                raise ValueError(f"weights must be positive: {text!r}")
            if len(sizes) == 1:
                return cls("fixed", (sizes[0],))
            return cls("choice", tuple(sizes), tuple(weights))
        if "-" in text:
            lo_s, _, hi_s = text.partition("-")
            lo, hi = parse_size(lo_s), parse_size(hi_s)
            if lo > hi:
                raise ValueError(f"empty size range: {text!r}")
            return cls("range", (lo, hi))
        return cls("fixed", (parse_size(text),))

    @property
    def max_size(self) -> int:
        return max(self.sizes)

    @property
    def mean_size(self) -> float:
        """Expected size; used only to size stores, never reported as a result."""
        if self.kind == "fixed":
            return float(self.sizes[0])
        if self.kind == "range":
            return (self.sizes[0] + self.sizes[1]) / 2
        total = sum(self.weights)
        return sum(s * w for s, w in zip(self.sizes, self.weights, strict=True)) / total

    def sample(self, rng: random.Random, n: int) -> list[int]:
        if self.kind == "fixed":
            return [self.sizes[0]] * n
        if self.kind == "range":
            lo, hi = self.sizes
            return [rng.randint(lo, hi) for _ in range(n)]
        return rng.choices(self.sizes, weights=self.weights, k=n)

    def describe(self) -> str:
        if self.kind == "fixed":
            return format_size(self.sizes[0])
        if self.kind == "range":
            return f"{format_size(self.sizes[0])}-{format_size(self.sizes[1])} uniform"
        total = sum(self.weights)
        return ",".join(
            f"{format_size(s)}:{100 * w / total:g}%"
            for s, w in zip(self.sizes, self.weights, strict=True)
        )


@dataclass(frozen=True)
class Mix:
    """The share of each op, in percent of ops (they sum to 100)."""

    get: float = 90.0
    put: float = 10.0
    delete: float = 0.0
    incr: float = 0.0
    scan: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Mix:
        """``get=90,put=10`` (any of get/put/delete/incr/scan; unnamed ops are 0); relative weights
        are normalised to percent, so ``get=9,put=1`` is the same mix.

        :raises ValueError: unknown op, negative or all-zero weights.
        """
        weights = dict.fromkeys(OP_NAMES, 0.0)
        for part in text.split(","):
            name, sep, value = part.strip().partition("=")
            name = name.strip().lower()
            if not sep or name not in weights:
                raise ValueError(f"bad mix {text!r}: expected e.g. get=90,put=10 (ops: {OP_NAMES})")
            weights[name] = float(value)
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"negative weight in mix {text!r}")
        total = sum(weights.values())
        if total <= 0:
            raise ValueError(f"mix {text!r} has no ops")
        return cls(**{k: 100.0 * v / total for k, v in weights.items()})

    def weights(self) -> tuple[float, float, float, float, float]:
        """Shares in op-code order (GET, PUT, DELETE, INCR, SCAN)."""
        return (self.get, self.put, self.delete, self.incr, self.scan)

    def describe(self) -> str:
        return " ".join(f"{n} {w:g}%" for n, w in zip(OP_NAMES, self.weights(), strict=True) if w)


@dataclass(frozen=True)
class KeyDist:
    """``uniform`` or ``zipf`` with exponent ``s`` (P(rank r) proportional to 1/r**s)."""

    kind: str = "uniform"
    s: float = 0.99

    @classmethod
    def parse(cls, text: str) -> KeyDist:
        """``uniform`` | ``zipf`` (s=0.99, as YCSB) | ``zipf:1.2``.

        :raises ValueError: unknown kind or s <= 0.
        """
        kind, _, arg = text.strip().lower().partition(":")
        if kind == "uniform" and not arg:
            return cls("uniform")
        if kind in ("zipf", "zipfian"):
            s = float(arg) if arg else 0.99
            if s <= 0:
                raise ValueError(f"zipf exponent must be > 0: {text!r}")
            return cls("zipf", s)
        raise ValueError(f"bad key distribution {text!r}: expected uniform, zipf or zipf:S")

    def describe(self) -> str:
        return "uniform" if self.kind == "uniform" else f"zipf s={self.s:g}"


@dataclass(frozen=True)
class Workload:
    """One workload, run identically against every backend and process count.

    Exactly one of ``duration`` (seconds per run) and ``ops`` (ops per process per run) is set.
    An "op" is one key: a ``get_many`` of 100 keys counts 100 ops (and one latency sample).
    """

    keys: int = 10_000
    key_size: int = 16
    value_size: SizeDist = field(default_factory=lambda: SizeDist("fixed", (100,)))
    mix: Mix = field(default_factory=Mix)
    dist: KeyDist = field(default_factory=KeyDist)
    batch: int = 1
    duration: float | None = 2.0
    ops: int | None = None
    fill: bool = True
    seed: int = 1
    scan_length: int = 100  # pairs per SCAN op

    def __post_init__(self) -> None:
        if self.keys < 1:
            raise ValueError("keys must be >= 1")
        if len(make_key(self.keys - 1, self.key_size)) != self.key_size:
            raise ValueError(f"key size {self.key_size} B cannot hold {self.keys} distinct keys")
        if self.batch < 1:
            raise ValueError("batch must be >= 1")
        if self.batch > self.keys:
            raise ValueError(f"batch {self.batch} is larger than the key set ({self.keys})")
        if self.batch > 1 and self.mix.incr:
            raise ValueError("incr has no batch form: use batch 1 with an incr mix")
        if self.batch > 1 and self.mix.scan:
            raise ValueError("scan has no batch form: use batch 1 with a scan mix")
        if self.scan_length < 1:
            raise ValueError("scan length must be >= 1")
        if (self.duration is None) == (self.ops is None):
            raise ValueError("give exactly one of duration and ops")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("duration must be > 0")
        if self.ops is not None and self.ops < 1:
            raise ValueError("ops must be >= 1")

    @property
    def counters(self) -> bool:
        """Values are decimal counters (the mix has incr): see the module contract."""
        return self.mix.incr > 0

    @property
    def item_bytes(self) -> int:
        """Key + mean value bytes of one item: for sizing stores, not for results."""
        return self.key_size + (1 if self.counters else int(self.value_size.mean_size))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["value_size"] = {"spec": self.value_size.describe(), **asdict(self.value_size)}
        return d

    def describe(self) -> str:
        values = "counters" if self.counters else f"values {self.value_size.describe()}"
        length = f"{self.duration:g} s per run" if self.duration else f"{self.ops} ops per process"
        batch = f", batches of {self.batch}" if self.batch > 1 else ""
        return (
            f"{self.keys:,} keys of {self.key_size} B, {values}, {self.mix.describe()}, "
            f"{self.dist.describe()}{batch}, {length}"
        )


def make_key(i: int, key_size: int) -> bytes:
    """Key ``i`` of a workload: ``b"k"`` + ``i`` zero-padded to ``key_size`` bytes in all.

    Longer than ``key_size`` when ``i`` does not fit (``Workload`` rejects that)."""
    return b"k" + str(i).zfill(key_size - 1).encode()


class KeyChooser:
    """Draws key indices in ``[0, n)`` from a :class:`KeyDist`.

    Zipf uses inverse-CDF sampling over precomputed cumulative weights (O(n) memory, O(log n)
    per draw); the rejected alternative, rejection sampling (Gray et al.), needs no table but
    costs several random numbers per draw and is harder to check against the exact pmf.
    """

    def __init__(self, dist: KeyDist, n: int, seed: int) -> None:
        self.dist = dist
        self.n = n
        self._cum: list[float] = []
        self._perm: list[int] = []
        if dist.kind == "zipf":
            s = dist.s
            self._cum = list(itertools.accumulate(1.0 / r**s for r in range(1, n + 1)))
            self._perm = list(range(n))
            random.Random(f"zipf-perm-{seed}").shuffle(self._perm)

    def rank_probability(self, rank: int) -> float:
        """Exact probability of rank ``rank`` (0 = hottest) under this distribution."""
        if self.dist.kind == "uniform":
            return 1.0 / self.n
        prev = self._cum[rank - 1] if rank else 0.0
        return (self._cum[rank] - prev) / self._cum[-1]

    def key_of_rank(self, rank: int) -> int:
        return self._perm[rank] if self._perm else rank

    def draw(self, rng: random.Random, count: int) -> list[int]:
        if self.dist.kind == "uniform":
            below = rng.randrange
            n = self.n
            return [below(n) for _ in range(count)]
        total = self._cum[-1]
        cum, perm, rand, right = self._cum, self._perm, rng.random, bisect.bisect_right
        last = self.n - 1
        return [perm[min(right(cum, rand() * total), last)] for _ in range(count)]


def value_pool(workload: Workload, rng: random.Random) -> list[bytes]:
    """Distinct value objects drawn from the size distribution (random, incompressible)."""
    if workload.counters:
        return [b"0"]
    sizes = workload.value_size.sample(rng, VALUE_POOL)
    return [rng.randbytes(size) for size in sizes]


# One op of a stream: (op code, argument). The argument is a key (bytes), a (key, value) pair
# for PUT, a list of keys for batched GET/DELETE, or a dict for batched PUT.
Op = tuple[int, Any]


@dataclass
class OpStream:
    """The ops one worker cycles over; ``keys_per_op`` keys are touched by each entry."""

    ops: list[Op]
    keys_per_op: int

    def counts(self) -> list[int]:
        """Entries per op code (GET, PUT, DELETE, INCR, SCAN)."""
        out = [0] * len(OP_NAMES)
        for code, _ in self.ops:
            out[code] += 1
        return out


def build_stream(workload: Workload, worker: int, length_keys: int = STREAM_KEYS) -> OpStream:
    """The op stream of worker ``worker``: about ``length_keys`` keys, deterministic."""
    rng = random.Random(f"stream-{workload.seed}-{worker}")
    chooser = KeyChooser(workload.dist, workload.keys, workload.seed)
    b = workload.batch
    n_ops = max(16, -(-length_keys // b))
    codes = rng.choices(range(len(OP_NAMES)), weights=workload.mix.weights(), k=n_ops)
    idx = chooser.draw(rng, n_ops * b)
    if b > 1:
        idx = _distinct_batches(idx, b, chooser, rng)
    ks = workload.key_size
    # Keys are built once per distinct index, so a zipf stream shares its hot key objects.
    cache: dict[int, bytes] = {}
    keys = [cache.get(i) or cache.setdefault(i, make_key(i, ks)) for i in idx]
    pool = value_pool(workload, rng)
    pick = rng.randrange
    npool = len(pool)
    ops: list[Op] = []
    for j, code in enumerate(codes):
        if b == 1:
            key = keys[j]
            if code == PUT:
                ops.append((code, (key, pool[pick(npool)])))
            elif code == SCAN:
                ops.append((code, (key, workload.scan_length)))
            else:
                ops.append((code, key))
        elif code == PUT:
            ops.append((code, {k: pool[pick(npool)] for k in keys[j * b : (j + 1) * b]}))
        else:
            ops.append((code, keys[j * b : (j + 1) * b]))
    return OpStream(ops, b)


def _distinct_batches(idx: list[int], b: int, chooser: KeyChooser, rng: random.Random) -> list[int]:
    """Redraw repeats inside each batch of ``b``: a batch names ``b`` distinct keys, so a
    ``put_many`` dict has ``b`` entries and a batch really touches ``b`` keys."""
    out: list[int] = []
    for start in range(0, len(idx), b):
        seen: dict[int, None] = dict.fromkeys(idx[start : start + b])
        while len(seen) < b:
            seen.setdefault(chooser.draw(rng, 1)[0])
        out.extend(seen)
    return out


def fill_batches(workload: Workload, batch: int = 1000) -> Iterator[dict[bytes, bytes]]:
    """Every key once, with a value from the distribution, in dicts of up to ``batch`` items."""
    rng = random.Random(f"fill-{workload.seed}")
    pool = value_pool(workload, rng)
    npool = len(pool)
    ks = workload.key_size
    for start in range(0, workload.keys, batch):
        stop = min(start + batch, workload.keys)
        yield {make_key(i, ks): pool[i % npool] for i in range(start, stop)}
