# The two commands: `make demo` and `make test`. Both install what is missing first.
PY := .venv/bin/python
PYTEST_ARGS ?=
# e.g. make bench-blk BENCH_ARGS="--rounds 1 --runtime 1" (a smoke run)
BENCH_ARGS ?=

.PHONY: deps demo test lint typecheck unit bench-blk bench-net bench-join bench-ring bench-driver \
	ceph-start ceph-stop chaos-report clean

deps:
	@bash scripts/install-deps.sh

demo: deps
	$(PY) -m pyvirtio demo

test: deps lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

unit: deps
	$(PY) -m pytest tests/unit tests/fuzz $(PYTEST_ARGS)

lint: deps
	$(PY) -m ruff check src tests examples $(wildcard benchmarks)

typecheck: deps
	$(PY) -m mypy

bench-blk: deps
	$(PY) benchmarks/blk_vs_qsd.py $(BENCH_ARGS)

bench-net: deps
	$(PY) benchmarks/net_vs_bridge.py $(BENCH_ARGS)

bench-join: deps
	$(PY) benchmarks/net_join.py $(BENCH_ARGS)

bench-ring: deps
	$(PY) benchmarks/ring_split_vs_packed.py $(BENCH_ARGS)

bench-driver: deps
	$(PY) benchmarks/driver_vs_linux.py $(BENCH_ARGS)

# A single-node Ceph cluster on loopback for development (pyvirtio.testing.ceph; the tests
# start their own): `make ceph-start` prints its ceph.conf, then
# `pyvirtio serve blk rbd:rbd/IMAGE@$(CEPH_DIR)/ceph.conf ...`.
CEPH_DIR ?= .ceph
ceph-start: deps
	$(PY) -m pyvirtio.testing.ceph start $(CEPH_DIR)

ceph-stop:
	$(PY) -m pyvirtio.testing.ceph stop $(CEPH_DIR)

# Boots real Linux guests against every device type x fault class (tens of minutes):
# writes docs/hardening.md.
chaos-report: deps
	$(PY) benchmarks/chaos_report.py

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache .hypothesis
