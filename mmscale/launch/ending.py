"""How a rank ends: `leave`, which every `mmscale train` process calls last (mmscale.cli).

Light on purpose (no DeepSpeed import): a recipe error ends through it too.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def leave(code: int) -> NoReturn:
    """End this process (a rank) with exit status `code`, skipping Python's finalization.

    About once in 60 multi-rank runs on a busy machine a rank aborted at exit with "terminate
    called without an active exception" (SIGABRT) after finishing its work. gloo's worker
    threads (ProcessGroupGloo's run loop) live as long as a reference to their group, and
    DeepSpeed keeps such references in its engine, its ZeRO optimizer and every ZeRO-3
    parameter, so destroy_process_group() cannot join them. A worker drops its finished work
    only after the waiting main thread has been released; when that frees tensors it takes the
    GIL, and if the main thread has meanwhile entered Py_FinalizeEx, Python ends the worker
    with pthread_exit inside a noexcept destructor: std::terminate. The backtrace:
    ProcessGroupGloo::runLoop -> ~AsyncWork -> TensorImpl::decref_pyobject ->
    gil_scoped_acquire -> take_gil -> PyThread_exit_thread. os._exit never finalizes, so no
    worker can meet it; what finalization would have done that matters here is done first:
    the trainer has closed its loaders, metrics file and W&B run by now.
    """
    if "wandb" in sys.modules:  # its service process, which wandb's atexit hook would stop
        try:
            sys.modules["wandb"].teardown(exit_code=code)
        except Exception:  # noqa: BLE001 - W&B's failures must never cost the exit status
            pass
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (a reader that went away) must not keep the process alive
            pass
    os._exit(code)
