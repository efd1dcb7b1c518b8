"""The ``dpo4rec`` command line: training, batch jobs and the service behind one typer app.

Each command imports its side lazily, so ``dpo4rec serve`` never loads TRL and ``dpo4rec train`` never
loads FastAPI. Environment defaults for the CPU engine are set here, before vLLM is imported.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from llm.engine import apply_env_defaults

T = TypeVar("T")
app = typer.Typer(help="DPO4Rec: LLM re-ranking for recommendations, aligned by DPO.", no_args_is_help=True)
console = Console()


def _setup(verbose: bool) -> None:
    apply_env_defaults()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")]


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="run directory to write (atomically)")] = Path("runs/default"),
    config: Annotated[str, typer.Option(help="config name in training/configs or a YAML path")] = "default",
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. llm.max_tokens=64")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run directory")] = False,
    root_dir: Annotated[
        bool, typer.Option("--root", help="OUT is a run root: write a new version into it and move current")
    ] = False,
    status: Annotated[Path | None, typer.Option(help="a JSON file kept up to date with the running stage")] = None,
    verbose: Verbose = False,
) -> None:
    """Run the offline pipeline: data, preferences, retrievers, index, evaluation, report. Into a run root (an
    OUT with a current pointer, or --root), the run becomes a new version and current moves to it."""
    _setup(verbose)
    from rundir.versions import STAMP, is_root, publish, version_prefix
    from training.config import load_config
    from training.pipeline import run_pipeline

    cfg = load_config(config, set_)
    root = None
    if is_root(out) or root_dir:  # a run root: the run is a new version in it, and current moves when it is whole
        root, out = out, out / f"{version_prefix(config)}{time.strftime(STAMP)}"
    doc = run_pipeline(cfg, out, overwrite=overwrite, status=status)
    if root is not None:
        publish(root, out.name)
        console.print(f"{root}/current -> {out.name}")
    table = Table(title=f"test metrics, {doc['users']} users")
    for col in ("system", "NDCG@10", "Recall@10", "MRR@10"):
        table.add_column(col)
    for row in doc["rows"]:
        table.add_row(row["system"], *(f"{row[m]:.4f}" for m in ("NDCG@10", "Recall@10", "MRR@10")))
    console.print(table)
    console.print(f"run directory: {out}  (report: {out / 'report.md'})")
    console.print(f"stage seconds: {json.dumps(doc['stage_seconds'])}")


@app.command()
def serve(
    run: Annotated[Path, typer.Option(help="run directory, or run root (its current version), to serve")] = Path(
        "runs/default"
    ),
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    train_in_background: Annotated[
        str | None,
        typer.Option(help="a config to train into the run root at low priority and roll out live when it lands"),
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Serve POST /rerank on a run directory or run root (settings from DPO4REC_* variables)."""
    apply_env_defaults()  # no console handler: the service writes its own log lines (one per record)
    from service.server import serve as run_server

    extra: dict[str, str] = {"log_level": "DEBUG"} if verbose else {}
    if train_in_background:
        extra["background_train_config"] = train_in_background
    run_server(run_dir=run, host=host, port=port, **extra)


@app.command()
def engine(
    run: Annotated[Path, typer.Option(help="run directory or run root (its current version) to serve")] = Path(
        "runs/default"
    ),
    job: Annotated[str, typer.Option(help="rerank, preference, or all (the jobs the service runs)")] = "all",
    host: Annotated[str, typer.Option(help="interface to bind")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    print_only: Annotated[bool, typer.Option("--print", help="print the vllm serve command, do not run it")] = False,
) -> None:
    """Start the engine tier's server for a run: `vllm serve` with the service's engine settings (DPO4REC_*), the
    jobs' weights under the names the service asks for. Point the service at it with DPO4REC_ENGINE_URL."""
    import os
    import shlex

    apply_env_defaults()
    from service.engines import engine_command
    from service.settings import Settings

    try:
        argv, env = engine_command(Settings(run_dir=run), run, job, host, port)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    shown = ["***" if i and argv[i - 1] == "--api-key" else a for i, a in enumerate(argv)]
    if print_only:
        typer.echo(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + (" " if env else "") + shlex.join(shown))
        return
    console.print(f"[bold]vllm serve[/] {shlex.join(shown[3:])}")
    os.execve(argv[0], argv, {**env, **os.environ})  # an explicit variable wins; signals go to vllm itself


Ray = Annotated[bool, typer.Option("--ray", help="run the chunks on Ray Data actors (RAY_ADDRESS or local Ray)")]
RayActors = Annotated[int, typer.Option(help="Ray actors, each with its own engine", min=1)]
ChunkSize = Annotated[int, typer.Option(help="requests in flight together (one engine batch) per checkpoint", min=1)]


@app.command()
def preferences(
    run: Annotated[Path, typer.Option(help="run directory whose preferences to refresh")] = Path("runs/default"),
    users: Annotated[list[str] | None, typer.Option("--user", help="only these users (repeat); default all")] = None,
    histories: Annotated[
        Path | None, typer.Option(help='JSONL of {"user_id", "history": [item ids]} (new or updated users)')
    ] = None,
    chunk_size: ChunkSize = 32,
    ray: Ray = False,
    ray_actors: RayActors = 1,
    verbose: Verbose = False,
) -> None:
    """Regenerate preference texts + vectors with the LLM into Redis (DPO4REC_REDIS_URL) and the run directory."""
    _setup(verbose)
    from dpo4rec.batch import preferences_job

    result = preferences_job(
        run, users=users, histories=histories, chunk_size=chunk_size, use_ray=ray, ray_actors=ray_actors
    )
    console.print(
        f"{result.total} preferences refreshed ({result.resumed_from} from a previous attempt) -> {result.output}"
    )


@app.command()
def rerank(
    requests: Annotated[Path, typer.Argument(help="JSONL file, one /rerank request body per line")],
    out: Annotated[Path, typer.Option(help="JSONL answers, one per request line, in input order")],
    run: Annotated[Path, typer.Option(help="run directory to rank with")] = Path("runs/default"),
    chunk_size: ChunkSize = 32,
    ray: Ray = False,
    ray_actors: RayActors = 1,
    verbose: Verbose = False,
) -> None:
    """Answer a file of /rerank requests through the service's pipeline (resumable)."""
    _setup(verbose)
    from dpo4rec.batch import rerank_job

    result = rerank_job(run, requests, out, chunk_size=chunk_size, use_ray=ray, ray_actors=ray_actors)
    errors = sum(1 for line in open(result.output, encoding="utf-8") if '"error"' in line[:40])
    console.print(f"{result.total} answers ({errors} errors) -> {result.output}")


@app.command()
def coldstart(
    out: Annotated[Path, typer.Option(help="folder for cold_start.json, cold_start.md and the plot")] = Path(
        "runs/cold-start"
    ),
    config: Annotated[str, typer.Option(help="config name in training/configs or a YAML path")] = "default",
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. retriever.epochs=50")] = None,
    seeds: Annotated[str, typer.Option(help="comma-separated model seeds (the held-out split stays fixed)")] = "0,1,2",
    llm: Annotated[bool, typer.Option(help="score the LLM arms (zero-shot, label prior removed)")] = True,
    trained: Annotated[bool, typer.Option(help="also train re-rank adapters (SFT, then DPO); score with each")] = True,
    chain_config: Annotated[
        str, typer.Option(help="the config whose re-rank section trains the adapter and whose LLM writes the texts")
    ] = "chain",
    preference_arms: Annotated[
        bool, typer.Option(help="SASRec with the LLM's preference text (with --llm) and with the history lines")
    ] = True,
    calibration_lists: Annotated[int, typer.Option(help="validation lists per slice for the label prior")] = 16,
    max_events: Annotated[int | None, typer.Option(help="cap per slice and half (smoke runs)")] = None,
    verbose: Verbose = False,
) -> None:
    """The cold-start protocol: new items and new users, every arm, paired CIs (docs/RESULTS.md). Each seed lands in
    OUT/seed_N.json; a rerun reuses what a seed file already scored (see training/cold_start.py)."""
    _setup(verbose)
    from training.cold_report import write_report
    from training.cold_start import ColdStartConfig, run_protocol
    from training.config import load_config

    cfg = load_config(config, set_)
    chain = load_config(chain_config)  # what make serve trains: its re-rank lists and its preference texts
    cs = ColdStartConfig(
        llm=llm,
        trained=trained,
        preference_arms=preference_arms,
        rerank=chain.rerank,
        text_llm=chain.llm,
        calibration_lists=calibration_lists,
        max_events=max_events,
    )
    doc = run_protocol(cfg, cs, [int(s) for s in seeds.split(",")], out)
    write_report(doc, out)
    console.print(f"cold-start results -> {out}/cold_start.md")


items_app = typer.Typer(help="New items in a run without retraining; items out of retrieval.", no_args_is_help=True)
runs_app = typer.Typer(help="Run roots: versioned run directories and a current pointer.", no_args_is_help=True)
app.add_typer(items_app, name="items")
app.add_typer(runs_app, name="runs")
RunArg = Annotated[Path, typer.Argument(help="a run root (its current version moves) or a single run directory")]
ItemsOut = Annotated[Path | None, typer.Option(help="where the new version goes when RUN is a single run directory")]


def _refusing(what: str, job: Callable[[], T]) -> T:
    """``job()``, with a bad input or run (``ItemsFileError``, ``RunDirError``) printed and exit code 2."""
    from dpo4rec.items import ItemsFileError
    from rundir.manifest import RunDirError

    try:
        return job()
    except (ItemsFileError, RunDirError) as e:
        console.print(f"[red]{what}: {e}[/red]")
        raise typer.Exit(2) from None


@items_app.command("add")
def items_add(
    run: RunArg,
    file: Annotated[Path, typer.Argument(help="JSONL or CSV of new items: id, title, genres, year")],
    out: ItemsOut = None,
    verbose: Verbose = False,
) -> None:
    """Add items: their text through the run's content tower into catalog, retriever and FAISS index (seconds)."""
    _setup(verbose)
    from dpo4rec.items import add_items

    result = _refusing("items add", lambda: add_items(run, file, out))
    console.print(f"{len(result.added)} items added in {result.seconds:.1f} s -> {result.run_dir} ({result.version})")


@items_app.command("remove")
def items_remove(
    run: RunArg,
    ids: Annotated[list[str], typer.Argument(help="item ids to take out of retrieval")],
    out: ItemsOut = None,
    verbose: Verbose = False,
) -> None:
    """Take items out of retrieval (they stay in the catalog, so histories holding them still read)."""
    _setup(verbose)
    from dpo4rec.items import remove_items

    result = _refusing("items remove", lambda: remove_items(run, ids, out))
    console.print(f"{len(result.removed)} items out of retrieval -> {result.run_dir} ({result.version})")


@runs_app.command("init")
def runs_init(
    root: Annotated[Path, typer.Argument(help="the run root to create")],
    run: Annotated[Path, typer.Argument(help="a run directory, moved into the root as its first version")],
) -> None:
    """Make a run root that serves RUN (moved into it); later versions are published into it."""
    from rundir.versions import init_root

    console.print(f"{root}/current -> {init_root(root, run)}")


@runs_app.command("list")
def runs_list(root: Annotated[Path, typer.Argument(help="a run root")]) -> None:
    """The versions in a run root, oldest first; the current one marked."""
    from rundir.versions import current_version, versions

    now = current_version(root)
    for version in versions(root):
        console.print(f"{'*' if version == now else ' '} {version}")


@runs_app.command("weights")
def runs_weights(
    run: RunArg,
    source: Annotated[Path, typer.Option("--from", help="cold_start.json of `dpo4rec coldstart`")],
    out: ItemsOut = None,
) -> None:
    """A new version whose llm.json carries the fusion weight per slice that the cold-start protocol chose."""
    from dpo4rec.items import apply_slice_weights, protocol_weights

    weights = protocol_weights(json.loads(source.read_text(encoding="utf-8")))
    result = apply_slice_weights(run, weights, out)
    console.print(f"slice weights {weights} -> {result.run_dir} ({result.version})")


@app.command()
def rollback(root: Annotated[Path, typer.Argument(help="a run root")]) -> None:
    """Move a run root's current pointer back to the version it served before."""
    from rundir.versions import rollback as roll_back

    console.print(f"{root}/current -> {_refusing('rollback', lambda: roll_back(root))}")


if __name__ == "__main__":
    app()
