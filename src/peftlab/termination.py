"""SIGTERM stops a command the way Ctrl-C does, so its cleanup runs.

    with terminate_as_interrupt():
        run_the_command()        # a SIGTERM here raises Terminated (a KeyboardInterrupt)

Python's default for SIGTERM is to die on the spot: no ``finally`` block, no context manager's exit.
Then an export's staging folder and llama.cpp scratch folder, or a compare child's temporary files,
stay on disk. ``kill``, ``timeout``, job schedulers, torchrun and ``peftlab compare`` (stopping its
child run) all send SIGTERM, so it is turned into :class:`Terminated`, which every
``except KeyboardInterrupt`` (compare's "continue with --resume" message included) already handles.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

#: The exit status of a process ended by SIGTERM, as a shell reports it (128 + 15).
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """The process was sent SIGTERM."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(f"stopped by {signal.Signals(signum).name}")


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated`. Only where Python may set a handler (the
    main thread) and only over the default one: a host program's own handler is left alone."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
