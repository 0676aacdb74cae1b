"""SIGINT/SIGTERM during training: finish the current batch, save a resumable checkpoint, exit.

    from common import interrupt
    with interrupt.armed():                       # around the training loop
        for i, batch in enumerate(loader):
            ...                                   # one step
            if interrupt.requested():
                save_checkpoint(state_at_this_batch, path)
                raise interrupt.Interrupted(f"resumable checkpoint saved: {path}; resume with --resume {path}")

Outside `armed()` (data loading, evaluation) a signal stops at once, as usual, but as a KeyboardInterrupt
also for SIGTERM, so that `finally` blocks and atexit handlers (tensorboard writers) still run. A second
signal while armed stops at once too. `common.errors.run_main` prints the message and exits 130 (SIGINT)
or 143 (SIGTERM).
"""
import contextlib
import signal
import sys
import threading


class Interrupted(KeyboardInterrupt):
    """Raised on SIGINT/SIGTERM; `message` says what was saved and how to resume."""

    def __init__(self, message="", signum=signal.SIGINT):
        super().__init__(message)
        self.message = message
        self.signum = signum

    @property
    def exit_code(self):
        return 128 + int(self.signum)


_state = {"armed": 0, "signum": None, "installed": False}


def _handler(signum, frame):
    if _state["armed"] and _state["signum"] is None:
        _state["signum"] = signum
        print(f"\n{signal.Signals(signum).name} received: saving a resumable checkpoint after this batch "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)
        return
    raise Interrupted(f"stopped by {signal.Signals(signum).name}", signum)


def install():
    """Route SIGINT and SIGTERM through this module (main thread only; idempotent)."""
    if _state["installed"] or threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(sig, _handler)
    _state["installed"] = True


@contextlib.contextmanager
def armed():
    """Within this block a first signal only sets `requested()`; the loop saves and raises Interrupted."""
    install()
    _state["armed"] += 1
    try:
        yield
    finally:
        _state["armed"] -= 1


def requested():
    """The pending signal number (SIGINT/SIGTERM) or None."""
    return _state["signum"]


def stop(message):
    """Raise Interrupted for the pending signal with `message` (what was saved, how to resume)."""
    signum = _state["signum"] or signal.SIGINT
    _state["signum"] = None
    raise Interrupted(message, signum)


def save_and_stop(path, state, log=None, where=""):
    """Write the resumable `state` to `path` atomically, flush the run's log, raise Interrupted saying how
    to resume (`where`: 'epoch 0 batch 5')."""
    from common.checkpoint import save_checkpoint   # here, not above: this module imports no torch
    save_checkpoint(state, path)
    if log is not None and hasattr(log, "flush"):
        log.flush()
    stop(f"{where + ': ' if where else ''}resumable checkpoint saved to {path}; continue with the same flags and "
         f"--resume {path}")
