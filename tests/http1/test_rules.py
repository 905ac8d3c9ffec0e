"""proxy/http1/policy.py: the HTTP rules, pure (test_policy.py is egress's)."""

from __future__ import annotations

import pytest

from proxy.http1.policy import bad_field_name


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
