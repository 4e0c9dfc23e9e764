"""The interactive shell, driven through a pseudo-terminal with pexpect."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pexpect = pytest.importorskip("pexpect")

_SCRIPT = Path(sys.executable).with_name("shoal")
SHOAL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "shoal.cli.main"]
PROMPT = "shoal>"          # prompt_toolkit draws the trailing space with a cursor move
CONTINUATION = r"\.\.\.>"
SLOW_QUERY = "SELECT sum(hash(range)) AS h FROM range(3000000000);"   # ~10 s of CPU if not cancelled


@pytest.fixture
def shell_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    config = tmp_path / "conf" / "config.toml"
    config.parent.mkdir()
    config.write_text("[sql]\nworkers = 2\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SHOAL_", "XDG_"))}
    env.update(HOME=str(home), SHOAL_CONFIG=str(config), SHOAL_CACHE_DIR=str(tmp_path / "cache"),
               TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1", AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=str(home / "none"), AWS_SHARED_CREDENTIALS_FILE=str(home / "none"))
    return env


@pytest.fixture
def numbers(tmp_path: Path) -> Path:
    path = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"n": list(range(1, 101))}), path)
    return path


@pytest.fixture
def spawn(shell_env: dict[str, str]) -> Iterator:
    children = []

    def start(*args: str):
        child = pexpect.spawn(SHOAL[0], [*SHOAL[1:], *args], env=shell_env, encoding="utf-8",
                              timeout=20, dimensions=(40, 160))
        children.append(child)
        child.expect(PROMPT)
        return child

    yield start
    for child in children:
        if child.isalive():
            child.terminate(force=True)


def _exit(child) -> int:
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def test_shell_multiline_dot_commands_errors_and_exit(spawn, numbers: Path, shell_env: dict[str, str]) -> None:
    child = spawn("--table", f"numbers={numbers}")
    child.send("SELECT sum(n) AS total\r")
    child.expect(CONTINUATION)                      # no ';' yet: the statement goes on
    child.send("FROM numbers\r")
    child.expect(CONTINUATION)
    child.send("WHERE n <= 10;\r")
    child.expect(r"\b55\b")
    child.expect(r"1 row in \d+\.\d\d s")           # on a terminal, the count follows the table
    child.expect(PROMPT)

    child.send(".tables\r")
    child.expect("numbers")
    child.expect(re.escape(str(numbers)))
    child.expect(PROMPT)

    child.send("SELEC oops;\r")                     # a bad statement: one error line, shell goes on
    child.expect(r"shoal: error: SQL syntax error[^\r\n]*\r\n")
    child.expect(PROMPT)
    child.send("SELECT * FROM nowhere;\r")
    child.expect(r"shoal: error: [^\r\n]*nowhere")
    child.expect(PROMPT)

    child.send("SELECT 'half-typed")                # Ctrl-C at the prompt clears the line
    child.sendintr()
    child.expect(PROMPT)
    child.send("SELECT 6 * 7 AS answer;\r")
    child.expect(r"\b42\b")
    child.expect(PROMPT)

    child.send(".help\r")
    child.expect(r"\.quit")
    child.expect(PROMPT)
    assert "Traceback" not in (child.before or "")
    assert _exit(child) == 0

    history = Path(shell_env["SHOAL_CONFIG"]).parent / "history"
    assert "WHERE n <= 10;" in history.read_text()


def test_shell_ctrl_c_cancels_a_running_query(spawn) -> None:
    child = spawn()
    child.send(SLOW_QUERY + "\r")
    child.expect("running", timeout=10)             # progress shown after about a second, on a terminal
    started = time.monotonic()
    child.sendintr()
    child.expect("query cancelled", timeout=10)
    child.expect(PROMPT)
    assert time.monotonic() - started < 5
    child.send("SELECT 1 + 1 AS two;\r")             # the session is usable after the cancel
    child.expect(r"\b2\b")
    child.expect(PROMPT)
    assert _exit(child) == 0


def test_shell_quit_command(spawn) -> None:
    child = spawn()
    child.send(".quit\r")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
