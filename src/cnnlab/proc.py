"""Child processes that never outlive the program that started them.

A study runs each training as a child `cnnlab train` process. If the study's process is killed
(SIGKILL, a closed terminal, an out-of-memory kill), its children must not train on as orphans,
writing into folders that a rerun of the study is about to use. The parent marks the children's
environment; each child asks the kernel (Linux prctl PR_SET_PDEATHSIG) for a SIGTERM when its parent
dies, and SIGTERM stops a training cleanly at the next step with a checkpoint, so the rerun resumes it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_ENV = "CNNLAB_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def child_env(env: dict | None = None) -> dict:
    """The environment for a child process that must end with this one (see follow_parent)."""
    return {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}


def follow_parent() -> bool:
    """In a child started with child_env — or one of several training processes started by torchrun, whose
    workers would otherwise train on as orphans when the launcher is killed — be sent SIGTERM when the parent
    dies. Returns whether it is set.

    The parent's pid is checked after the request: a parent that died just before it would send nothing.
    """
    parent = os.environ.pop(PARENT_ENV, None)  # not inherited further: grandchildren have another parent
    if parent is None and os.environ.get("TORCHELASTIC_RUN_ID"):  # a torchrun worker: its parent is the agent
        parent = str(os.getppid())
    if not parent or not parent.isdigit() or not sys.platform.startswith("linux"):
        return False
    if not die_with_parent():
        return False
    if os.getppid() != int(parent):  # orphaned already
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def die_with_parent() -> bool:
    """Ask the kernel for a SIGTERM to this process when its parent dies (Linux; also usable as a
    subprocess preexec_fn). Returns whether it is set."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
