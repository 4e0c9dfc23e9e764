"""The interactive SQL shell, and statements read from a pipe.

On a terminal: prompt_toolkit with a history file, multi-line statements
(Enter runs the statement once it ends with ``;``), Ctrl-C clears the line at
the prompt and cancels a running query, Ctrl-D exits.  Dot-commands:
``.tables``, ``.stats``, ``.format NAME``, ``.help``, ``.quit``.

Without a terminal on stdin, statements are read from stdin and run in turn;
the first error stops the run (like ``shoal sql -f``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from .config import FORMATS, state_dir
from .errors import EXIT_CANCELLED, EXIT_OK, classify
from .output import Printer
from .statements import is_complete, split_statements

if TYPE_CHECKING:
    from .main import Context

__all__ = ["run_shell", "history_path"]

BANNER = ("Shoal {version}: SQL over Parquet in object storage.\n"
          "End statements with ';'. Type .help for commands, Ctrl-D to exit.")
HELP = """\
Statements end with ';' and may span several lines.
  SELECT ... FROM name | 's3://bucket/path/*.parquet' ;
  CREATE VIEW name AS SELECT * FROM 's3://...' ;   EXPLAIN [ANALYZE] SELECT ... ;
  COPY (SELECT ...) TO 's3://bucket/out.parquet' (FORMAT parquet) ;
Commands:
  .tables           tables from --table, --catalog, the config file and CREATE VIEW
  .stats            block cache statistics
  .format [NAME]    show or set the output format (table, csv, json)
  .help             this text
  .quit             leave the shell (or Ctrl-D)
Ctrl-C cancels a running query; at the prompt it clears the line."""


def history_path() -> Path:
    return state_dir() / "history"


class Shell:
    def __init__(self, ctx: "Context") -> None:
        self.ctx = ctx
        self.fmt = ctx.fmt if ctx.fmt != "parquet" else "table"
        self.pipe_printer: Printer | None = None

    def printer(self) -> Printer:
        return Printer(self.fmt, max_rows=self.ctx.max_rows)

    def error(self, exc: BaseException) -> None:
        if classify(exc)[0] == EXIT_CANCELLED:
            print("query cancelled", file=sys.stderr, flush=True)
        else:
            self.ctx.report_error(exc)

    # -- dot-commands -------------------------------------------------------------------

    def dot(self, line: str) -> bool:
        """Run a dot-command; False means quit."""
        command, _, argument = line.strip().partition(" ")
        argument = argument.strip()
        if command in (".quit", ".exit", ".q"):
            return False
        if command == ".help":
            print(HELP)
        elif command == ".tables":
            self.ctx.execute("SHOW TABLES", self.printer())
        elif command == ".stats":
            from .commands import print_stats, stats_dict

            print_stats(stats_dict(self.ctx.session().fs, self.ctx.config["cache.enabled"]), as_json=False)
        elif command == ".format":
            if not argument:
                print(self.fmt)
            elif argument in FORMATS and argument != "parquet":
                self.fmt = argument
                if self.pipe_printer is not None:
                    self.pipe_printer.fmt = argument
            else:
                print("shoal: error: .format takes one of table, csv, json", file=sys.stderr)
        else:
            print(f"shoal: error: unknown command {command}; try .help", file=sys.stderr)
        return True

    # -- statements ---------------------------------------------------------------------

    def run_text(self, text: str) -> bool:
        """Run the statements of one input; False when one failed."""
        for statement in split_statements(text):
            try:
                self.ctx.execute(statement, self.printer())
            except Exception as exc:  # noqa: BLE001 - reported, then back to the prompt
                self.error(exc)
                return False
        return True

    def interactive(self) -> int:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings
        from shoal.cli import __version__

        path = history_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(path))
        except OSError:
            history = InMemoryHistory()
        bindings = KeyBindings()

        @bindings.add("enter")
        def _(event) -> None:  # type: ignore[no-untyped-def]
            buffer = event.current_buffer
            text = buffer.document.text
            if text.lstrip().startswith(".") or is_complete(text):
                buffer.validate_and_handle()
            else:
                buffer.insert_text("\n")

        prompt = PromptSession(history=history, key_bindings=bindings, multiline=True,
                               prompt_continuation=lambda width, line, wrap: "   ...> ".rjust(width))
        print(BANNER.format(version=__version__))
        while True:
            try:
                text = prompt.prompt("shoal> ")
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
            if not text.strip():
                continue
            if text.lstrip().startswith("."):
                try:
                    if not self.dot(text.strip()):
                        break
                except Exception as exc:  # noqa: BLE001
                    self.error(exc)
                continue
            try:
                self.run_text(text)
            except KeyboardInterrupt:
                print("query cancelled", file=sys.stderr)
        return EXIT_OK

    def piped(self, lines: Iterable[str]) -> int:
        """Run statements as they arrive; a line starting with '.' between statements is a dot-command."""
        printer = self.pipe_printer = self.ctx.printer()
        buffer = ""
        try:
            for line in lines:
                if not buffer.strip() and line.lstrip().startswith("."):
                    if not self.dot(line.strip()):
                        return EXIT_OK
                    buffer = ""
                    continue
                buffer += line
                if is_complete(buffer):
                    for statement in split_statements(buffer):
                        self.ctx.execute(statement, printer)
                    buffer = ""
            for statement in split_statements(buffer):
                self.ctx.execute(statement, printer)
        finally:
            printer.close()
        return EXIT_OK


def run_shell(ctx: "Context") -> int:
    """The interactive shell on a terminal; otherwise run the statements on stdin."""
    shell = Shell(ctx)
    if sys.stdin.isatty():
        return shell.interactive()
    return shell.piped(sys.stdin)
