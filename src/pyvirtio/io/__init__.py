"""The only code that owns file descriptors: eventfds, unix sockets with SCM_RIGHTS, the
event loop, tap devices, memfds handed between processes."""
