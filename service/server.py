"""``serve()``: run the app under uvicorn (``dpo4rec serve --run DIR`` calls it).

Graceful shutdown: on SIGTERM uvicorn stops accepting connections and waits up to
``timeout_graceful_shutdown`` for open requests; then the lifespan drains whatever is still counted in
flight (``drain_timeout_s``) before it stops the engine and Redis. A broken run directory is reported
before uvicorn starts, as one clear message.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rundir.manifest import RunDirError, verify
from rundir.reader import REQUIRED_FILES
from rundir.versions import resolve
from service.logging import configure_logging
from service.main import create_app
from service.settings import Settings

log = logging.getLogger(__name__)


def serve(
    run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, env_file: str | Path | None = None, **overrides: Any
) -> None:
    """Serve ``run_dir`` until interrupted; other settings from ``DPO4REC_*`` / ``env_file`` / ``overrides``."""
    import uvicorn

    settings = Settings(_env_file=env_file, run_dir=Path(run_dir), **overrides)  # type: ignore[call-arg]
    configure_logging(settings.log_level, settings.json_logs)
    try:
        verify(resolve(settings.run_dir), required=REQUIRED_FILES, checksums=False)  # fast: the lifespan checks sums
    except RunDirError as e:
        raise SystemExit(f"cannot serve: {e}") from None
    app = create_app(settings)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_config=None,  # keep our handlers (JSON lines with the request id)
        access_log=False,  # our middleware writes the access line
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
        proxy_headers=True,
    )
