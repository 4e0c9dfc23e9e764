"""What a statement touches, read from DuckDB's own parser (``json_serialize_sql``).

No hand-written SQL parser: DuckDB serializes its parse tree to JSON and this
module walks it for table references and column references.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import duckdb

from .errors import SqlSyntaxError

__all__ = ["parse_tree", "table_references", "column_references", "named_columns", "reads_only_named_columns",
           "top_level_conjuncts"]


def parse_tree(con: duckdb.DuckDBPyConnection, sql: str) -> dict[str, Any]:
    """DuckDB's parse tree of ``sql`` (raises :class:`SqlSyntaxError`)."""
    try:
        rows = con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()
    except duckdb.Error as exc:  # e.g. text that is not valid UTF-8 (a lone surrogate from argv)
        text = str(exc).strip()
        raise SqlSyntaxError(f"SQL syntax error: {text.splitlines()[0] if text else type(exc).__name__}") from None
    row = rows[0] if rows else None
    tree = json.loads(row[0]) if row else {"error": True}
    if tree.get("error"):
        message = tree.get("error_message") or "cannot parse the statement"
        raise SqlSyntaxError(f"SQL syntax error: {message}")
    return tree


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def table_references(tree: dict[str, Any]) -> list[str]:
    """Names (or quoted paths) of base tables, in order of appearance, without CTE names."""
    ctes: set[str] = set()
    for node in _walk(tree):
        cte_map = node.get("cte_map")
        if isinstance(cte_map, dict):
            for entry in cte_map.get("map", []):
                key = entry.get("key")
                if isinstance(key, str):
                    ctes.add(key.lower())
    names: list[str] = []
    for node in _walk(tree):
        if node.get("type") == "BASE_TABLE" and isinstance(node.get("table_name"), str):
            name = node["table_name"]
            if node.get("schema_name") in ("", None) and name.lower() not in ctes and name not in names:
                names.append(name)
    return names


def reads_only_named_columns(tree: dict[str, Any]) -> bool:
    """Whether DuckDB can read nothing of the statement's tables but the columns
    :func:`named_columns` finds (or all of them, for ``*``).  Conservative, for
    handing DuckDB files that hold only those columns (local copies): false when
    a table or alias is also a name (``SELECT t FROM t`` reads whole rows), for
    NATURAL joins (they join on columns nobody names), PIVOT/UNPIVOT and the
    ``filename`` column (a local copy's path is not the object's URL)."""
    names, _ = named_columns(tree)
    if "filename" in names:
        return False
    relations: set[str] = set()
    expression_aliases: set[str] = set()
    for node in _walk(tree):
        if node.get("ref_type") == "NATURAL" or node.get("type") in ("PIVOT", "UNPIVOT"):
            return False
        alias = node.get("alias")
        if "class" in node:  # an expression: ``x AS nation`` names a value, not a table
            if isinstance(alias, str) and alias:
                expression_aliases.add(alias.lower())
            continue
        for name in (node.get("table_name"), alias):
            if isinstance(name, str) and name:
                relations.add(name.lower())
    # A name that is also an expression's alias most likely means that value; if
    # it meant the table, DuckDB reads a hole of a copy and the engine re-runs.
    return not (names & relations) - expression_aliases


def column_references(tree: dict[str, Any]) -> set[str]:
    """Bare column names referenced anywhere in the tree."""
    out: set[str] = set()
    for node in _walk(tree):
        if node.get("class") == "COLUMN_REF" and node.get("column_names"):
            out.add(node["column_names"][-1])
    return out


def named_columns(tree: dict[str, Any]) -> tuple[set[str], bool]:
    """Lower-cased column names a statement names (column references and
    ``USING`` columns), and whether it reads whole rows (``*``, ``COLUMNS(...)``).
    An approximation for prefetching only (DuckDB binds the statement itself):
    a name may be an alias, and a table used as a value (``SELECT t FROM t``)
    is not seen; its chunks are then read on demand."""
    names: set[str] = set()
    star = False

    def visit(node: Any, in_exists: bool) -> None:
        nonlocal star
        if isinstance(node, list):
            for item in node:
                visit(item, in_exists)
            return
        if not isinstance(node, dict):
            return
        if node.get("class") == "STAR" or node.get("type") == "STAR":
            star = star or not in_exists  # EXISTS (SELECT * ...) reads no columns
        elif node.get("class") == "COLUMN_REF" and node.get("column_names"):
            names.add(str(node["column_names"][-1]).lower())
        using = node.get("using_columns")
        if isinstance(using, list):
            names.update(str(u).lower() for u in using if isinstance(u, str))
        inside = in_exists or (node.get("class") == "SUBQUERY" and node.get("subquery_type") == "EXISTS")
        for value in node.values():
            visit(value, inside)

    visit(tree, False)
    return names, star


def _without_where(node: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in node.items() if k != "where_clause"}


def _bare_select(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    return parse_tree(con, "SELECT 1 WHERE true")["statements"][0]["node"]


def top_level_conjuncts(con: duckdb.DuckDBPyConnection, predicate: str) -> list[tuple[str, set[str]]]:
    """Split ``a AND b AND c`` into ``[(sql, columns), ...]`` using DuckDB's parser."""
    tree = parse_tree(con, f"SELECT 1 WHERE {predicate}")
    statements = tree.get("statements") or []
    node = (statements[0].get("node") or {}) if len(statements) == 1 else {}
    where = node.get("where_clause")
    # Anything but a bare predicate ("1 UNION SELECT ...", "x GROUP BY y", "x; SELECT 2")
    # changes the statement around it: refuse it rather than drop or misplace a part.
    if not isinstance(where, dict) or _without_where(node) != _without_where(_bare_select(con)):
        raise SqlSyntaxError(f"not a single predicate: {predicate!r}")
    parts = where["children"] if where.get("type") == "CONJUNCTION_AND" else [where]
    out = []
    for part in parts:
        stmt = {"error": False, "statements": [{"node": {**tree["statements"][0]["node"], "where_clause": part}, "named_param_map": []}]}
        text = con.execute("SELECT json_deserialize_sql(?)", [json.dumps(stmt)]).fetchall()[0][0]
        condition = text.split(" WHERE ", 1)[1].rstrip(";") if " WHERE " in text else text
        out.append((condition, column_references({"x": part})))
    return out
