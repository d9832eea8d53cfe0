"""Shared pieces of the benchmarks: a fake API in its own process, percentiles, JSON output, machine info."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeApiProcess:
    """`claude-runtime fake-api` in a separate process, so the load generator and the server don't share a GIL."""

    def __init__(self, *args: str, port: int | None = None, host: str = "127.0.0.1",
                 advertise: str | None = None) -> None:
        # host="0.0.0.0" with advertise=<this node's IP> serves callers on other machines of a real cluster
        self.port = port or free_port()
        self.url = f"http://{advertise or '127.0.0.1'}:{self.port}"
        self._local = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "runtime.cli", "fake-api", "--host", host, "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                self.stats()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(self.proc.stderr.read().decode()[-2000:])
                time.sleep(0.1)
        raise RuntimeError("fake API did not start")

    def _call(self, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self._local + path, data=data, method="POST" if data is not None else "GET",
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            text = resp.read().decode()
        return json.loads(text) if text else {}

    def stats(self) -> dict:
        return self._call("/_fake/stats")

    def reset(self) -> None:
        self._call("/_fake/reset", {})

    def configure(self, **body: Any) -> None:
        self._call("/_fake/config", body)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def __enter__(self) -> "FakeApiProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine()}


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "machine": machine(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), **payload}
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path
