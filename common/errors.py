"""One clear line for bad input: `UserError` + `run_main` (exit code 2, no traceback)."""
import functools
import sys


class UserError(Exception):
    """A problem the user can fix (missing data, bad checkpoint, impossible flag).

    The message is printed as one line naming the problem and the fix.
    """


def fail(msg):
    """Raise a UserError with `msg` (a one-line message: what is wrong and how to fix it)."""
    raise UserError(msg)


def run_main(main, *args, **kwargs):
    """Call `main(*args, **kwargs)`; a UserError becomes `error: <msg>` on stderr and exit 2."""
    try:
        return main(*args, **kwargs)
    except UserError as e:
        msg = " ".join(str(e).split())  # always one line
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        message = getattr(e, "message", "") or "no resumable checkpoint was written by this step"
        print(f"interrupted: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 130))


def cli(main):
    """Decorator form of run_main, for `if __name__ == '__main__': main()` scripts."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        return run_main(main, *args, **kwargs)
    return wrapper
