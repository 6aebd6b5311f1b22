"""virtio-balloon, the traditional memory balloon (VIRTIO 1.x §5.5).

Queues: inflateq (0), deflateq (1), statsq (2, with STATS_VQ), then free_page_vq and
reporting_vq when negotiated. Inflate/deflate buffers hold little-endian u32 page frame
numbers of 4096-byte pages.
"""

from __future__ import annotations

import struct

VIRTIO_BALLOON_F_MUST_TELL_HOST = 0
VIRTIO_BALLOON_F_STATS_VQ = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2
VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3
VIRTIO_BALLOON_F_PAGE_POISON = 4
VIRTIO_BALLOON_F_REPORTING = 5

VIRTIO_BALLOON_PFN_SHIFT = 12
PAGE_SIZE = 1 << VIRTIO_BALLOON_PFN_SHIFT

INFLATEQ = 0
DEFLATEQ = 1
STATSQ = 2

# struct virtio_balloon_config field offsets (all le32)
CFG_NUM_PAGES = 0
CFG_ACTUAL = 4
CFG_FREE_PAGE_HINT_CMD_ID = 8
CFG_POISON_VAL = 12
CONFIG_SIZE = 16

PFN = struct.Struct("<I")
# struct virtio_balloon_stat: tag (le16), val (le64), packed: 10 bytes
STAT = struct.Struct("<HQ")
STAT_SIZE = 10

VIRTIO_BALLOON_S_SWAP_IN = 0
VIRTIO_BALLOON_S_SWAP_OUT = 1
VIRTIO_BALLOON_S_MAJFLT = 2
VIRTIO_BALLOON_S_MINFLT = 3
VIRTIO_BALLOON_S_MEMFREE = 4
VIRTIO_BALLOON_S_MEMTOT = 5
VIRTIO_BALLOON_S_AVAIL = 6
VIRTIO_BALLOON_S_CACHES = 7
VIRTIO_BALLOON_S_HTLB_PGALLOC = 8
VIRTIO_BALLOON_S_HTLB_PGFAIL = 9
