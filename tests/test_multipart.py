"""Cutting an output into the parts of an S3 multipart upload, and the parts into tasks:
pure arithmetic, held to S3's rules and to whole tensors on random layouts."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from streamavg.multipart import MAX_PART, MAX_PARTS, MIN_PART, PART_BYTES, cut, inside, runs

MiB = 1 << 20


@st.composite
def layouts(draw) -> tuple[int, list[tuple[int, int]]]:
    """A file's size and its tensors' data: disjoint spans with gaps (metadata) between."""
    at, spans = draw(st.integers(0, 4 * MiB)), []
    for length, gap in draw(st.lists(st.tuples(st.integers(1, 80 * MiB), st.integers(0, MiB)))):
        spans.append((at, at + length))
        at += length + gap
    return at + draw(st.integers(1, 8 * MiB)), spans


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_parts_follow_s3_rules_and_keep_tensors_whole(layout):
    size, spans = layout
    parts = cut(size, spans)
    assert [a for a, _ in parts] == [0, *(b for _, b in parts[:-1])]  # contiguous
    assert parts[-1][1] == size and len(parts) <= MAX_PARTS
    assert all(MIN_PART <= b - a <= 2 * PART_BYTES for a, b in parts[:-1])
    for _, end in parts[:-1]:  # a part ends inside a tensor only if it is larger than a part
        span = inside(spans, end)
        assert span is None or span[1] - span[0] > PART_BYTES
    for run in runs(parts, spans, 64 * MiB):  # each run ends where no tensor is cut
        assert inside(spans, run[-1][1]) is None


def test_a_huge_object_stays_within_ten_thousand_parts():
    size = 5 << 40  # S3's largest object
    parts = cut(size, [])
    assert len(parts) <= MAX_PARTS and max(b - a for a, b in parts) <= MAX_PART


def test_an_object_under_the_smallest_part_is_one_part():
    assert cut(3 * MiB, [(100, 3 * MiB - 100)]) == [(0, 3 * MiB)]
