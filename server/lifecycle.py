"""The engine's processes end with the teacher-farm process that started them, SIGKILL included.

vLLM runs the model in child processes (an EngineCore, and Workers under it). When the process that
owns the engine dies without a chance to stop it (SIGKILL, the OOM killer), those children are
re-parented to init and live on, holding the model's memory (a GPU's, on a farm node), so a
restarted server cannot load. No handler runs in a SIGKILLed process, so the children must notice
by themselves.

vLLM loads every ``vllm.general_plugins`` entry point in each process it starts (the EngineCore in
``EngineCore.__init__``, each Worker in its ``init_worker``). This module is one such plugin: in a
process started under a teacher-farm owner (``mark_engine_owner`` sets :data:`OWNER_ENV` before
the engine starts), it runs a daemon thread that watches ``os.getppid()``; when the parent is gone
it asks the process to stop as vLLM itself would (SIGTERM, which also stops its own children) and,
if it is still there a few seconds later, kills its children and itself. A Worker watches its
EngineCore the same way, so the whole tree goes down from the top.

Each engine process also leaves its owner's process group: Ctrl-C on a terminal, or a supervisor's
SIGTERM to the group, then reaches the owner alone, which stops the engine in order (the EngineCore
first, which stops its Workers and frees their shared memory) instead of every process at once.

On a CPU, the same hook sets malloc to keep freed memory in these processes
(``teacher_farm.memory.keep_freed_memory``): the worker reduces logits slice after slice, and
glibc's defaults would fault every slice's blocks in anew.

A polling thread rather than ``prctl(PR_SET_PDEATHSIG)``: the death signal fires when the *thread*
that started the child exits, and ``serve`` starts the engine from a worker thread of asyncio.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from teacher_farm.memory import keep_freed_memory

#: Set (to its own pid) by the process that owns an engine; its engine's processes inherit it.
OWNER_ENV = "TEACHER_FARM_ENGINE_OWNER"
#: How long the engine's processes get to stop in order (and free their shared memory) before vLLM
#: kills them; its own default, 5 s, is too short for a busy machine.
ENGINE_STOP_S = 30.0
#: How often a child checks that its parent is still there.
POLL_S = 0.5
#: How long a child may take to stop by itself before it is killed.
GRACE_S = 5.0

_watching = False


def mark_engine_owner() -> None:
    """Call in the process that is about to start a vLLM engine (before it starts)."""
    os.environ[OWNER_ENV] = str(os.getpid())


def register() -> None:
    """The ``vllm.general_plugins`` entry point: in an engine's child processes, watch the parent
    (and, on a CPU, keep freed memory)."""
    global _watching
    owner = os.environ.get(OWNER_ENV)
    # Not under teacher-farm, or the owner itself (vLLM loads plugins in the main process too).
    if _watching or not owner or owner == str(os.getpid()):
        return
    _watching = True
    try:
        os.setpgid(0, 0)
    except OSError:  # already a group or session leader: signals to the owner's group miss it anyway
        pass
    parent = os.getppid()
    threading.Thread(target=_watch, args=(parent,), name="teacher-farm-parent-watch", daemon=True).start()
    if _on_cpu():
        keep_freed_memory()


def _on_cpu() -> bool:
    from teacher_farm.server.vllm_seam import on_cpu

    return on_cpu()


def _watch(parent: int) -> None:
    while os.getppid() == parent and parent != 1:
        time.sleep(POLL_S)
    _end_process_tree()


def _end_process_tree() -> None:
    """SIGTERM to this process (vLLM's own orderly stop), then SIGKILL to its children and itself."""
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    try:
        import psutil

        for child in psutil.Process().children(recursive=True):
            try:
                child.kill()
            except psutil.Error:
                pass
    except ImportError:  # vLLM depends on psutil; without it the children still watch their parent
        pass
    os.kill(os.getpid(), signal.SIGKILL)
