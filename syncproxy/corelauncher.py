"""Run the sync core so that it stops when syncproxy dies.

syncproxy starts the core in its own session (a Ctrl-C in a terminal must reach syncproxy first),
so nothing stops the core when syncproxy is killed with SIGKILL: the core would keep running and
keep its lock on the collections folder, and the next syncproxy could not start a core there. This
launcher asks Linux to send the core SIGINT (its graceful stop) when its parent dies, then runs
`python -m anki.syncserver` in the same process.

    python -m syncproxy.corelauncher PARENT_PID
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send `signum` when the parent exits; return False where unsupported.

    Linux sends it when the parent thread that forked this process exits. syncproxy starts the
    core from its event loop, in its main thread, which lives as long as syncproxy does.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def main() -> None:
    parent = int(sys.argv[1])
    if not set_parent_death_signal(signal.SIGINT):
        print("syncproxy core launcher: parent-death signal unavailable; a killed syncproxy "
              "leaves this sync core running until the next start stops it", file=sys.stderr)
    # The parent may have died between fork and prctl; then no signal will ever come.
    if os.getppid() != parent:
        sys.exit("syncproxy core launcher: syncproxy exited before the sync core started")
    sys.argv = ["anki.syncserver"]
    runpy.run_module("anki.syncserver", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
