"""Run `llama2 serve` as a child process: for tests, benchmarks and scripts.

    with ServerProcess("--model", "smollm2-135m-instruct") as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none")

The server listens on a free loopback port (`--port 0`); the context manager returns
once `/health` answers and stops the server with SIGINT (a graceful shutdown) on exit.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import Llama2Error

__all__ = ["ServerProcess"]

_LISTENING = re.compile(r" on (http://\S+?)/ ")


class ServerProcess:
    """A `python -m llama2.cli serve ARGS --port 0` child process.

    Args:
        args: `llama2 serve` options (`--port` is chosen here).
        host: the address to listen on.
        startup_timeout: seconds to wait for `/health`.
        env: environment of the child (default: this one).
    """

    def __init__(self, *args: str, host: str = "127.0.0.1", startup_timeout: float = 180.0, env=None):
        self.args = [sys.executable, "-m", "llama2.cli", "serve", *args, "--host", host, "--port", "0"]
        self.startup_timeout = startup_timeout
        self.env = env
        self.base_url = ""
        self.process: subprocess.Popen | None = None
        self._log_fd, log_name = tempfile.mkstemp(prefix="llama2-serve-", suffix=".log")
        self.log_path = Path(log_name)

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)

    def start(self) -> None:
        """Start the child and wait until it serves; raise `Llama2Error` (with its log) if it does not."""
        self.process = subprocess.Popen(
            self.args, stdin=subprocess.DEVNULL, stdout=self._log_fd, stderr=self._log_fd, env=self.env
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise Llama2Error(f"llama2 serve exited with {self.process.returncode}: {self.log()[-2000:]}")
            match = _LISTENING.search(self.log())
            if match and self._healthy(match.group(1)):
                self.base_url = match.group(1)
                return
            time.sleep(0.1)
        self.stop()
        raise Llama2Error(f"llama2 serve did not start within {self.startup_timeout} s: {self.log()[-2000:]}")

    def stop(self, timeout: float = 60.0) -> int | None:
        """Interrupt the child (SIGINT, a graceful shutdown; terminate on Windows) and wait for it.

        Returns:
            The exit status, or None if it was never started.
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT if os.name == "posix" else signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1
        return self.process.returncode

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else -1

    def log(self) -> str:
        """Everything the child wrote so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    @staticmethod
    def _healthy(base_url: str) -> bool:
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False
