"""StopSignals: a stop signal sets a flag (the trainer saves, the launcher lets its ranks stop)
and the handlers it replaced come back when it is closed."""

from __future__ import annotations

import os
import signal

import pytest

from mmscale.launch.ending import StopSignals
from tests.helpers.processes import wait_for


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_a_stop_signal_only_sets_the_flag_and_the_old_handler_comes_back(sig):
    calls = []
    previous = signal.signal(sig, lambda signum, frame: calls.append(signum))
    try:
        with StopSignals() as stop:
            assert not stop.requested()
            os.kill(os.getpid(), sig)
            assert wait_for(stop.requested)
            assert stop.received == {sig} and calls == []
        os.kill(os.getpid(), sig)
        assert wait_for(lambda: calls == [sig])
        assert not any(signal.getsignal(s) == stop._record for s in StopSignals.SIGNALS)
    finally:
        signal.signal(sig, previous)


def test_the_launcher_notes_every_stop_signal_and_restores_the_handlers():
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda *_: seen.append("outer"))
    try:
        with StopSignals() as log:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGUSR2)
        assert log.received == {signal.SIGTERM, signal.SIGUSR2} and seen == []
        os.kill(os.getpid(), signal.SIGUSR2)
        assert seen == ["outer"]  # submitit's handler is back
    finally:
        signal.signal(signal.SIGUSR2, previous)
