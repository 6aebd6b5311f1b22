#!/usr/bin/env bash
# Installs what pyvirtio's tests and demo need and is missing: Debian packages (real peers:
# QEMU, User-Mode Linux, the cloud kernel, busybox, fio, iperf3) and a virtualenv with the
# package and its test extras. Idempotent: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-system-x86 qemu-utils qemu-block-extra user-mode-linux linux-image-cloud-amd64
  busybox-static fio iperf3 e2fsprogs iproute2 tcpdump python3-venv
  gcc libc6-dev dpdk-dev
  nbdkit python3-libnbd ceph-mon ceph-mgr ceph-osd python3-rbd
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.pyvirtio-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi

# libnbd's and librbd's Python bindings exist only as Debian packages (not on PyPI). The venv
# sees exactly those modules through a .pth directory of symlinks, not the whole of
# dist-packages (which would shadow the venv's own pinned packages).
bindings=.venv/system-bindings
mkdir -p "$bindings"
for m in nbd libnbdmod rbd rados; do
  for f in /usr/lib/python3/dist-packages/"$m".py /usr/lib/python3/dist-packages/"$m".cpython-*.so; do
    if [ -e "$f" ]; then ln -sf "$f" "$bindings/"; fi
  done
done
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$(pwd)/$bindings" > "$site/pyvirtio-system-bindings.pth"
