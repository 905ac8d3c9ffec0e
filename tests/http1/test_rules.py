"""proxy/http1/policy.py: the HTTP rules, pure (test_policy.py is egress's)."""

from __future__ import annotations

import pytest

from proxy.http1.policy import answer_end, bad_field_name


@pytest.mark.parametrize(
    ("names", "bad"),
    [
        ([], False),
        ([b"Content-Length"], False),
        ([b"ETag", b"x-a_b", b"!#$%&'*+.^_`|~09"], False),
        ([b"Content-Length "], True),  # RFC 9112 §5.1: whitespace before the colon
        ([b"ETag", b" X-Folded"], True),  # §2.2: a line that starts with whitespace
        ([b""], True),
        ([b"ok", b""], True),
        ([b"a\x00b"], True),
        ([b"X-A", b"X B"], True),
    ],
)
def test_a_field_name_is_a_token(names: list[bytes], bad: bool) -> None:
    assert bad_field_name([(name, b"v") for name in names]) is bad


# answer_end: where a response whose head gives its length ends (bytes past it
# are no answer: the upstream connection is then closed, not reused).
@pytest.mark.parametrize(
    ("head", "end"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", 5),
        (b"HTTP/1.1 200 OK\r\ncontent-LENGTH:\t 12 \t\r\n\r\n", 12),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5x\r\nContent-Length: 7\r\n\r\n", 7),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", None),
        (b"HTTP/1.1 200 OK\r\nX-Content-Length: 5\r\n\r\n", None),
        (b"HTTP/1.1 200 OK\r\nContent-Length:\r\n\r\n", None),
    ],
)
def test_an_answer_end_from_its_length_line(head: bytes, end: int | None) -> None:
    expected = None if end is None else len(head) + end
    assert answer_end(head + b"y" * 20, head_only=False) == expected
