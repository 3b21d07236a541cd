"""A ``megedit serve`` subprocess on a free localhost port, for tests and ``bench/serve.py``.

    with ServerProcess("runs/x", ["--plain"]) as server:
        httpx.post(server.url + "/v1/completions", json={"prompt": "..."})

It is the real command over real HTTP: startup returns once ``/health`` answers, and a server that
exits first raises with the tail of its log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS's pick; another process could take it before the server does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, run: str | Path, args: Sequence[str] = (), host: str = "127.0.0.1", port: int | None = None,
                 startup_timeout_s: float = 600.0, env: dict | None = None):
        self.run, self.args, self.host = str(run), list(args), host
        self.port = port or free_port(host)
        self.startup_timeout_s = startup_timeout_s
        self.env = env
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile("w+b", prefix="megedit-serve-", suffix=".log", delete=False)
        self.health: dict = {}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "megedit.cli", "serve", "--run", self.run, "--host", self.host,
                "--port", str(self.port), *self.args]

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.stop()
        self._log.close()
        if exc_type is None:  # keep the server's log only where something went wrong
            self.log_path.unlink(missing_ok=True)

    @property
    def log_path(self) -> Path:
        return Path(self._log.name)

    def start(self) -> None:
        env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        try:
            self.health = self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self) -> dict:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"megedit serve exited with status {self.proc.returncode} before it served:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    return json.loads(response.read())
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)  # still loading the run
        raise TimeoutError(f"megedit serve did not answer /health within {self.startup_timeout_s:.0f} s:\n"
                           f"{self.log_tail()}")

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """Ask the server to shut down (SIGINT, as Ctrl-C: uvicorn finishes open requests), then kill it."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.is_file():
            return ""
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])
