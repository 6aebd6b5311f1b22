"""What both ends of a virtio device share: feature negotiation and the status state machine.

The device side (:mod:`pyvirtio.device`) and the driver side (:mod:`pyvirtio.driver`) both
call these functions, so the two can never disagree about the rules.
"""
