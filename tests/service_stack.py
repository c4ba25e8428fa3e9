"""Helpers of the service tests: free loopback ports, an own redis-server, service processes,
health waits and metric scraping. Every wait is bounded."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from redis_required import no_redis

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Redis:
    """An own redis-server in a tmp dir (never the shared one on 6379)."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        if shutil.which("redis-server") is None:
            no_redis("redis-server is not installed")
        self.folder = folder
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "Redis":
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_timeout=0.2).ping():
                    return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


class Service:
    """`python -m services.<name>` with flags; logs to a file; SIGTERM then SIGKILL on stop."""

    def __init__(self, name: str, folder: Path, **flags) -> None:
        self.name = name
        self.port = flags.pop("port", None) or free_port()
        self.metrics_port = flags.pop("metrics_port", None) or free_port()
        self.flags = {"port": self.port, "metrics_port": self.metrics_port, "threads": 1, **flags}
        if name == "policy":
            self.flags.pop("threads")
        if name == "gateway":  # HTTP, no torch
            self.flags.pop("threads")
        if name == "verifier":
            # These stacks test the pipeline, so they keep the torch engine (no export per tiny
            # model); the default onnxruntime backend has its own stacks (test_backends_pipeline.py)
            # and `blockpilot up` tests (test_stack_cli.py).
            self.flags.setdefault("backend", "torch")
        self.log_path = folder / f"{name}-{self.port}.log"
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Service":
        args = [sys.executable, "-m", f"services.{self.name}"]
        for key, value in self.flags.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT)
        return self

    def wait_serving(self, timeout: float = 120) -> "Service":
        from blockpilot.serving.stack import health_status

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log()[-2000:]}")
            if self.name == "gateway":
                if http_status(f"http://{self.address}/health") == 200:
                    return self
            elif health_status(self.address, f"blockpilot.v1.{self.name.capitalize()}", timeout_s=0.5) == "SERVING":
                return self
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not SERVING after {timeout} s: {self.log()[-2000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 15) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode

    def metric(self, name: str, **labels) -> float:
        """A sample's value from /metrics (0.0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total


class TcpProxy:
    """A load-balanced address in front of service replicas, as kube-proxy is for a ClusterIP
    Service: each TCP connection is forwarded to the backend current when it opens, and stays there.
    `point_to` switches the backend; with drop=True it also closes the open connections (as a
    drained pod does), so their clients reconnect, to the new backend."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._backend: int | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def point_to(self, port: int, *, drop: bool = True) -> None:
        with self._lock:
            self._backend = port
            dropped, self._open = (self._open, set()) if drop else (set(), self._open)
        for sock in dropped:
            _close_socket(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self._backend), timeout=5)
                upstream.settimeout(None)
            except (OSError, TypeError):  # no backend, or it is down: refuse, as a Service without endpoints
                _close_socket(client)
                continue
            with self._lock:
                self._open |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):  # one side gone: the connection is over for both
            _close_socket(sock)
            with self._lock:
                self._open.discard(sock)

    def close(self) -> None:
        _close_socket(self._listener)  # (a plain close would not wake the accept)
        with self._lock:
            dropped, self._open = self._open, set()
        for sock in dropped:
            _close_socket(sock)


def _close_socket(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of a GET (None when nothing answers)."""
    import urllib.error

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
