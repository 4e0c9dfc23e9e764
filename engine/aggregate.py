"""Partial aggregation on workers, for single-table aggregate queries.

``SELECT g, sum(x), avg(y) FROM t WHERE p GROUP BY g`` runs on each worker as
``SELECT g AS __g0, sum(x) AS __a0, sum(y) AS __a1s, count(y) AS __a1c FROM
fragment WHERE p GROUP BY g`` and the coordinator merges the partial rows:
``SELECT __g0 AS g, sum(__a0), CAST(sum(__a1s) AS DOUBLE) / sum(__a1c) FROM
partials GROUP BY __g0``.  Only a few hundred rows travel instead of the scan.

The rewrite works on DuckDB's own parse tree (``json_serialize_sql`` /
``json_deserialize_sql``).  Anything it does not understand (joins, CTEs,
subqueries, windows, DISTINCT or FILTERed aggregates, aggregates other than
sum/count/min/max/avg, GROUP BY ordinals or ALL) leaves the query as it is:
workers then ship the filtered scan and the coordinator aggregates.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Iterator

import duckdb

from .sqlinfo import parse_tree

__all__ = ["PartialAggregate", "plan_partial_aggregate", "PARTIAL_TABLE"]

PARTIAL_TABLE = "__shoal_partial"
_MERGEABLE = {"sum", "count", "count_star", "min", "max", "avg"}
_LOCATION_KEYS = {"query_location", "query_location_length", "alias"}


@dataclass(frozen=True)
class PartialAggregate:
    """What workers compute per fragment and how the coordinator merges it."""

    worker_select: str
    worker_group_by: str | None
    where: str | None
    source_alias: str
    merge_sql: str


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _canonical(node: Any) -> str:
    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in _LOCATION_KEYS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return json.dumps(strip(node), sort_keys=True)


class _Unsupported(Exception):
    pass


class _Rewriter:
    def __init__(self, con: duckdb.DuckDBPyConnection, template: dict[str, Any]) -> None:
        self.con = con
        self.template = template  # a parsed "SELECT 1" statement, to print expressions
        self.aggregates: dict[str, tuple[str, list[str]]] = {}  # canonical -> (kind, partial names)
        self.worker_items: list[str] = []

    def text(self, expression: dict[str, Any]) -> str:
        statement = copy.deepcopy(self.template)
        node = statement["statements"][0]["node"]
        node["select_list"] = [{**expression, "alias": ""}]
        sql = self.con.execute("SELECT json_deserialize_sql(?)", [json.dumps(statement)]).fetchall()[0][0]
        return sql.strip().rstrip(";").removeprefix("SELECT ").strip()

    def expression(self, sql: str, alias: str) -> dict[str, Any]:
        node = parse_tree(self.con, f"SELECT {sql}")["statements"][0]["node"]["select_list"][0]
        return {**node, "alias": alias}

    def aggregate(self, node: dict[str, Any]) -> dict[str, Any]:
        name = node["function_name"].lower()
        if name not in _MERGEABLE or node.get("distinct") or node.get("filter") or (
            node.get("order_bys") or {}
        ).get("orders"):
            raise _Unsupported(name)
        key = _canonical(node)
        if key not in self.aggregates:
            n = len(self.aggregates)
            args = [a["expression"] if isinstance(a, dict) and "expression" in a else a for a in node["arguments"]]
            arg = self.text(args[0]) if args else "*"
            if name == "avg":
                names = [f"__a{n}s", f"__a{n}c"]
                self.worker_items += [f"sum({arg}) AS {names[0]}", f"count({arg}) AS {names[1]}"]
            else:
                names = [f"__a{n}"]
                worker = "count(*)" if name == "count_star" else f"{name}({arg})"
                self.worker_items.append(f"{worker} AS {names[0]}")
            self.aggregates[key] = (name, names)
        kind, names = self.aggregates[key]
        if kind == "avg":
            merge = f"CAST(sum({names[0]}) AS DOUBLE) / sum({names[1]})"
        elif kind in ("count", "count_star"):
            merge = f"CAST(coalesce(sum({names[0]}), 0) AS BIGINT)"
        else:  # sum, min, max merge with themselves
            merge = f"{kind}({names[0]})"
        return self.expression(merge, node.get("alias", ""))

    def replace(self, node: Any, groups: dict[str, int]) -> Any:
        if isinstance(node, list):
            return [self.replace(item, groups) for item in node]
        if not isinstance(node, dict):
            return node
        key = _canonical(node)
        if key in groups and node.get("class") not in (None,):
            return {"class": "COLUMN_REF", "type": "COLUMN_REF", "alias": node.get("alias", ""),
                    "column_names": [f"__g{groups[key]}"]}
        if node.get("class") == "FUNCTION" and self._is_aggregate(node["function_name"]):
            return self.aggregate(node)
        if node.get("class") in {"WINDOW", "SUBQUERY"}:
            raise _Unsupported(node["class"])
        return {k: self.replace(v, groups) for k, v in node.items()}

    def _is_aggregate(self, name: str) -> bool:
        rows = self.con.execute(
            "SELECT count(*) FROM duckdb_functions() WHERE function_name = ? AND function_type = 'aggregate'",
            [name.lower()],
        ).fetchall()
        return bool(rows[0][0])


def _default_name(rewriter: _Rewriter, item: dict[str, Any]) -> str:
    if item.get("class") == "COLUMN_REF":
        return item["column_names"][-1]
    return rewriter.text(item)


def plan_partial_aggregate(con: duckdb.DuckDBPyConnection, sql: str, table: str) -> PartialAggregate | None:
    """The partial-aggregation rewrite of ``sql`` over ``table``, or None when not applicable."""
    tree = parse_tree(con, sql)
    if len(tree.get("statements", [])) != 1:
        return None
    node = tree["statements"][0]["node"]
    if node.get("type") != "SELECT_NODE" or node.get("cte_map", {}).get("map"):
        return None
    source = node.get("from_table") or {}
    if source.get("type") != "BASE_TABLE" or source.get("table_name", "").lower() != table.lower():
        return None
    if node.get("aggregate_handling") != "STANDARD_HANDLING" or node.get("qualify") or node.get("sample"):
        return None
    if len(node.get("group_sets") or [[]]) > 1 or any(
        n.get("class") in {"WINDOW", "SUBQUERY"} for n in _walk([node.get("select_list"), node.get("where_clause")])
    ):
        return None
    groups_nodes = node.get("group_expressions") or []
    if any(g.get("class") == "CONSTANT" for g in groups_nodes):
        return None  # GROUP BY 1, 2: positions in the select list
    rewriter = _Rewriter(con, parse_tree(con, "SELECT 1"))
    try:
        groups = {_canonical(g): i for i, g in enumerate(groups_nodes)}
        # Output names stay those of the original query (DuckDB names an
        # unaliased expression by its text).
        named = [item if item.get("alias") else {**item, "alias": _default_name(rewriter, item)}
                 for item in node["select_list"]]
        select_list = rewriter.replace(named, groups)
        having = rewriter.replace(node.get("having"), groups)
        modifiers = rewriter.replace(node.get("modifiers"), groups)
        where = rewriter.text(node["where_clause"]) if node.get("where_clause") else None
    except _Unsupported:
        return None
    if not rewriter.aggregates:
        return None
    aliases = {item.get("alias") for item in node["select_list"] if item.get("alias")}
    merged = copy.deepcopy(node)
    merged.update(select_list=select_list, having=having, modifiers=modifiers, where_clause=None)
    merged["group_expressions"] = [
        {"class": "COLUMN_REF", "type": "COLUMN_REF", "alias": "", "column_names": [f"__g{i}"]}
        for i in range(len(groups_nodes))
    ]
    merged["from_table"] = {**source, "table_name": PARTIAL_TABLE, "alias": "",
                            "qualified_name": {"path": [PARTIAL_TABLE]}}
    for column in _walk([select_list, having]):
        if column.get("class") == "COLUMN_REF" and not column["column_names"][-1].startswith(("__g", "__a")):
            return None  # a column outside any aggregate or group expression
    for column in _walk(modifiers):
        name = column.get("column_names", [""])[-1] if column.get("class") == "COLUMN_REF" else None
        if name is not None and not name.startswith(("__g", "__a")) and name not in aliases:
            return None
    statement = {**tree, "statements": [{**tree["statements"][0], "node": merged}]}
    merge_sql = con.execute("SELECT json_deserialize_sql(?)", [json.dumps(statement)]).fetchall()[0][0]
    group_texts = [rewriter.text(g) for g in groups_nodes]
    worker_select = ", ".join([f"{t} AS __g{i}" for i, t in enumerate(group_texts)] + rewriter.worker_items)
    return PartialAggregate(
        worker_select=worker_select,
        worker_group_by=", ".join(group_texts) or None,
        where=where,
        source_alias=source.get("alias") or source["table_name"],
        merge_sql=merge_sql,
    )
