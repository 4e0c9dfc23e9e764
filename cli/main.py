"""``shoal``: the command line.

Subcommands: ``sql`` (one-shot or ``-f`` script), ``shell`` (interactive;
also what plain ``shoal`` does), ``tables``, ``cache stats|clear|warm``,
``config show``.  Every expected error is one ``shoal: error: ...`` line on
stderr and an exit status from :func:`shoal.cli.errors.classify`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any, NoReturn, Sequence

from .errors import EXIT_BROKEN_PIPE, EXIT_CANCELLED, EXIT_USAGE, UsageError, classify, redact

if TYPE_CHECKING:
    from shoal.engine import Session

    from .config import TableEntry
    from .output import Printer

__all__ = ["main", "build_parser", "Context", "report_error"]

logger = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, like every other error of the CLI."""

    def error(self, message: str) -> NoReturn:
        print(f"shoal: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _common_options() -> argparse.ArgumentParser:
    from .config import FORMATS

    # SUPPRESS: an option not given leaves no attribute, so one given before the
    # subcommand is not reset by the subcommand's parser.
    common = _Parser(add_help=False, argument_default=argparse.SUPPRESS)
    conf = common.add_argument_group("configuration (flags > SHOAL_* environment > config file)")
    conf.add_argument("--config", metavar="FILE",
                      help="config file (default $SHOAL_CONFIG or ~/.config/shoal/config.toml)")
    conf.add_argument("--table", metavar="NAME=URL", action="append", help="name a table (repeatable)")
    conf.add_argument("--catalog", metavar="FILE", help="TOML catalog of tables [SHOAL_CATALOG]")
    conf.add_argument("--workers", metavar="N", help="scan workers [SHOAL_WORKERS]")
    conf.add_argument("--cluster", metavar="ADDRESS",
                      help="run workers on Ray: ray://host:port, host:port or auto [SHOAL_CLUSTER]")
    conf.add_argument("--cache-dir", metavar="DIR", help="block cache directory [SHOAL_CACHE_DIR]")
    conf.add_argument("--cache-size", metavar="SIZE", help="cache size limit, e.g. 20GB [SHOAL_CACHE_SIZE]")
    conf.add_argument("--no-cache", dest="cache_enabled", action="store_false", help="read through without caching")
    conf.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint [SHOAL_ENDPOINT_URL, AWS_ENDPOINT_URL_S3]")
    conf.add_argument("--region", metavar="NAME", help="S3 region [SHOAL_REGION, AWS_REGION]")
    conf.add_argument("--profile-name", metavar="NAME", help="AWS profile for credentials [AWS_PROFILE]")
    conf.add_argument("--anonymous", action="store_true", help="unsigned S3 requests (public buckets)")
    conf.add_argument("--debug", action="store_true", help="full tracebacks and debug logging")
    out = common.add_argument_group("output")
    out.add_argument("--format", metavar="{" + ",".join(FORMATS) + "}", help="output format [SHOAL_FORMAT]")
    out.add_argument("-o", "--output", metavar="FILE", help="write results to FILE (required for parquet)")
    out.add_argument("--max-rows", metavar="N", help="print at most N rows (table, csv, json)")
    out.add_argument("--profile", action="store_true", help="print the query profile to stderr")
    return common


def build_parser() -> argparse.ArgumentParser:
    from shoal.cli import __version__

    common = _common_options()
    parser = _Parser(prog="shoal", parents=[common],
                     description="SQL over Parquet in S3-compatible object storage, through a local block cache. "
                                 "Without a subcommand: the interactive shell (or statements from stdin).")
    parser.add_argument("--version", action="version", version=f"shoal {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    sql = commands.add_parser("sql", parents=[common], help="run SQL statements and print the results")
    sql.add_argument("query", nargs="?", help="SQL text (one or more statements separated by ';')")
    sql.add_argument("-f", "--file", metavar="FILE", help="read statements from FILE ('-' for stdin)")
    commands.add_parser("shell", parents=[common], help="interactive SQL shell")
    commands.add_parser("tables", parents=[common], help="list named tables (--table, --catalog, config)")

    cache = commands.add_parser("cache", parents=[common], help="inspect and manage the block cache")
    cache_commands = cache.add_subparsers(dest="cache_command", metavar="ACTION", parser_class=_Parser)
    cache_commands.required = True
    stats = cache_commands.add_parser("stats", parents=[common], help="hits, misses, bytes, size")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    cache_commands.add_parser("clear", parents=[common], help="remove every cached block")
    warm = cache_commands.add_parser("warm", parents=[common], help="read a table or URL into the cache")
    warm.add_argument("target", metavar="URL_OR_TABLE", help="table name, object URL, prefix (ending in /) or glob")

    # Listed for --help; "shoal worker ..." is dispatched before parsing (its own flags).
    commands.add_parser("worker", help="serve this machine's block cache to peers (see shoal worker --help)")
    config = commands.add_parser("config", parents=[common], help="show the effective configuration")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", parser_class=_Parser)
    config_commands.required = True
    show = config_commands.add_parser("show", parents=[common], help="each value and where it came from")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


class Context:
    """One invocation: its configuration, its (lazily started) session, its output."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.debug = bool(getattr(args, "debug", False))
        flags = {name: getattr(args, name, None) for name in (
            "cache_dir", "cache_size", "cache_enabled", "endpoint_url", "region", "profile_name",
            "anonymous", "workers", "cluster", "format", "catalog", "max_rows")}
        if not flags["anonymous"]:
            flags["anonymous"] = None  # a flag that was not given does not override the environment
        from .config import Config

        self.config = Config(flags, config_file=getattr(args, "config", None),
                             table_flags=getattr(args, "table", None))
        self.fmt: str = self.config["sql.format"]
        self.max_rows: int | None = self.config["sql.max_rows"]
        self.output: str | None = getattr(args, "output", None)
        self.profile = bool(getattr(args, "profile", False))
        self._session: Session | None = None

    # -- tables -------------------------------------------------------------------------

    def table_entries(self) -> list["TableEntry"]:
        """Tables by precedence: --table over the catalog file over the config file."""
        from shoal.engine import Catalog

        from .config import TableEntry

        entries = {e.table.name.lower(): e for e in self.config.table_entries if e.source != "--table"}
        catalog_path = self.config["sql.catalog"]
        if catalog_path:
            catalog = Catalog()
            catalog.load_toml(catalog_path)
            for table in catalog:
                entries[table.name.lower()] = TableEntry(table, f"catalog {catalog_path}")
        for entry in self.config.table_entries:
            if entry.source == "--table":
                entries[entry.table.name.lower()] = entry
        return sorted(entries.values(), key=lambda e: e.table.name)

    # -- session ------------------------------------------------------------------------

    def session(self) -> "Session":
        if self._session is None:
            from shoal.engine import Session

            entries = self.table_entries()
            options: dict[str, Any] = {"executor": self.config["sql.executor"]} if self.config["sql.executor"] else {}
            if self.config["sql.cluster"]:
                options = {"executor": "ray", "executor_options": {"address": self.config["sql.cluster"]}}
            session = Session(cache=self.config.cache_config(), store=self.config.store_config(),
                              workers=self.config["sql.workers"], **options)
            for entry in entries:
                session.catalog.register(entry.table)
            self._session = session
        return self._session

    def printer(self) -> "Printer":
        from .output import Printer

        return Printer(self.fmt, output=self.output, max_rows=self.max_rows)

    def execute(self, statement: str, printer: "Printer") -> None:
        """Run one statement and print its result (and profile)."""
        from .progress import run_statement

        started = time.perf_counter()
        result = run_statement(self.session(), statement)
        elapsed = time.perf_counter() - started
        printer.result(result.table, message=result.message, elapsed=elapsed)
        if self.profile and result.profile.plan is not None:
            from shoal.engine.profile import render_explain

            print(render_explain(result.profile, analyze=True), file=sys.stderr, flush=True)

    def report_error(self, exc: BaseException) -> int:
        return report_error(exc, debug=self.debug)

    def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            session.close()


def report_error(exc: BaseException, *, debug: bool) -> int:
    """Print the one error line (after the traceback with --debug); return the exit status."""
    code, message = classify(exc)
    if debug:
        print(redact("".join(traceback.format_exception(exc))), file=sys.stderr, end="")
    print(f"shoal: error: {message}", file=sys.stderr, flush=True)
    return code


class _OneLine(logging.Formatter):
    """``shoal: warning: message`` (no traceback unless --debug)."""

    def format(self, record: logging.LogRecord) -> str:
        text = " ".join(record.getMessage().split())
        return redact(f"shoal: {record.levelname.lower()}: {text}")


def _configure_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if debug:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("shoal").setLevel(logging.DEBUG)
    else:
        handler.setFormatter(_OneLine())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    for noisy in ("botocore", "aiobotocore", "urllib3", "asyncio", "fsspec", "s3fs", "aiohttp"):
        logging.getLogger(noisy).setLevel(logging.INFO if debug else logging.ERROR)


def _dispatch(ctx: Context, args: argparse.Namespace) -> int:
    from . import commands

    command = getattr(args, "command", None)
    if command == "sql":
        return commands.sql(ctx, getattr(args, "query", None), getattr(args, "file", None))
    if command == "tables":
        return commands.tables(ctx)
    if command == "cache":
        return commands.cache(ctx, args.cache_command, getattr(args, "target", None), getattr(args, "json", False))
    if command == "config":
        return commands.config_show(ctx, getattr(args, "json", False))
    if ctx.output and sys.stdin.isatty():
        raise UsageError("--output applies to 'shoal sql' and piped statements, not to the interactive shell")
    from .shell import run_shell

    return run_shell(ctx)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``shoal`` console script; returns the exit status."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before a query started (imports, startup)
        print("shoal: error: interrupted", file=sys.stderr, flush=True)
        return EXIT_CANCELLED


def _main(argv: Sequence[str] | None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["worker"]:
        # A standalone peer-cache worker has its own flags (shoal worker --help).
        from shoal.transport.worker import main as worker_main

        return int(worker_main(args_list[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    _configure_logging(debug)
    ctx: Context | None = None
    try:
        ctx = Context(args)
        return _dispatch(ctx, args)
    except BrokenPipeError:
        # The reader went away (`shoal sql ... | head`): stop quietly, like other tools.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except BaseException as exc:  # noqa: BLE001 - the one place errors become exit statuses
        if isinstance(exc, SystemExit):
            raise
        return report_error(exc, debug=debug)
    finally:
        if ctx is not None:
            try:
                ctx.close()
            except Exception as exc:  # noqa: BLE001 - closing must not hide the result
                logger.debug("closing the session failed: %s", exc)


if __name__ == "__main__":
    sys.exit(main())
