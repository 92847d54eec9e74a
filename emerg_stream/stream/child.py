"""What the two test brokers share: a server in a child process of ours.

:class:`ChildServer` owns the process, its output file and the paused flag, and gives
:class:`~emerg_stream.stream.broker.EmbeddedBroker` (Tansu) and
:class:`~emerg_stream.stream.apache_kafka.ApacheKafka` one way to report a failure, to
signal the child, and to end it: SIGCONT first if it is paused (a stopped process
cannot exit), the server's own stop signal, SIGKILL after ``stop_timeout_s``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import structlog

from emerg_stream.errors import ConfigError, TransientError

log = structlog.get_logger(__name__)


class ChildServer:
    """Process bookkeeping of a server run as our child (subclasses start it).

    Subclasses set ``_proc`` and ``_log`` when they start the child, and define
    :meth:`start`, :meth:`stop`, :meth:`log_tail`, :attr:`_what` (how failure messages
    name the server) and ``_noun`` (how "not running" messages do).
    """

    #: How error messages name the server ("the embedded broker").
    _noun = "the server"
    stop_timeout_s: float

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._paused = False

    @property
    def _what(self) -> str:
        """The server as failure messages name it."""
        raise NotImplementedError

    def start(self) -> Self:
        """Start the child; subclasses define it."""
        raise NotImplementedError

    #: The log event :meth:`stop` writes.
    _stopped_event = "server_stopped"

    def stop(self) -> None:
        """Stop the child (its stop signal, then SIGKILL: ``_terminate``). Idempotent."""
        if self._proc is None:
            return
        pid = self._proc.pid
        code = self._terminate()
        log.info(self._stopped_event, pid=pid, returncode=code)

    def _terminate(self) -> int | None:
        """End the child and clean up after it; subclasses define it."""
        raise NotImplementedError

    #: How much of the end of the child's output :meth:`log_tail` reads.
    _LOG_TAIL_BYTES = 32768

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines the child wrote (stdout and stderr)."""
        if self._log is None:
            return ""
        try:
            raw = Path(self._log.name).read_bytes()[-self._LOG_TAIL_BYTES :]
        except OSError:
            return ""
        return "\n".join(self._clean_log(raw.decode("utf-8", "replace")).splitlines()[-lines:])

    def _clean_log(self, text: str) -> str:
        """What :meth:`log_tail` shows of the output (subclasses strip colours)."""
        return text

    def pause(self) -> None:
        """Freeze the child (SIGSTOP): connections stay open but nothing answers."""
        self._signal(signal.SIGSTOP)
        self._paused = True

    @property
    def pid(self) -> int:
        """Process id of the child (only while running)."""
        if self._proc is None:
            raise ConfigError(f"{self._noun} is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the child is alive (a paused one is running)."""
        return self._proc is not None and self._proc.poll() is None

    def resume(self) -> None:
        """Unfreeze a paused child (SIGCONT)."""
        self._signal(signal.SIGCONT)
        self._paused = False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- for subclasses ----------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise TransientError(self._failure(f"exited with code {self._proc.returncode}"))

    def _failure(self, what: str) -> str:
        tail = self.log_tail()
        return f"{self._what} {what}" + (f"; its log ends:\n{tail}" if tail else "")

    def _signal(self, sig: signal.Signals) -> None:
        if not self.running or self._proc is None:
            raise ConfigError(f"{self._noun} is not running")
        os.kill(self._proc.pid, sig)

    def _end_child(self, stop_signal: signal.Signals, killed_event: str) -> int | None:
        """End the child (``stop_signal``, SIGKILL after ``stop_timeout_s``); its exit code.

        Also closes the output file; a caller that removes it reads ``self._log.name``
        first.
        """
        proc, self._proc = self._proc, None
        code: int | None = None
        if proc is not None:
            if proc.poll() is None:
                if self._paused:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGCONT)  # a stopped process cannot exit
                proc.send_signal(stop_signal)
                try:
                    code = proc.wait(self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning(killed_event, pid=proc.pid, after_s=self.stop_timeout_s)
                    proc.kill()
                    code = proc.wait()
            else:
                code = proc.returncode
        self._paused = False
        if self._log is not None:
            self._log.close()
            self._log = None
        return code
