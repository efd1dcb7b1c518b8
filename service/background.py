"""The next model version, trained in the background while the service answers from the current one.

``dpo4rec serve --train-in-background CONFIG`` (``make serve`` passes the default configuration): when the
served run root has no version trained with CONFIG yet, the service starts ``dpo4rec train --config CONFIG
--out ROOT`` as a child process at the lowest CPU priority (nice 19: the requests come first), which writes a
new version into the root and moves ``current`` when it is whole; the rollout (``service.rollout``) then
swaps it in live. ``/readyz`` and a log line say what it is doing (stage, elapsed, an ETA from an earlier run
of the same configuration in the root when there is one). Stopping the service stops the training; the
next ``make serve`` starts it again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from pathlib import Path

from rundir.versions import trained_with, versions

log = logging.getLogger(__name__)

STATUS = ".training.json"
LOG = ".training.log"


class BackgroundTraining:
    def __init__(self, root: Path, config: str, nice: int = 19):
        self.root, self.config, self.nice = Path(root), config, nice
        self.process: subprocess.Popen[bytes] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stage: str | None = None

    def needed(self) -> bool:
        """No version of the root was trained with this configuration yet."""
        return not any(trained_with(v, self.config) for v in versions(self.root))

    def start(self, on_done: Callable[[], Awaitable[object]]) -> None:
        """Start the training process and a watcher that logs its stages and calls ``on_done`` when it published."""
        status = self.root / STATUS
        status.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "dpo4rec", "train", "--config", self.config, "--out", str(self.root)]
        with open(self.root / LOG, "ab") as out:
            self.process = subprocess.Popen(  # noqa: S603  # our own CLI, our own arguments
                [*cmd, "--status", str(status)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # stopped as a group (its vLLM engines included)
            )
        # niced from here, not in a preexec_fn (unsafe in a threaded process): the trainer's engines and workers
        # are started later by its main thread and inherit it
        os.setpriority(os.PRIO_PROCESS, self.process.pid, self.nice)
        log.info("training %s in the background (pid %d, nice +%d): %s", self.config, self.process.pid, self.nice,
                 self.root / LOG)  # fmt: skip
        self._watch = asyncio.create_task(self._follow(on_done), name="background-training")

    async def _follow(self, on_done: Callable[[], Awaitable[object]]) -> None:
        assert self.process is not None
        while self.process.poll() is None:
            await asyncio.sleep(5)
            stage = str(self._status().get("stage") or "") or None
            if stage and stage != self._stage:
                self._stage = stage
                log.info("background training: %s", self.describe())
        log.info("background training: %s", self.describe())
        if self.process.returncode == 0:
            await on_done()  # the new version is published: load it now rather than at the next poll

    def _status(self) -> dict[str, object]:
        with suppress(OSError, ValueError):
            return dict(json.loads((self.root / STATUS).read_text()))
        return {}

    def _eta(self, elapsed: float) -> str:
        """From the stage times of an earlier version of this configuration in the root, if any."""
        for version in reversed(versions(self.root)):
            if trained_with(version, self.config):
                with suppress(OSError, ValueError, KeyError):
                    doc = json.loads((self.root / version / "metrics.json").read_text())
                    total = float(sum(doc["stage_seconds"].values()))
                    return f"ETA ~{max(0.0, total - elapsed) / 60:.0f} min"
        return "no ETA (first run of this configuration here)"

    def describe(self) -> str:
        if self.process is None:
            return f"{self.config}: not started"
        code = self.process.poll()
        if code == 0:
            return f"{self.config}: done, published"
        if code is not None:
            return f"{self.config}: failed (exit {code}; see {self.root / LOG})"
        status = self._status()
        elapsed = time.time() - float(str(status.get("started") or time.time()))
        stage = status.get("stage") or "between stages"
        done = len(status.get("done") or {})  # type: ignore[arg-type]
        return f"{self.config}: stage {stage} ({done} done, {elapsed / 60:.0f} min elapsed, {self._eta(elapsed)})"

    async def close(self) -> None:
        """Stop the training (its process group) and the watcher."""
        if self._watch is not None:
            self._watch.cancel()
            with suppress(asyncio.CancelledError):
                await self._watch
        if self.process is not None and self.process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(self.process.wait, 30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
            log.info("background training of %s stopped with the service", self.config)
