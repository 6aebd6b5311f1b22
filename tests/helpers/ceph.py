"""The single-node Ceph cluster of a test run (:class:`pyvirtio.testing.ceph.CephCluster`):
started once per session, on first use, by the ``ceph_cluster`` fixture and stopped (daemons
killed, directory removed) when the session ends, even after failures. Missing Ceph packages
skip locally and fail under CI (tests/peers.py); a cluster that cannot start fails the tests
that need it, with the daemons' logs in the message.

Each test makes its own image (:func:`rbd_image`), named after the test and the pid, so tests
and concurrent runs never share one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

from peers import require_binaries, skip_or_fail
from pyvirtio.errors import LocalError
from pyvirtio.testing.ceph import DAEMONS, CephCluster, bindings


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[CephCluster]:
    require_binaries(*DAEMONS, "monmaptool")
    try:
        bindings()
    except LocalError as exc:
        skip_or_fail(str(exc))
    cluster = CephCluster()
    try:
        cluster.start()
        rss = sum(cluster.rss_bytes().values())
        print(f"\nceph test cluster: up in {cluster.start_seconds:.1f} s, "
              f"daemons' RSS {rss >> 20} MiB ({cluster!r})")
        yield cluster
    finally:
        cluster.stop()


def image_name(request: pytest.FixtureRequest) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:60] + f"-{os.getpid()}"
