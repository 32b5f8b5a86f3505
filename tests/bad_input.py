"""Running a command on a bad input and checking what the user sees: one line, the right exit status,
no traceback, the file or option named."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence


@dataclass
class Outcome:
    status: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err

    def error_lines(self, prog: str) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.startswith(f'{prog}: error:')]


@contextlib.contextmanager
def _cwd(path: Optional[Path]):
    old = os.getcwd()
    if path is not None:
        os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _fresh_basicsr_logger() -> None:
    """Forget BasicSR's root logger, as a new process would: it is set up once per process, with its
    stream bound to the stderr of that moment and its file in the first run's folder."""
    import logging

    from basicsr.utils import logger as basicsr_logger

    for name in list(basicsr_logger.initialized_logger):
        log = logging.getLogger(name)
        for handler in list(log.handlers):
            log.removeHandler(handler)
            handler.close()
    basicsr_logger.initialized_logger.clear()


def run_inprocess(main: Callable[[list], int], argv: Sequence[str], cwd: Optional[Path] = None) -> Outcome:
    """Call a command's ``main(argv)`` in this process and capture what it prints (the fast way: no new
    interpreter, no second import of torch)."""
    _fresh_basicsr_logger()
    out, err = io.StringIO(), io.StringIO()
    old_argv = list(sys.argv)
    with _cwd(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(list(argv))
        except SystemExit as e:  # argparse's usage errors
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        finally:
            sys.argv = old_argv
    return Outcome(int(status or 0), out.getvalue(), err.getvalue())


def run_subprocess(cmd: Sequence[str], cwd: Path, timeout: float = 300, env: Optional[dict] = None) -> Outcome:
    full_env = {**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})}
    full_env.pop('BARYIR_DEBUG', None)
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def assert_clean_error(outcome: Outcome, prog: str, *needles: str, status: int = 1) -> str:
    """The command ended with ``status``, printed exactly one ``<prog>: error: ...`` line naming every
    needle, and no traceback. Returns the line."""
    detail = f'\n--- stdout ---\n{outcome.out[-3000:]}\n--- stderr ---\n{outcome.err[-3000:]}'
    assert 'Traceback (most recent call last)' not in outcome.text, 'a traceback was printed' + detail
    lines = outcome.error_lines(prog)
    assert len(lines) == 1, f'expected one "{prog}: error:" line, got {len(lines)}' + detail
    assert outcome.status == status, f'exit status {outcome.status}, expected {status}' + detail
    for needle in needles:
        assert str(needle) in lines[0], f'{needle!r} not named in: {lines[0]}'
    return lines[0]
