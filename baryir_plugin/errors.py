"""Errors that come from the user's input, and the one boundary every command runs behind.

A bad option file, image, checkpoint or environment is not a bug: the user needs one line that names
the file or option and says how to fix it, not a traceback. Our code raises one of the classes below
where the bad input is first seen; exceptions of third-party libraries that can only mean bad input
(a YAML parse error, a file that does not exist) are translated where they arise or, failing that, by
:func:`user_message` at the boundary. Everything else is a bug and keeps its traceback.

    BaryIRError            base; exit status 1
    ├── UsageError         a command line that cannot be run; exit status 2
    ├── OptionError        an option file or a value in it (also a ValueError)
    ├── DataError          an image, folder, LMDB or pairing of files (also a ValueError)
    ├── CheckpointError    a .pth/.state/official release file (also a ValueError)
    ├── TrainingError      training that cannot go on, e.g. a loss that stays non-finite
    └── SetupError         the machine: missing compiler, GPU, plugin, disk space

:func:`run_guarded` is the boundary: ``basicsr train|test``, ``baryir ...`` and the scripts run their
work through it. ``--debug`` on their command line, or ``BARYIR_DEBUG=1``, adds the traceback to the
one line.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import sys
import traceback
from typing import Callable, Iterable, Optional

DEBUG_ENV = 'BARYIR_DEBUG'


class BaryIRError(Exception):
    """An error in the user's input; its message is the one line the user sees."""

    exit_code = 1


class UsageError(BaryIRError):
    exit_code = 2


class OptionError(BaryIRError, ValueError):
    pass


class DataError(BaryIRError, ValueError):
    pass


class CheckpointError(BaryIRError, ValueError):
    pass


class TrainingError(BaryIRError, RuntimeError):
    pass


class SetupError(BaryIRError, RuntimeError):
    pass


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or an empty string."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f' (did you mean {close[0]!r}?)' if close else ''


# --------------------------------------------------------------------------------------------------
# messages
_WORKER_ORIGINAL = re.compile(r'Original Traceback \(most recent call last\):')


def _worker_message(text: str) -> str:
    """The original message of an exception re-raised by a DataLoader worker (whose text holds the
    worker's traceback): its last ``Type: message`` line."""
    if not _WORKER_ORIGINAL.search(text):
        return text
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else text
    match = re.match(r'^[\w.]+(?:Error|Exception|Warning|Exit)?: (.*)$', last)
    return match.group(1) if match else last


def one_line(text: str) -> str:
    return ' '.join(_worker_message(str(text)).split())


def _from_worker(exc: BaseException) -> bool:
    return bool(_WORKER_ORIGINAL.search(str(exc)))


def user_message(exc: BaseException) -> Optional[str]:
    """The one-line message for an exception caused by the user's input, or None for a bug."""
    if isinstance(exc, BaryIRError):
        return one_line(exc)
    try:
        import yaml
        if isinstance(exc, yaml.YAMLError):
            mark = getattr(exc, 'problem_mark', None)
            where = f'{mark.name}:{mark.line + 1}:{mark.column + 1}: ' if mark is not None else ''
            problem = getattr(exc, 'problem', None) or str(exc)
            return one_line(f'{where}not valid YAML ({problem}); fix the file at that line.')
    except ImportError:  # pragma: no cover
        pass
    mem_error = getattr(__import__('torch'), 'OutOfMemoryError', MemoryError) if 'torch' in sys.modules else MemoryError
    if isinstance(exc, (MemoryError, mem_error)):
        return ('out of memory; lower datasets.train.batch_size_per_gpu or gt_size, turn on train.checkpointing '
                '(activation checkpointing), or use a smaller network.')
    if isinstance(exc, OSError) and not _from_worker(exc):
        name = exc.filename if exc.filename is not None else None
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return one_line(f'{name or "disk"}: {reason}; free some space (nothing was overwritten).')
        if isinstance(exc, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                            PermissionError)):
            if name is None:  # raised with a message of its own
                return one_line(exc)
            return one_line(f'{name}: {reason}; check the path (relative paths are relative to {os.getcwd()}).')
    if type(exc).__module__ == 'lmdb':  # lmdb.Error and its kinds name the file
        return one_line(f'{exc} (an LMDB that cannot be opened or read; rebuild it with scripts/make_lmdb.py).')
    return None


# --------------------------------------------------------------------------------------------------
# the boundary
def debug_requested(argv: Optional[Iterable[str]] = None) -> bool:
    if os.environ.get(DEBUG_ENV, '').strip().lower() not in ('', '0', 'false', 'no'):
        return True
    return argv is not None and '--debug' in list(argv)


def _log_to_files(line: str) -> None:
    """Put the error into the run's log files too (the terminal has already been told)."""
    logger = logging.getLogger('basicsr')
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, line, None, None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            try:
                handler.handle(record)
            except Exception:  # noqa: BLE001 (a full disk must not hide the message itself)
                pass


def report(prog: str, exc: BaseException, debug: bool = False, aliases: Optional[dict] = None) -> int:
    """Print the error for ``exc`` (one line, or the traceback and a line naming it a bug); returns the
    exit status. ``aliases``: {path the code used: path the user gave} (e.g. a resolved copy of an option
    file), replaced in the message."""
    message = user_message(exc)
    for used, given in (aliases or {}).items():
        message = message.replace(used, given) if message else message
    sys.stdout.flush()
    if message is None:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        line = (f'{prog}: internal error: {type(exc).__name__}: {one_line(exc)} -- this is a bug (in baryir-plugin, '
                'or an input it does not check yet); please report it with the traceback above and the command.')
        print(line, file=sys.stderr)
        _log_to_files(line)
        return 1
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    line = f'{prog}: error: {message}'
    print(line, file=sys.stderr)
    _log_to_files(line)
    return getattr(exc, 'exit_code', 1)


class Terminated(BaseException):
    """SIGTERM, as an exception: the run stops at once, and says so in one line."""


def _on_sigterm(signum, frame):
    raise Terminated()


def run_guarded(prog: str, work: Callable[[], Optional[int]], debug: bool = False,
                aliases: Optional[dict] = None) -> int:
    """Run ``work()`` behind the error boundary; returns its exit status (0 for None).

    ``SystemExit`` passes through (argparse's usage errors keep their status 2), Ctrl-C ends with
    status 130 and one line, SIGTERM with 143 and one line.
    """
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        status = work()
        return 0 if status is None else int(status)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        sys.stdout.flush()
        print(f'{prog}: interrupted.', file=sys.stderr)
        return 130
    except Terminated:
        sys.stdout.flush()
        print(f'{prog}: terminated (SIGTERM).', file=sys.stderr)
        return 143
    except BaseException as exc:  # noqa: BLE001 (this is the boundary)
        if isinstance(exc, BrokenPipeError) and _stdout_reader_gone():
            # Nothing more can reach the reader; point stdout at /dev/null so that the interpreter's
            # final flush does not raise again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        return report(prog, exc, debug=debug or debug_requested(), aliases=aliases)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end has been closed (poll reports an error on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() (Windows), or stdout has no descriptor
        return False


def guarded_main(prog: str, main: Callable[[Optional[list]], Optional[int]],
                 argv: Optional[list] = None) -> int:
    """``sys.exit(guarded_main('scripts/x.py', main))`` for a script whose ``main(argv)`` parses its flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != '--debug']
    return run_guarded(prog, lambda: main(argv), debug=debug)
