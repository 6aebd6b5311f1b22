"""A full memory barrier for the few places virtio needs store->load ordering.

Python stores to shared memory happen in program order, and x86 keeps stores ordered with
each other and loads with each other (TSO). What x86 may do is let a later *load* pass an
earlier *store* still in the store buffer. virtio needs a full barrier exactly there: the
driver publishing avail->idx then reading the device's notification suppression (kick
decision), enable_cb publishing used_event then re-reading used->idx (the paper's §3.1
race), and the device's mirror images. Acquiring an uncontended ``threading.Lock`` executes
a locked read-modify-write, which is a full barrier on x86 and a barrier-paired atomic on
other architectures; ~100 ns, and only on notification paths.
"""

import threading

_lock = threading.Lock()


def full_barrier() -> None:
    """Order every earlier store before every later load (virtio_mb)."""
    _lock.acquire()
    _lock.release()
