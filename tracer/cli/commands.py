"""luotrace command line.  Each command parses its options and calls the
library; errors are one line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import json
import queue
import os
import signal
import sys
from typing import Dict, List, Optional, Tuple

import click

from tracer import __version__, schemas
from tracer.probes.catalog import MODES, TRACEABLE
from tracer.base.errors import LuotraceError
from tracer.base.printable import printable

mode_option = click.option("--mode", type=click.Choice(MODES), default="folio", show_default=True,
                           help="light: lifecycle events only; folio: + per-folio counts and latency "
                                "histograms kept in BPF maps; trace: + per-folio events streamed")

def update_export_options(f):
    """--textfile-dir and --pushgateway: where the old kernel's numbers go at the kexec."""
    f = click.option("--pushgateway", metavar="URL", default=None,
                     help="also push the metrics to this Pushgateway at the kexec and at the end "
                          "(grouped by host and boot id)")(f)
    return click.option("--textfile-dir", type=click.Path(file_okay=False), default=None,
                        help="write the metrics to DIR/luotrace.prom (node_exporter's textfile collector) "
                             "when kernel_kexec() is seen and at the end, fsynced: the old kernel's half of "
                             "an update reaches Prometheus whatever the scrape interval")(f)


def _fail_on(_ctx, _param, value: Optional[str]) -> Tuple[str, ...]:
    from tracer.analysis.gate import FAIL_ON
    kinds = tuple(k.strip() for k in (value or "").split(",") if k.strip())
    bad = [k for k in kinds if k not in FAIL_ON]
    if bad:
        raise click.BadParameter(f"unknown {', '.join(bad)}; choose from {','.join(FAIL_ON)}")
    return kinds


fail_on_option = click.option("--fail-on", callback=_fail_on, metavar="error,anomaly,lost", default=None,
                              help="exit 3, naming what failed, when the report has a failed file, an anomaly "
                                   "or lost events (any of them, comma-separated): a CI gate")
FAIL_EXIT = 3


def _gate(rep: dict, kinds: Tuple[str, ...]) -> None:
    from tracer.analysis.gate import failures
    found = failures(rep, kinds)
    if found:
        click.echo(f"luotrace: failing (--fail-on): {'; '.join(found)}", err=True)
        sys.exit(FAIL_EXIT)


bpf_stats_option = click.option("--bpf-stats", is_flag=True, default=False,
                                help="export the tracer's BPF cost per program (about 50 more series), "
                                     "not only its total")


def finite(lo: float, hi: float) -> click.FloatRange:
    """A float option in [LO, HI]: click's FloatRange lets nan through
    (every comparison with nan is false); the bounds keep inf out."""
    class Finite(click.FloatRange):
        def convert(self, value, param, ctx):
            rv = super().convert(value, param, ctx)
            if rv != rv:
                self.fail(f"{value!r} is not a number", param, ctx)
            return rv
    return Finite(min=lo, max=hi)


# A seed must fit numpy's generator (non-negative, 64-bit).
SEED = click.IntRange(min=0, max=2**63 - 1)
DEFAULT_LISTEN = "127.0.0.1:9477"  # serve's address: localhost unless asked


def population_option(default: str):
    """--population, for record (default always) and serve (default update)."""
    return click.option("--population", type=click.Choice(["always", "update"]), default=default, show_default=True,
                        help="when guest_memfd population is traced (folio and trace modes): the whole run, or only "
                             "while a file is in an update (being preserved, or preserved and waiting for the kexec), "
                             "so that guests pay nothing on faults and fallocate between updates")


def sample_option(what: str):
    """--sample N for record and simulate: one per-folio record in N."""
    return click.option("--sample", type=click.IntRange(min=1, max=2**32 - 1), default=1, show_default=True,
                        help=f"trace mode: {what} one per-folio record in N (counts stay exact)")


folio_latency_option = click.option(
    "--folio-latency", is_flag=True,
    help="folio mode: a program on every kho_preserve_folio call, for per-file latency histograms, errors and "
         "KHO's own metadata pages; costs about 3 us per folio under emulation (about 4x a 256 MiB preserve), "
         "where the default reads each file's serialized folio array once, a page (256 folios) per program run")

gmem_option = click.option(
    "--gmem", type=click.Choice(["auto", "real", "standin"]), default=None,
    help="what guest_memfd files are here: real (KVM_CREATE_GUEST_MEMFD), standin (ramfs page-cache files, for a "
         "host whose KVM makes none; said in every output), or auto: real where the host makes them "
         "[default: $LUOTRACE_GMEM, else auto]. Commands run under the trace are told the choice")

force_option = click.option("--force", is_flag=True, help="overwrite OUTPUT if it exists (a regular file only)")
json_option = click.option("--json", "as_json", is_flag=True, help="print the report as JSON (schema luotrace.report/1)")


def _emit(report: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        from exporters.text import render
        click.echo(render(report), nl=False)


def _labels(pairs: Tuple[str, ...]) -> Dict[str, str]:
    out = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise LuotraceError(f"bad --label '{p}'", "use --label key=value, e.g. --label patch=v3")
        if schemas.labels_problem({k: v}):
            raise LuotraceError(f"bad --label {p!r}", "the key is letters, digits and _ (not a digit first), "
                                "the value up to 256 printable characters")
        out[k] = v
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="luotrace")
def cli() -> None:
    """Trace Linux live-update preservation (LUO / KHO) with eBPF.

    \b
    luotrace doctor                      what works on this host, and why
    luotrace demo                        the whole pipeline on real guest_memfds
    luotrace record -o run.luo -- CMD    trace while CMD runs (or --duration, or Ctrl-C)
    luotrace report run.luo [--json]     per-file timelines, anomalies, totals
    luotrace serve                       Prometheus metrics on 127.0.0.1:9477
    luotrace compare v2.luo v3.luo       which phase got slower, with confidence intervals
    luotrace timeline run.luo -o run.json   open in ui.perfetto.dev
    """


@cli.command()
@click.option("--model", type=click.Path(), default=None, help="also plan uprobes on this reference model binary")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def doctor(model: Optional[str], as_json: bool) -> None:
    """Check privileges, BTF, BCC, headers, tracefs, /dev/kvm, and the attach
    strategy every catalog probe would get here (or why none).

    Example: luotrace doctor --model workloads/model/luo_model
    """
    from tracer.cli import doctor as doc
    checks = doc.run(model)
    if as_json:
        click.echo(json.dumps([c.to_json() for c in checks], indent=2))
    else:
        for c in checks:
            click.echo(printable(f"{'ok  ' if c.ok else ('FAIL' if c.essential else 'no  ')} {c.name}: {c.detail}"))
    if not doc.essential_ok(checks):
        raise LuotraceError("essential checks failed (marked FAIL above)", "fix those, then run doctor again")


@cli.command(context_settings={"ignore_unknown_options": False})
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="recording file to write")
@mode_option
@click.option("--model", type=click.Path(), default=None,
              help="trace the reference model binary with uprobes instead of the kernel")
@click.option("--handler", "handlers", multiple=True, type=click.Choice(list(TRACEABLE)),
              help="trace only these (repeatable; default: every handler found); 'population' alone "
                   "traces guest_memfd population on any kernel")
@click.option("--duration", type=finite(0.1, 365 * 86400.0), default=None, help="stop after this many seconds")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="label stored in the recording (repeatable)")
@sample_option("stream")
@click.option("--folio-ringbuf-pages", "--ringbuf-pages", "folio_ringbuf_pages", type=click.IntRange(min=1, max=1 << 18),
              default=1024, show_default=True,
              help="trace mode: the per-folio events' ring buffer, in 4 KiB pages (power of two); "
                   "--ringbuf-pages is its old name")
@click.option("--lifecycle-ringbuf-pages", type=click.IntRange(min=1, max=1 << 18),
              default=1024, show_default=True,
              help="the lifecycle events' ring buffer (every mode), in 4 KiB pages (power of two): "
                   "raise it when a burst of files loses events")
@click.option("--quiet", is_flag=True, help="do not print the report at the end")
@click.option("--print-bpf", is_flag=True, help="print the final BPF C text and compiler flags, then exit")
@click.option("--strategy", type=click.Choice(["auto", "fentry", "kprobe"]), default="auto", show_default=True,
              help="kernel attach strategy: fentry/fexit where BTF and trampolines allow, else kprobe; "
                   "'kprobe' forces the fallback")
@population_option("always")
@folio_latency_option
@gmem_option
@update_export_options
@fail_on_option
@force_option
@json_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def record(output: str, mode: str, model: Optional[str], handlers: Tuple[str, ...], duration: Optional[float],
           labels: Tuple[str, ...], sample: int, folio_ringbuf_pages: int, lifecycle_ringbuf_pages: int, quiet: bool,
           print_bpf: bool, strategy: str, population: str, folio_latency: bool, gmem: Optional[str],
           textfile_dir: Optional[str], pushgateway: Optional[str], fail_on: Tuple[str, ...], force: bool,
           as_json: bool, command: Tuple[str, ...]) -> None:
    """Attach, record events to OUTPUT until COMMAND exits, --duration passes or
    Ctrl-C / SIGTERM / SIGHUP / SIGQUIT; then detach and print the report.

    COMMAND is never harmed by luotrace: a signal before the probes are
    attached cancels the run before COMMAND starts; a full disk ends the
    recording (said in one line) but not the run or its report; a failure of
    luotrace detaches the probes and lets COMMAND finish untraced. OUTPUT is
    never an existing file unless --force, never a device or FIFO, never a
    file COMMAND names, and is locked while written.

    \b
    Example:
      luotrace record -o run.luo --label patch=v3 -- ./my-update-step.sh
      luotrace record -o m.luo --model workloads/model/luo_model -- \\
          workloads/model/luo_model kexec:gmem:64M cancel:gmem:8M
    """
    from tracer.probes.plan import Options
    from tracer.live.runner import run
    opts = Options(mode=mode, model=model, handlers=list(handlers) or None, sample_every=sample,
                   folio_ringbuf_pages=folio_ringbuf_pages, lifecycle_ringbuf_pages=lifecycle_ringbuf_pages,
                   strategy=strategy, population=population, folio_latency=folio_latency, gmem=gmem)
    if print_bpf:
        from tracer.probes.program import final_source
        click.echo(final_source(opts), nl=False)
        return
    from tracer.service.update_export import UpdateExport
    export = UpdateExport(textfile_dir, pushgateway)
    res = run(opts, output, command=list(command) or None, duration=duration, labels=_labels(labels), force=force,
              command_stdout=sys.stderr if as_json else None,  # stdout carries the JSON report alone
              on_started=export.attach if export else None,
              on_stopped=(lambda r: export.write(r.report, "at the end")) if export else None)
    if not quiet:
        _emit(res.report, as_json)
    if not res.recording_error:  # else run() has said, once, where the recording was cut
        click.echo(f"luotrace: recording written to {output} ({res.stopped_by})", err=True)
    if res.stopped_by == "command exited" and res.command_rc:
        sys.exit(_shell_status(res.command_rc))
    _gate(res.report, fail_on)


def _shell_status(rc: int) -> int:
    """The command's exit status as a shell gives it: killed by signal N is 128 + N."""
    if rc < 0:
        click.echo(f"luotrace: the command was killed by {signal.Signals(-rc).name}", err=True)
        return 128 - rc
    return rc


@cli.command()
@click.argument("recordings", nargs=-1, required=True, type=click.Path(dir_okay=False))
@json_option
@click.option("--events", is_flag=True, help="instead of the report, print every event as a JSON line "
                                            "(probe, kind, time, file, catalog-named fields)")
@fail_on_option
def report(recordings: Tuple[str, ...], as_json: bool, events: bool, fail_on: Tuple[str, ...]) -> None:
    """Print the report of a RECORDING: the same as the live run showed.

    Given the recordings of both sides of a live update (the old kernel's,
    cut short by the kexec, and the new kernel's), joins them into one
    timeline per file: preserve, freeze, kexec, retrieve, finish, with the
    blackout measured across the reboot.

    Examples:
      luotrace report run.luo --json | jq '.anomalies'
      luotrace report before-kexec.luo after-kexec.luo
    """
    if events:
        from tracer.recording import format as rec_mod
        from tracer.probes.events import to_dict
        for path in recordings:
            r = rec_mod.read(path)
            base = r.header.get("clock", {}).get("base_monotonic_ns", 0)
            for batch in r.batches():
                for ev in batch:
                    click.echo(json.dumps(to_dict(ev, base)))
        return
    if len(recordings) > 1:
        from tracer.analysis.join import join_report
        rep = join_report(list(recordings))
        _emit(rep, as_json)
        _gate(rep, fail_on)
        return
    from tracer.analysis.replay import replay
    rep = replay(recordings[0])
    _emit(rep, as_json)
    if rep["truncated"]:
        click.echo(f"luotrace: warning: {recordings[0]} is truncated ({rep['truncated_reason']}); "
                   "the report covers every complete record", err=True)
    _gate(rep, fail_on)


@cli.command()
@mode_option
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="keep the recording here (default: a file in /tmp)")
@gmem_option
@json_option
def demo(mode: str, output: Optional[str], gmem: Optional[str], as_json: bool) -> None:
    """Run the reference model on real guest_memfds and memfds (a clean session
    retrieved after a simulated kexec, a cancelled one, one failing on an
    injected hwpoisoned folio), trace it live and print the report and the
    headline metrics.  Where the host's KVM makes no guest_memfd, the
    guest_memfd files are stand-ins, and the output says so.

    Example: luotrace demo --mode trace
    """
    from tracer.live.model import demo as run_demo
    res, truth, diffs = run_demo(mode, output, gmem)
    _emit(res.report, as_json)
    if not as_json:
        from exporters.prometheus import summary
        click.echo("\nmetrics (as `luotrace serve` exports them; buckets and per-probe series omitted):")
        click.echo(summary(res.report), nl=False)
    if diffs:
        raise LuotraceError("luotrace disagrees with the model's ground truth: " + "; ".join(diffs),
                            "please report this as a bug")
    used = res.report.get("gmem") or {}
    kind = ("real guest_memfds" if used.get("backing") != "standin" else
            f"guest_memfd STAND-INS (ramfs page-cache files: {used.get('why')})")
    click.echo(f"luotrace: checked against the model's ground truth: all {len(truth['files'])} files agree, "
               f"on {kind}; recording in {res.recording}", err=True)


@cli.command()
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True,
              help="HOST:PORT for /metrics; localhost unless you say otherwise")
@click.option("--replay", "replay_path", type=click.Path(dir_okay=False), default=None,
              help="serve the final state of this recording instead of tracing")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="also record to this file")
@mode_option
@click.option("--model", type=click.Path(), default=None, help="trace the reference model binary with uprobes")
@click.option("--handler", "handlers", multiple=True, type=click.Choice(list(TRACEABLE)),
              help="trace only these (repeatable)")
@click.option("--duration", type=finite(0.1, 365 * 86400.0), default=None,
              help="trace this many seconds, then keep serving the final state")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="label stored in the recording")
@click.option("--keep-files", type=click.IntRange(0, 16384), default=64, show_default=True,
              help="finished files kept in detail (per-file series, report rows); older ones are folded into "
                   "the counters, so memory and scrape time stay flat however long serve runs")
@bpf_stats_option
@update_export_options
@click.option("--state-dir", type=click.Path(file_okay=False), default=lambda: os.environ.get("STATE_DIRECTORY"),
              help="record each boot here; after a boot, export the update that ended the previous one, labelled "
                   "with its boot_id and kernel: the old kernel's half of an update survives the jump "
                   "[default: $STATE_DIRECTORY, which systemd sets to /var/lib/luotrace for the service; "
                   "else off]")
@click.option("--state-keep", type=click.IntRange(1, 10000), default=8, show_default=True,
              help="recordings kept in --state-dir (this boot's included)")
@population_option("update")
@folio_latency_option
@gmem_option
@click.option("--state-max-bytes", default="512M", show_default=True, metavar="SIZE",
              help="bytes of recordings kept in --state-dir (oldest removed first, never this boot's)")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def serve(listen: str, replay_path: Optional[str], output: Optional[str], mode: str, model: Optional[str],
          handlers: Tuple[str, ...], duration: Optional[float], labels: Tuple[str, ...], keep_files: int,
          bpf_stats: bool, textfile_dir: Optional[str], pushgateway: Optional[str], state_dir: Optional[str],
          state_keep: int, population: str, folio_latency: bool, gmem: Optional[str], state_max_bytes: str,
          command: Tuple[str, ...]) -> None:
    """Export metrics for Prometheus at http://LISTEN/metrics, read from the
    BPF maps at scrape time.  With COMMAND or --duration, keeps serving the
    final state after it ends, until Ctrl-C / SIGTERM.  /-/ready answers 200
    once every probe is attached (503 and why before), luotrace_tracing says
    the same, and under systemd (Type=notify) READY=1 is sent then.

    \b
    Example:
      luotrace serve                                  # live, on 127.0.0.1:9477
      luotrace serve --listen 0.0.0.0:9477            # explicit opt-in beyond localhost
      luotrace serve --replay run.luo                 # what a recording would have exported
      luotrace serve --state-dir /var/lib/luotrace    # as the service: survives the kexec
      luotrace serve --model workloads/model/luo_model -- workloads/model/luo_model kexec:gmem:64M
    """
    from tracer.service.update_export import UpdateExport
    from tracer.service.serve import serve_live, serve_replay
    if replay_path:
        serve_replay(replay_path, listen, per_program=bpf_stats)
        return
    from tracer.probes.plan import Options
    from tracer.live.state import StateDir
    state = StateDir(state_dir, state_keep, _size(state_max_bytes, "--state-max-bytes")) if state_dir else None
    opts = Options(mode=mode, model=model, handlers=list(handlers) or None, population=population,
                   folio_latency=folio_latency, gmem=gmem)
    serve_live(opts, listen, output, list(command) or None, duration, _labels(labels), keep_files=keep_files,
               per_program=bpf_stats, update_export=UpdateExport(textfile_dir, pushgateway, bpf_stats), state=state)


@cli.command()
@click.argument("recordings", nargs=-1, required=True, type=click.Path())
@click.option("--textfile", type=click.Path(dir_okay=False), default=None,
              help="write one recording's metrics here in node_exporter textfile-collector format")
@click.option("--parquet", "parquet", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="append the recordings to the fleet dataset in DIR (created if missing), for `luotrace fleet`")
@click.option("--jobs", type=click.IntRange(1, 64), default=lambda: min(4, os.cpu_count() or 1),
              show_default="CPUs, at most 4", help="--parquet: recordings read in parallel")
@bpf_stats_option
def export(recordings: Tuple[str, ...], textfile: Optional[str], parquet: Optional[str], jobs: int,
           bpf_stats: bool) -> None:
    """Write what RECORDINGS hold for another tool: one recording's metrics for
    node_exporter's textfile collector (--textfile), or many recordings' tables
    into a Parquet dataset that DuckDB, Spark and Trino read (--parquet).

    --parquet appends: a recording already in the dataset adds nothing (a
    larger copy of it, one that was still being written when first exported,
    replaces its rows), a damaged or truncated one adds its sound parts with
    a warning, and one that cannot be read (a missing path, a directory, a
    value no column takes) is skipped with one line.  Each batch is committed
    whole by one rename of the dataset's manifest: an export killed at any
    instant leaves the batch or nothing, and the next export clears what it
    left.

    \b
    Examples:
      luotrace export run.luo --textfile /var/lib/node_exporter/luotrace.prom
      luotrace export --parquet /srv/luofleet /var/lib/luotrace/*.luo
    """
    if (textfile is None) == (parquet is None):
        raise click.UsageError("give exactly one of --textfile FILE and --parquet DIR")
    if textfile is not None:
        if len(recordings) != 1:
            raise click.UsageError(f"--textfile takes one recording ({len(recordings)} given)")
        from exporters.prometheus import export_textfile
        export_textfile(recordings[0], textfile, per_program=bpf_stats)
        click.echo(f"luotrace: metrics written to {textfile}", err=True)
        return
    from tracer.fleet import dataset
    assert parquet is not None
    step = max(1, len(recordings) // 20)

    def progress(done: int, total: int) -> None:
        if total >= 200 and (done % step == 0 or done == total):
            click.echo(f"luotrace: export: {done}/{total} recordings read", err=True)
    res = dataset.export(parquet, list(recordings), jobs=jobs, progress=progress)
    _warn(res.warnings)
    rows = ", ".join(f"{n} {t}" for t, n in res.rows.items() if n)
    click.echo(f"luotrace: {printable(parquet)}: {res.added} recording(s) added ({rows or 'no rows'}; {res.parts} part(s)), "
               f"{res.replaced} replaced by a larger copy, {res.already} already there, {res.skipped} unreadable", err=True)
    if res.skipped and not res.added and not res.already:
        sys.exit(1)


where_option = click.option("--where", default=None, metavar="SQL",
                            help="only the updates (alias u) this condition keeps, e.g. \"u.labels['pool'] = 'j'\" "
                                 "or \"u.host LIKE 'db%'\" (one expression, run in the sandbox of `fleet sql`)")


def _warn(warnings: List[str]) -> None:
    """Warnings on stderr, one line each, whatever goes to stdout."""
    for w in warnings:
        click.echo(f"luotrace: warning: {printable(w)}", err=True)


class _FleetGroup(click.Group):
    """`luotrace fleet DIR` is the summary; `luotrace fleet compare|sql ...` the rest."""

    def parse_args(self, ctx: click.Context, args: List[str]) -> List[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["summary"] + list(args)
        return super().parse_args(ctx, args)


@cli.group(cls=_FleetGroup)
def fleet() -> None:
    """Many hosts' updates at once, from the Parquet dataset `luotrace export
    --parquet DIR` builds, queried by DuckDB (embedded; the same dataset reads
    in Spark or Trino).

    \b
    Examples:
      luotrace fleet /srv/luofleet                     per kernel: updates, errors, anomalies, p50/p99 per phase
      luotrace fleet /srv/luofleet --by patch          grouped by the label patch
      luotrace fleet compare /srv/luofleet --by patch v3 v4
      luotrace fleet sql /srv/luofleet "SELECT host, count(*) FROM anomalies GROUP BY 1"
    """


@fleet.command("summary")
@click.argument("dataset", type=click.Path(file_okay=False))
@click.option("--by", default="kernel", show_default=True, metavar="COLUMN|LABEL",
              help="group by host, kernel (the exact release), date, mode, ... or by a label's value (e.g. patch; "
                   "label:NAME for a label named like a column)")
@where_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def fleet_summary(dataset: str, by: str, where: Optional[str], as_json: bool) -> None:
    """Per group: updates, hosts, files, failures by errno, anomalies by code,
    blackout and every phase's p50/p99 (exact percentiles)."""
    from exporters.fleet_text import render_summary
    from tracer.fleet import query as fl
    res = fl.summary(dataset, by, where)
    _warn(res["warnings"])
    click.echo(json.dumps(res, indent=1) if as_json else render_summary(res))


@fleet.command("compare")
@click.argument("dataset", type=click.Path(file_okay=False))
@click.argument("a")
@click.argument("b")
@click.option("--by", required=True, metavar="COLUMN|LABEL", help="what A and B are values of (e.g. patch)")
@where_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (compare's schema)")
@click.option("--fail-on-change", is_flag=True, help=f"exit {FAIL_EXIT} when a phase changed")
def fleet_compare(dataset: str, a: str, b: str, by: str, where: Optional[str], as_json: bool,
                  fail_on_change: bool) -> None:
    """Compare the updates whose BY is A with those whose BY is B, phase by
    phase, with compare's statistics: the update is the unit (many calls of
    one slow update do not make a group slower), Student's t on the updates'
    log medians, step-down Holm.  Each side uses at most 4,000 calls per
    phase, drawn the same way every run.

    Example: luotrace fleet compare /srv/luofleet --by patch v3 v4
    """
    from tracer.analysis import compare as cmp
    from tracer.fleet import query as fl
    warnings: List[str] = []
    sa, sb = fl.compare_sides(dataset, by, a, b, where=where, warnings=warnings)
    _warn(warnings)
    res = cmp.compare(sa, sb)
    _compare_out(res, as_json, fail_on_change)
    if fail_on_change and res["changed"]:
        sys.exit(FAIL_EXIT)


@fleet.command("sql")
@click.argument("dataset", type=click.Path(file_okay=False))
@click.argument("query")
@click.option("--json", "as_json", is_flag=True, help="columns and rows as JSON")
@click.option("--limit", type=click.IntRange(min=1), default=200, show_default=True, help="rows shown as text")
@click.option("--unsafe", is_flag=True,
              help="DuckDB whole, as your user: any statements, files read and written anywhere, extensions "
                   "installed from the network, no memory bound; only for SQL you wrote yourself")
def fleet_sql(dataset: str, query: str, as_json: bool, limit: int, unsafe: bool) -> None:
    """Run QUERY, one SELECT in DuckDB's SQL, over the dataset.  Tables:
    updates, files, phases, sessions, anomalies, folio_latency; each has the
    partition columns date and kernel; updates.labels is a map
    (labels['patch']).  Join on recording_id.

    Sandboxed: the query reads the dataset's tables and nothing else (no
    other file, no ATTACH, COPY, INSTALL, LOAD or SET; the 512 MB memory
    bound holds), so a query from someone else cannot read or write files as
    the root that runs it.  --unsafe lifts all of that.

    \b
    Example: luotrace fleet sql /srv/luofleet "SELECT host, count(*) FROM anomalies GROUP BY 1"
    """
    from exporters.fleet_text import render_rows
    from tracer.fleet import query as fl
    warnings: List[str] = []
    cols, rows = fl.sql(dataset, query, unsafe=unsafe, warnings=warnings)
    _warn(warnings)
    click.echo(fl.rows_json(cols, rows) if as_json else render_rows(cols, rows, limit))


@cli.command()
@click.argument("recordings", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True,
              help="trace file to write (Chrome JSON trace events: open it in ui.perfetto.dev)")
def timeline(recordings: Tuple[str, ...], output: str) -> None:
    """Write a RECORDING as a timeline: one track per preserved file, phases as
    slices, the session blackout marked, anomalies and errors as instants,
    folio progress as counters (at most 500 samples per file).  Given both
    sides of a live update, one timeline across the reboot (kernels, kexec,
    each file's blackout).

    \b
    Example: luotrace timeline v3.luo -o v3.json   # then open in ui.perfetto.dev
             luotrace timeline before.luo after.luo -o update.json
    """
    from exporters.timeline import write
    if len(recordings) > 1:
        from tracer.analysis.join import join_with_progress
        rep, folios, base = join_with_progress(list(recordings))
    else:
        from tracer.recording import format as rec_mod
        from tracer.analysis.folio_progress import of_batches
        from tracer.analysis.replay import report_of
        r = rec_mod.read(recordings[0])
        rep, folios, base = report_of(r), of_batches(r.batches), r.header.get("clock", {}).get("base_monotonic_ns", 0)
    n = write(folios, base, rep, output)
    click.echo(f"luotrace: {n} trace events written to {output}", err=True)


@cli.command()
@click.argument("recordings", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--by", default=None, metavar="LABEL",
              help="group the recordings into two sides by this label (e.g. patch)")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="also write a PNG of the distributions")
@click.option("--min-change", type=finite(0.0, 10.0), default=0.03, show_default=True,
              help="smallest relative change of a median called a change (0.03 = 3 %): below it, noise")
@click.option("--noise", type=click.Path(dir_okay=False, exists=True), default=None, metavar="AA.json",
              help="`compare --json` of an A/A (the same kernel on both sides): how much boots spread, "
                   "used where the sides cannot tell it (one run a side)")
@click.option("--fail-on-change", is_flag=True, help="exit 3 when any phase is called slower or faster")
@json_option
def compare(recordings: Tuple[str, ...], by: Optional[str], plot: Optional[str], min_change: float,
            noise: Optional[str], fail_on_change: bool, as_json: bool) -> None:
    """Compare phase durations between two recordings, or two groups of
    recordings (--by LABEL).  The unit is the run (a boot: recordings of one
    boot are one run; a recording without a boot id is one), never the call:
    calls inside one boot move together with whatever made that boot slow.
    Per phase: runs and calls a side, medians, delta, the spread between runs
    and within them, Student's t on the runs' log medians with a step-down
    Holm correction over the phases, and the t interval of the delta.  A
    phase is called slower/faster only when the corrected p is below 0.05,
    the interval excludes zero and the change is at least --min-change.  With
    one run a side nothing is called: the row says why and what would settle
    it.  Runs whose calls trend with time (a disturbance inside a boot) are
    named.  Warns, on stderr, when the sides differ in kernel, mode, file
    sizes or file counts.

    \b
    Example:
      luotrace compare v2.luo v3.luo
      luotrace compare runs/*.luo --by patch --plot cmp.png --json
    """
    from tracer.analysis import compare as cmp
    a, b = cmp.load_sides(list(recordings), by)
    res = cmp.compare(a, b, min_change=min_change, noise=_noise(noise))
    _compare_out(res, as_json, fail_on_change)
    if plot:
        from exporters.compare_plot import plot as draw
        draw(a, b, plot, res)
        click.echo(f"luotrace: plot written to {plot}", err=True)
    if fail_on_change and res["changed"]:
        sys.exit(FAIL_EXIT)


def _size(s: str, flag: str) -> int:
    """A size option (64M, 1G, 1TiB) in bytes, or the one-line error saying why not."""
    from tracer.base.units import parse_size
    try:
        return parse_size(s)
    except ValueError as e:
        raise LuotraceError(f"{flag}: {e}", "use e.g. 64M, 1G, 1TiB") from None


def _noise(path: Optional[str]):
    """The between-run spread an A/A's compare --json measured."""
    if path is None:
        return None
    from tracer.analysis import compare as cmp
    from tracer import schemas
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError) as e:
        raise LuotraceError(f"--noise {path}: not readable as JSON ({e})", "give the --json output of an A/A compare")
    if schemas.problem("compare", res) is not None:
        raise LuotraceError(f"--noise {path}: not a compare --json of this version ({schemas.problem('compare', res)})",
                            "run the A/A compare again with this luotrace")
    return cmp.noise_of(res)


def _compare_out(res: dict, as_json: bool, fail_on_change: bool) -> None:
    """compare's and fleet compare's output: the result on stdout, warnings
    and the gate's verdict on stderr (one place, so the two never differ)."""
    from exporters.compare_text import render
    click.echo(json.dumps(res, indent=2) if as_json else render(res), nl=not as_json)
    _warn(res["warnings"])
    if fail_on_change and res["changed"]:
        click.echo(f"luotrace: failing (--fail-on-change): {', '.join(res['changed'])} changed", err=True)


@cli.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="recording to write")
@click.option("--files", type=click.IntRange(min=1, max=100_000), default=4, show_default=True)
@click.option("--size", default="1G", show_default=True, help="total guest memory, split over the files (e.g. 1TiB)")
@mode_option
@click.option("--folio-ns", type=finite(1.0, 1e12), default=250.0, show_default=True,
              help="median kho_preserve_folio latency")
@click.option("--slow", "slow", multiple=True, metavar="PHASE=FACTOR",
              help="scale a phase's duration, e.g. --slow fill_pass=1.1 (repeatable)")
@click.option("--errors", type=click.IntRange(min=0), default=0, help="files failing with EHWPOISON")
@click.option("--anomaly", "anomalies", multiple=True,
              type=click.Choice(["holes", "folio_added_while_frozen", "pass_count_mismatch", "pfn_zero",
                                 "large_folios"]), help="inject this anomaly on one file (repeatable)")
@click.option("--lost", type=click.IntRange(min=0), default=0, help="lost per-folio events to report")
@click.option("--run-noise", type=float, default=None, metavar="PERCENT",
              help="a boot's effect: every phase of this recording scaled by one random factor (log-normal, "
                   "e.g. 5 for 5 %%), as one slower or faster boot would give")
@sample_option("write")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="label stored in the recording")
@click.option("--hostname", default=None, metavar="NAME", help="host the recording says it was taken on (default: this one)")
@click.option("--kernel", default="simulated", show_default=True, metavar="RELEASE",
              help="kernel release the recording says it traced")
@force_option
def simulate(output: str, files: int, size: str, mode: str, folio_ns: float, slow: Tuple[str, ...], errors: int,
             anomalies: Tuple[str, ...], lost: int, run_noise: Optional[float], sample: int, seed: int,
             labels: Tuple[str, ...], hostname: Optional[str], kernel: str, force: bool) -> None:
    """Write a synthetic recording of a preservation run at any scale (same
    format as `record`), for load tests of everything downstream.  Memory
    stays bounded at any size; trace mode (a record per folio: 64 bytes per
    4 KiB of --size) is refused up front when the disk cannot hold it.

    Example: luotrace simulate --files 64 --size 1TiB -o big.luo && luotrace report big.luo
    """
    from tracer.analysis.simulate import SCALABLE, SimSpec, simulate as sim
    scales = {}
    for item in slow:
        k, sep, v = item.partition("=")
        if sep and k not in SCALABLE:
            raise LuotraceError(f"unknown phase '{k}' in --slow", f"one of {', '.join(SCALABLE)}")
        try:
            scales[k] = float(v)
            if not 0 < scales[k] < 1e6:  # also false for nan
                sep = ""
        except ValueError:
            sep = ""
        if not sep or not k:
            raise LuotraceError(f"bad --slow '{item}'", "use PHASE=FACTOR with 0 < FACTOR < 1e6, e.g. --slow fill_pass=1.1")
    if run_noise is not None and not 0 <= run_noise <= 100:
        raise LuotraceError(f"bad --run-noise {run_noise}", "give a percentage from 0 to 100, e.g. --run-noise 5")
    spec = SimSpec(files=files, size=_size(size, "--size"), mode=mode, folio_ns=folio_ns, phase_scale=scales,
                   errors=errors, anomalies=list(anomalies), lost=lost, sample_every=sample, seed=seed,
                   labels=_labels(labels), hostname=hostname, kernel=kernel, run_noise=(run_noise or 0) / 100)
    sim(spec, output, progress=lambda s: click.echo(s, err=True), force=force)


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[INTERVAL [COUNT]] [-- COMMAND...]")
@click.option("--from", "from_url", default=None, metavar="URL",
              help="the running `luotrace serve` to read (default: http://127.0.0.1:9477, used when it answers; "
                   "else top attaches probes of its own)")
@click.option("--replay", "replays", multiple=True, type=click.Path(dir_okay=False), metavar="REC",
              help="play a recording through the view; twice: both sides of an update (old kernel, new kernel)")
@click.option("--speed", type=finite(0.0, 1e9), default=1.0, show_default=True,
              help="--replay: recording seconds per second (0: as fast as it can)")
@click.option("--model", type=click.Path(), default=None, help="trace the reference model (uprobes) instead of the kernel")
@mode_option
@gmem_option
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="probes of its own: also keep the recording here (as `record -o` does)")
@force_option
@click.option("--before", type=click.Path(dir_okay=False), default=None,
              help="the old kernel's recording of this update: each retrieve is shown against what it preserved "
                   "(default: the previous boot's, from --state-dir)")
@click.option("--state-dir", type=click.Path(file_okay=False), default=lambda: os.environ.get("STATE_DIRECTORY"),
              help="serve's state directory: the previous boot's update, and this host's earlier updates "
                   "the estimates and stall rules learn from [default: $STATE_DIRECTORY]")
@click.option("--history", "histories", multiple=True, type=click.Path(dir_okay=False), metavar="REC",
              help="earlier recordings of this host to estimate from (repeatable; adds to --state-dir's)")
@click.option("--plain", is_flag=True, help="a timestamped line per file change and a summary line per interval")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per interval (schema luotrace.top/1)")
@click.option("--once", is_flag=True, help="print one frame and exit")
@click.option("-C", "--no-clear", is_flag=True, help="print each frame below the last instead of a full screen")
@click.option("-r", "--maxrows", type=click.IntRange(min=1), default=None, help="show at most this many files")
@click.option("--sort", type=click.Choice(["session", "time", "size", "state"]), default="session", show_default=True)
@click.option("--stall", "stall_s", type=finite(0.1, 86400.0), default=30.0, show_default=True,
              help="seconds without progress (where progress is seen) or of a phase with no history "
                   "before a file is flagged stalled")
@click.option("--fail-on-stall", type=finite(0.1, 86400.0), default=None, metavar="SECONDS",
              help="flag stalls after SECONDS and exit 3 if any file stalled")
@fail_on_option
def top(args: Tuple[str, ...], from_url: Optional[str], replays: Tuple[str, ...], speed: float,
        model: Optional[str], mode: str, gmem: Optional[str], output: Optional[str], force: bool,
        before: Optional[str], state_dir: Optional[str], histories: Tuple[str, ...],
        plain: bool, as_json: bool, once: bool, no_clear: bool, maxrows: Optional[int], sort: str, stall_s: float,
        fail_on_stall: Optional[float], fail_on: Tuple[str, ...]) -> None:
    """The update, live, on this host: each session and file as it moves
    through its phases, progress that says where it comes from (~ marks an
    estimate from this host's earlier updates), stalls with the rule that
    flagged them, the retrieve against what the old kernel preserved.

    Reads the running `luotrace serve` (no second set of probes); where none
    answers, attaches probes of its own until q, Ctrl-C or COMMAND's end.
    Keys: v sessions / files, s sort, f filter, enter drill in, p pause, +/- delay, h help, q quit.

    \b
    Example:
      luotrace top                                  # the service's view, or probes of its own
      luotrace top --plain 2 > update.log           # a line per change, every 2 s
      luotrace top --replay before.luo --replay after.luo --speed 10
      luotrace top --model workloads/model/luo_model -- workloads/model/luo_model kexec:gmem:64M
    """
    from tracer.cli import top as tp
    interval, count, command = _top_args(args, 1e-6 if replays else 0.05)
    view_mode = "json" if as_json else "plain" if plain else "once" if once else "frames" if no_clear else \
        "screen" if sys.stdout.isatty() else "plain"
    o = tp.TopOptions(interval=interval, count=1 if once and not replays else count, mode=view_mode, maxrows=maxrows, sort=sort,
                      stall_s=fail_on_stall or stall_s, fail_on_stall=fail_on_stall is not None, fail_on=list(fail_on))
    o.history, o.before, o.before_path = tp.history_and_before(state_dir, list(histories), before, replays)
    notes: "queue.Queue[str]" = queue.Queue()
    say = notes.put if view_mode == "screen" else (lambda m: click.echo(m, err=True))
    own = bool(model or command or output) and not replays
    url = from_url or tp.DEFAULT_FROM
    if replays:
        if len(replays) > 2:
            raise LuotraceError("--replay takes at most two recordings", "give the old kernel's, then the new one's")

        frames = tp.from_replay(list(replays), interval, 0.0 if once else speed)  # --once: the end
        out = tp.show(frames, o, None, notes)
    elif not own and (from_url or tp.serve_report(url) is not None):
        say(f"luotrace: reading the service at {url} (no probes of our own)")
        def joined(rep: dict) -> None:  # the update whole: its rows are the old kernel's files
            o.before = rep
        out = tp.show(tp.from_serve(url, interval, say, joined), o, None, notes)
    else:
        from tracer.probes.plan import Options
        opts = Options(mode=mode, model=model, gmem=gmem)
        out = tp.show_own(opts, list(command) or None, o, notes, say, output, force)
    code, why = tp.exit_code(out, o)
    if why:
        click.echo(f"luotrace: failing: {'; '.join(why)}", err=True)
    sys.exit(code)


def _top_args(args: Tuple[str, ...], least: float) -> Tuple[float, Optional[int], List[str]]:
    """bcc's [INTERVAL [COUNT]], then the command to trace (after --).  A
    recording played back may step finer (its updates can last milliseconds)."""
    nums: List[str] = []
    rest = list(args)
    while rest and len(nums) < 2 and rest[0].replace(".", "", 1).isdigit():
        nums.append(rest.pop(0))
    interval = float(nums[0]) if nums else 1.0
    if not least <= interval <= 3600:
        raise LuotraceError(f"bad interval {nums[0]}", f"give seconds between {least:g} and 3600")
    count = int(float(nums[1])) if len(nums) > 1 else None
    if count is not None and count < 1:
        raise LuotraceError(f"bad count {nums[1]}", "give a positive number of frames")
    return interval, count, rest


def main(argv: Optional[List[str]] = None) -> None:
    try:
        cli.main(args=argv, prog_name="luotrace", standalone_mode=False)
    except LuotraceError as e:
        click.echo(f"luotrace: error: {printable(str(e))}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("luotrace: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        ctx_hint = "see luotrace --help"
        if isinstance(e, click.UsageError) and e.ctx is not None:
            ctx_hint = f"see {e.ctx.command_path} --help"
        click.echo(f"luotrace: error: {e.format_message()}; {ctx_hint}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("luotrace: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)

