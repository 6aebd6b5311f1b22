"""The RBD target syntax of ``pyvirtio serve blk`` (the back-end itself is tested against a
real Ceph cluster in tests/integration/test_blk_rbd.py)."""

from __future__ import annotations

import pytest

from pyvirtio.device.blk.rbd import parse_target
from pyvirtio.errors import LocalError


def test_a_target_names_pool_image_and_optionally_namespace_and_config() -> None:
    assert parse_target("rbd:rbd/disk") == ("rbd", None, "disk", None)
    assert parse_target("rbd:pool/disk@/tmp/c/ceph.conf") == ("pool", None, "disk",
                                                              "/tmp/c/ceph.conf")
    assert parse_target("rbd:pool/ns/disk@c.conf") == ("pool", "ns", "disk", "c.conf")


@pytest.mark.parametrize("bad", ["rbd:", "rbd:pool", "rbd:/disk", "rbd:pool/", "rbd:a/b/c/d",
                                 "nbd://x/y", "pool/disk"])
def test_anything_else_is_refused_with_the_expected_form(bad: str) -> None:
    with pytest.raises(LocalError, match="rbd:POOL/IMAGE"):
        parse_target(bad)
