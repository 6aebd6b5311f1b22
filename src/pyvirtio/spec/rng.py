"""virtio-rng, the entropy device (VIRTIO 1.x §5.4).

One queue, ``requestq``: the driver posts writable buffers, the device fills them with random
bytes and returns the count written. No feature bits, no configuration space.
"""

REQUESTQ = 0
NUM_QUEUES = 1
