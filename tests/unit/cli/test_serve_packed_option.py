"""``pyvirtio serve ... --packed/--no-packed``: the offer and the QEMU hint follow it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pyvirtio.cli.main import build_parser
from pyvirtio.cli.serve import attach_instructions, transport_features
from pyvirtio.spec import features as F
from pyvirtio.spec import ids


@pytest.mark.parametrize(("argv", "packed"), [([], True), (["--packed"], True),
                                               (["--no-packed"], False)])
def test_the_packed_ring_is_offered_unless_withheld(argv: list[str], packed: bool) -> None:
    args = build_parser().parse_args(["serve", "rng", "--socket", "/tmp/x.sock", *argv])
    assert args.packed is packed
    assert bool(transport_features(args) & F.bit(F.RING_PACKED)) is packed
    hint = attach_instructions([SimpleNamespace(path="/tmp/x.sock")],  # type: ignore[list-item]
                               ids.RNG, uml=False, packed=args.packed)
    assert ("vhost-user-rng-pci,chardev=vu0,packed=on" in hint) is packed
