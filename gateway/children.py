"""Child processes that never outlive the process that started them."""

from __future__ import annotations

import ctypes
import signal

# From <linux/prctl.h>: ask for a signal when the parent process dies.
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """For ``preexec_fn``: in the child, before exec, ask Linux to send it
    SIGTERM when its parent dies, even by SIGKILL, so no orphan keeps a port.
    Elsewhere a no-op: a killed parent leaves its children to be stopped by
    hand."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
