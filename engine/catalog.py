"""Named tables: URLs or globs of Parquet files.

A catalog file is TOML::

    [tables.lineitem]
    url = "s3://warehouse/tpch/lineitem/*.parquet"

    [tables.events]
    url = "s3://warehouse/events/"        # a prefix: every Parquet file below it
    hive_partitioning = true             # dt=2024-01-01/part-0.parquet
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import CatalogError

__all__ = ["TableDef", "Catalog"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True, kw_only=True)
class TableDef:
    """A table: where its Parquet files are and how their paths are partitioned."""

    name: str
    url: str
    hive_partitioning: bool | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise CatalogError(
                f"invalid table name {self.name!r}: use letters, digits and underscores"
            )
        if not self.url or "\x00" in self.url:
            raise CatalogError(f"table {self.name!r} has no URL")

    @property
    def pattern(self) -> str:
        """The glob that lists the table's files."""
        url = self.url
        if any(ch in url for ch in "*?["):
            return url
        if url.endswith("/"):
            return url + "**/*.parquet"
        return url

    @property
    def hive(self) -> bool:
        if self.hive_partitioning is not None:
            return self.hive_partitioning
        return "=" in self.url.rsplit("/", 1)[0] or self.url.endswith("/")


class Catalog:
    """Tables by case-insensitive name."""

    def __init__(self) -> None:
        self._tables: dict[str, TableDef] = {}

    def register(self, table: TableDef) -> None:
        self._tables[table.name.lower()] = table

    def unregister(self, name: str) -> None:
        self._tables.pop(name.lower(), None)

    def get(self, name: str) -> TableDef | None:
        return self._tables.get(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._tables

    def __iter__(self) -> Iterator[TableDef]:
        return iter(sorted(self._tables.values(), key=lambda t: t.name))

    def __len__(self) -> int:
        return len(self._tables)

    def load_toml(self, path: str | Path) -> None:
        """Add the tables of a TOML catalog file."""
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise CatalogError(f"catalog file not found: {path}") from exc
        except OSError as exc:  # a directory, no permission
            raise CatalogError(f"cannot read catalog file {path}: {exc.strerror or exc}") from exc
        except (tomllib.TOMLDecodeError, ValueError) as exc:  # incl. UnicodeDecodeError, a NUL in the path
            raise CatalogError(f"invalid catalog file {path}: {exc}") from exc
        except RecursionError:
            raise CatalogError(f"invalid catalog file {path}: nested too deeply") from None
        tables = data.get("tables", {})
        if not isinstance(tables, dict):
            raise CatalogError(f"invalid catalog file {path}: [tables] must be a table of tables")
        for name, spec in tables.items():
            if isinstance(spec, str):
                spec = {"url": spec}
            if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
                raise CatalogError(f"invalid catalog file {path}: table {name!r} needs url = \"...\"")
            unknown = set(spec) - {"url", "hive_partitioning"}
            if unknown:
                raise CatalogError(
                    f"invalid catalog file {path}: table {name!r} has unknown keys {sorted(unknown)}"
                )
            hive = spec.get("hive_partitioning")
            if hive is not None and not isinstance(hive, bool):
                raise CatalogError(f"invalid catalog file {path}: hive_partitioning must be true/false")
            self.register(TableDef(name=name, url=spec["url"], hive_partitioning=hive))
