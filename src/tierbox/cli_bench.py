"""``tierbox bench``: the command. Registered in cli.py with ``app.command()(bench)``.

Also runnable alone: ``python -m tierbox.cli_bench --quick``.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
import webbrowser
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType, TracebackType
from typing import Annotated, Any, TextIO

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from tierbox import paths
from tierbox.errors import TierboxError, UsageError
from tierbox.spec import parse_memory_mib

#: Width of the tables when stdout is not a terminal: the same layout as a
#: 100-column terminal, so a log or a pipe reads like the screen.
PIPE_COLUMNS = 100


#: Overrides where runs go (tests, or a shared results directory).
BENCH_DIR_ENV = "TIERBOX_BENCH_DIR"


def bench_home() -> Path:
    """``$TIERBOX_HOME/bench``: each run in ``run-<UTC time>/``, ``latest`` the newest."""
    override = os.environ.get(BENCH_DIR_ENV)
    return Path(override) if override else paths.home() / "bench"


def latest_dir() -> Path:
    return bench_home() / "latest"


def new_run_dir() -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    d = bench_home() / f"run-{stamp}"
    n = 1
    while d.exists():  # two runs in one second: keep both
        n += 1
        d = bench_home() / f"run-{stamp}-{n}"
    d.mkdir(parents=True)
    return d


#: Runs kept under $TIERBOX_HOME/bench; older ones are removed after a run.
KEEP_RUNS = 20


def prune_runs(keep: int) -> None:
    """Remove all but the newest ``keep`` run directories (never ``latest``'s)."""
    runs = sorted(p for p in bench_home().glob("run-*") if p.is_dir() and not p.is_symlink())
    current = latest_dir().resolve() if latest_dir().is_symlink() else None
    for old in runs[:-keep] if keep > 0 else runs:
        if old.resolve() != current:
            shutil.rmtree(old, ignore_errors=True)


def point_latest(run: Path) -> Path:
    """Swap ``latest`` to ``run`` in one rename, so a reader never sees it missing."""
    link = latest_dir()
    tmp = link.with_name(f".latest-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run.name)
    if link.exists() and not link.is_symlink():  # not ours to replace
        tmp.unlink()
        return run
    tmp.replace(link)
    return link


def open_report(report: Path, err: Console) -> None:
    """Open the report in a browser where one exists; say where it is either way."""
    err.print(
        f"report: {report}\n        {report.absolute().as_uri()}",
        soft_wrap=True,
        highlight=False,
        markup=False,
    )
    try:
        opened = webbrowser.open(report.absolute().as_uri())
    except webbrowser.Error:
        opened = False
    if not opened:
        err.print("no browser found here: open the file:// link above", highlight=False)


class LineReporter:
    """Progress for a pipe or a log: one line per step as it starts, and how
    long it took when the next one starts (no bars, no control codes)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.current: tuple[str, str, float] | None = None

    def __enter__(self) -> LineReporter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.done()

    def start(self, tier: str, what: str, total: int | None) -> None:
        self.done()
        self.current = (tier, what, time.monotonic())
        runs = f" ({total} runs)" if total else ""
        self.note(f"{tier:<10} {what}{runs} ...")

    def advance(self, n: int = 1) -> None:
        pass

    def done(self) -> None:
        if self.current is not None:
            tier, what, t0 = self.current
            self.current = None
            took_s = time.monotonic() - t0
            if took_s >= 1.0:
                self.note(f"{tier:<10} {what}: done in {took_s:.1f} s")

    def note(self, text: str) -> None:
        # a plain write: a Ctrl-C landing inside it cannot leave a console half-buffered
        self.stream.write(text + "\n")
        self.stream.flush()


class RichReporter:
    """Progress bars on stderr for the long parts; notes printed above them."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.fields[tier]:<10}"),
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.task: TaskID | None = None

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.progress.stop()

    def start(self, tier: str, what: str, total: int | None) -> None:
        self.done()
        self.task = self.progress.add_task(what, total=total, tier=tier)

    def advance(self, n: int = 1) -> None:
        if self.task is not None:
            self.progress.advance(self.task, n)

    def done(self) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None

    def note(self, text: str) -> None:
        self.progress.console.print(text, highlight=False, markup=False)


def _csv(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [x.strip() for x in text.split(",") if x.strip()]
    return items or None


def _images(pairs: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or []:
        tier, sep, ref = pair.partition("=")
        if not sep or not tier or not ref:
            raise UsageError(
                f"bad --image {pair!r}: use TIER=IMAGE, e.g. container=debian:bookworm"
            )
        out[tier.strip()] = ref.strip()
    return out


def _config(
    *,
    quick: bool,
    tiers: str | None,
    workload: str | None,
    runs: int | None,
    warmup: int | None,
    instances: str | None,
    budget: str,
    density_cap: int | None,
    memory: str | None,
    image: list[str] | None,
    no_probes: bool,
) -> Any:
    from tierbox.bench.runner import BenchConfig, select_tiers
    from tierbox.bench.workloads import WORKLOADS

    over: dict[str, Any] = {}
    tier_list = _csv(tiers)
    if tier_list:
        select_tiers(tier_list)  # unknown names are a usage error before anything runs
        over["tiers"] = tier_list
    wl = _csv(workload)
    if wl:
        bad = [w for w in wl if w not in WORKLOADS]
        if bad:
            raise UsageError(f"unknown workload {bad[0]!r}: choose from {', '.join(WORKLOADS)}")
        over["workloads"] = tuple(wl)
    if runs is not None:
        over["runs"] = runs
    if warmup is not None:
        over["warmup"] = warmup
    if instances is not None:
        try:
            points = tuple(sorted({int(x) for x in _csv(instances) or []}))
        except ValueError as exc:
            raise UsageError(f"bad --instances {instances!r}: give counts like 10,50") from exc
        if not points or min(points) < 1:
            raise UsageError(f"bad --instances {instances!r}: give counts like 10,50")
        over["instances"] = points
    over["budget_bytes"] = parse_memory_mib(budget) * (1 << 20)
    if density_cap is not None:
        over["density_cap"] = density_cap
    if memory is not None:
        over["memory_mib"] = parse_memory_mib(memory)
    over["images"] = _images(image)
    over["probes"] = not no_probes
    if quick:
        return BenchConfig.quick(**over)
    if runs is not None or density_cap is not None:
        over["mode"] = "custom"
    return BenchConfig(**over)


def bench(
    action: Annotated[
        str | None,
        typer.Argument(
            help="'open': open $TIERBOX_HOME/bench/latest/report.html (nothing is measured).",
            show_default=False,
        ),
    ] = None,
    quick: Annotated[
        bool,
        typer.Option("--quick", help="Fewer runs and capped density: under 3 minutes here."),
    ] = False,
    tiers: Annotated[
        str | None,
        typer.Option("--tiers", "-t", help="Comma-separated tiers to run (default: all)."),
    ] = None,
    workload: Annotated[
        str | None,
        typer.Option("--workload", "-w", help="Comma-separated workloads: hello, python."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help=(
                "Where report.html, report.md, results.json and the PNG charts go. "
                "Default: $TIERBOX_HOME/bench/run-<UTC time>/ (TIERBOX_HOME defaults to "
                "~/.local/share/tierbox), with $TIERBOX_HOME/bench/latest pointing at the "
                "newest run; earlier runs stay beside it."
            ),
        ),
    ] = None,
    open_after: Annotated[
        bool, typer.Option("--open", help="Open report.html in a browser when done.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print results.json to stdout instead of the table.")
    ] = False,
    runs: Annotated[
        int | None, typer.Option("--runs", min=1, help="Timed cold starts per workload.")
    ] = None,
    warmup: Annotated[
        int | None, typer.Option("--warmup", min=0, help="Discarded runs before timing.")
    ] = None,
    instances: Annotated[
        str | None,
        typer.Option("--instances", help="Memory checkpoints besides 1, e.g. 10,50."),
    ] = None,
    budget: Annotated[
        str, typer.Option("--budget", help="Memory budget for density, e.g. 2g.")
    ] = "2g",
    density_cap: Annotated[
        int | None,
        typer.Option("--density-cap", min=1, help="Most instances density creates per tier."),
    ] = None,
    memory: Annotated[
        str | None,
        typer.Option("--memory", "-m", help="Memory limit per sandbox (default 128m, vm 256m)."),
    ] = None,
    image: Annotated[
        list[str] | None,
        typer.Option("--image", help="TIER=IMAGE: run another image on a tier (repeatable)."),
    ] = None,
    no_probes: Annotated[
        bool, typer.Option("--no-probes", help="Skip the isolation probes.")
    ] = False,
) -> None:
    """Measure start time, memory, density and isolation of every tier, next to common claims.

    Results go to $TIERBOX_HOME/bench/run-<UTC time>/ (default TIERBOX_HOME:
    ~/.local/share/tierbox): report.html, report.md, results.json and PNG
    charts; $TIERBOX_HOME/bench/latest points at the newest run, and earlier
    runs stay beside it. The path and a file:// link are printed at the end.
    `tierbox bench open` opens the latest report.
    """
    from tierbox.bench.report import rich_report, to_json, write_reports
    from tierbox.bench.runner import run_bench

    err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=PIPE_COLUMNS)
    if action is not None:
        if action != "open":
            err.print(f"[bold red]tierbox:[/] unknown action {action!r}: use 'open'")
            raise typer.Exit(2)
        report = latest_dir() / "report.html"
        if not report.is_file():
            err.print(f"no report yet at {report}: run `tierbox bench` first", highlight=False)
            raise typer.Exit(1)
        open_report(report, err)
        return
    try:
        cfg = _config(
            quick=quick,
            tiers=tiers,
            workload=workload,
            runs=runs,
            warmup=warmup,
            instances=instances,
            budget=budget,
            density_cap=density_cap,
            memory=memory,
            image=image,
            no_probes=no_probes,
        )
    except TierboxError as exc:
        err.print(f"[bold red]tierbox:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    try:
        reporter = RichReporter(err) if err.is_terminal else LineReporter(sys.stderr)
        with reporter as rep:
            results = run_bench(cfg, rep)
    except KeyboardInterrupt:
        # run_bench closed every sandbox on its way out; say so, then let it propagate
        sys.stderr.write("tierbox bench: interrupted; every sandbox closed\n")
        sys.stderr.flush()
        raise
    target = out if out is not None else new_run_dir()
    written = write_reports(results, target)
    shown = point_latest(target) if out is None else target
    if out is None:
        prune_runs(keep=KEEP_RUNS)
    if as_json:
        sys.stdout.write(to_json(results) + "\n")
        sys.stdout.flush()
    else:
        console = Console() if sys.stdout.isatty() else Console(width=PIPE_COLUMNS)
        console.print(rich_report(results))
    if results.get("charts_error"):
        err.print(f"charts skipped: {results['charts_error']}", highlight=False)
    report = shown / "report.html"
    err.print(
        f"wrote {', '.join(p.name for p in written.values())} to {target}\n"
        f"report: {report}\n        {report.absolute().as_uri()}",
        highlight=False,
        soft_wrap=True,
    )
    if open_after:
        open_report(report, err)
    ran = [t for t in results["tiers"].values() if t["status"] != "unavailable"]
    if ran and all(t["status"] == "failed" for t in ran):
        raise typer.Exit(1)
    if not ran:
        err.print("tierbox: no selected tier is available here", highlight=False)
        raise typer.Exit(1)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """``python -m tierbox.cli_bench``: the bench command on its own."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(bench)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
