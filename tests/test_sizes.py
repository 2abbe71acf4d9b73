"""Human sizes: what attach(size=...) accepts."""

from __future__ import annotations

import pytest

import shmkv
from shmkv.sizes import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "n"),
    [("256MiB", 256 << 20), ("1GiB", 1 << 30), ("64MB", 64_000_000), ("1G", 1 << 30),
     ("512k", 512 << 10), ("65536", 65536), (" 2 MiB ", 2 << 20), ("1.5GiB", 3 << 29), (4096, 4096)],
)
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "MiB", "12XB", "-1", "1e9", "0", 0, -5])
def test_parse_size_rejects(bad):
    with pytest.raises(shmkv.InvalidArgument):
        parse_size(bad)


@pytest.mark.parametrize("bad", [1.5, None, b"1MiB", True])
def test_parse_size_rejects_types(bad):
    with pytest.raises(shmkv.InvalidType):
        parse_size(bad)


def test_format_size():
    assert format_size(256 << 20) == "256.0 MiB"
    assert format_size(100) == "100 B"
