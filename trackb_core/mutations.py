"""One-site bug mutations of a function, located on the AST and balanced across a corpus.

A mutation changes exactly one AST node of a function and nothing else: never a
string, docstring or comment (the seed's text replaces hit all three, field notes §1).
Sites are found by walking the AST; the characters to rewrite are the operator or
keyword between two AST nodes, or a node's own span. Between two operands of an
expression there can only be brackets, whitespace, line continuations, comments and
the operator itself, so scanning that gap (comments dropped) finds the operator
exactly without tokenizing the whole function. The rewrite touches one line, so the
mutation is recorded as that whole line before and after.

Kinds (the seed's list, then extras natural to the same operators):

========================  =========================================================
``off_by_one``            ``x + 1`` / ``x - 1`` -> ``x``; ``range(n)`` -> ``range(n - 1)``
``eq_flip``               ``==`` <-> ``!=``
``is_not_to_is``          ``is not`` -> ``is``
``not_in_to_in``          ``not in`` -> ``in``
``return_value_removed``  ``return x`` -> ``return``
``bool_flip``             ``True`` <-> ``False``
``lte_to_lt``             ``<=`` -> ``<``
``gte_to_gt``             ``>=`` -> ``>``
``not_dropped``           ``not x`` -> ``x``
``and_or_swap``           ``and`` <-> ``or``
``is_to_is_not``          ``is`` -> ``is not`` (extra)
``in_to_not_in``          ``in`` -> ``not in`` (extra)
``lt_to_lte``             ``<`` -> ``<=`` (extra)
``gt_to_gte``             ``>`` -> ``>=`` (extra)
========================  =========================================================

:func:`assign_mutations` picks one kind and site per function for a whole corpus so
that no kind dominates (the seed's "commented-out return" was a third of all items).
"""

from __future__ import annotations

import ast
import hashlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from trackb_core.codeblocks import syntax_tree

SEED_KINDS = ("off_by_one", "eq_flip", "is_not_to_is", "not_in_to_in", "return_value_removed",
              "bool_flip", "lte_to_lt", "gte_to_gt", "not_dropped", "and_or_swap")
EXTRA_KINDS = ("is_to_is_not", "in_to_not_in", "lt_to_lte", "gt_to_gte")
KINDS = SEED_KINDS + EXTRA_KINDS
MAX_KIND_SHARE = 0.25

# Comparison operator -> (kind, the operator's words as written, the replacement).
_COMPARE: dict[type[ast.cmpop], tuple[str, tuple[bytes, ...], bytes]] = {
    ast.Eq: ("eq_flip", (b"==",), b"!="),
    ast.NotEq: ("eq_flip", (b"!=",), b"=="),
    ast.IsNot: ("is_not_to_is", (b"is", b"not"), b"is"),
    ast.NotIn: ("not_in_to_in", (b"not", b"in"), b"in"),
    ast.LtE: ("lte_to_lt", (b"<=",), b"<"),
    ast.GtE: ("gte_to_gt", (b">=",), b">"),
    ast.Is: ("is_to_is_not", (b"is",), b"is not"),
    ast.In: ("in_to_not_in", (b"in",), b"not in"),
    ast.Lt: ("lt_to_lte", (b"<",), b"<="),
    ast.Gt: ("gt_to_gte", (b">",), b">="),
}
_BOOL_WORDS = {ast.And: (b"and", b"or"), ast.Or: (b"or", b"and")}
# Arguments of range() that read naturally as `arg - 1`: atoms, no operator precedence.
_ATOMS = (ast.Name, ast.Attribute, ast.Call, ast.Subscript)
_GAP_WORD = re.compile(rb"[^\s()\\]+")
# Annotations do not run, so a mutation there would be an equivalent mutant; contexts
# and operators are leaves the site finders read from their parent node.
_SKIPPED_FIELDS = frozenset({"annotation", "returns", "ctx", "type_comment", "op",
                             "ops"})

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class ParsedFunction:
    """A function's source and its AST node.

    The node may come from the whole file's tree (extract parses each file once), so
    its positions are shifted: line ``n`` of the node is line ``n - line_shift`` of
    ``source``, byte column ``c`` is ``c - col_shift`` (the def's indentation, which
    ``source`` has removed from every line).
    """

    source: str
    node: ast.FunctionDef | ast.AsyncFunctionDef
    line_shift: int = 0
    col_shift: int = 0

    @classmethod
    def parse(cls, source: str) -> ParsedFunction:
        """Parse ``source`` (one def first). Raises SyntaxError, ValueError (no def or
        null bytes), RecursionError or MemoryError (too deeply nested)."""
        tree = syntax_tree(source)
        if not tree.body or not isinstance(tree.body[0], ast.FunctionDef | ast.AsyncFunctionDef):
            raise ValueError("source does not start with a function definition")
        return cls(source, tree.body[0])

    @cached_property
    def scan(self) -> Scan:
        """The function's mutation sites and body facts, from one walk (kept)."""
        return _scan(self)

    def line(self, node_line: int) -> int:
        """The 1-based line of ``source`` for a line number of the node's tree."""
        return node_line - self.line_shift

    def col(self, node_col: int) -> int:
        """The byte column in ``source`` for a byte column of the node's tree."""
        return node_col - self.col_shift


@dataclass(frozen=True)
class Site:
    """One place a mutation of ``kind`` can be made: bytes ``start:end`` of ``line``
    (1-based, in the function's source) become ``replacement``."""

    kind: str
    line: int
    start: int
    end: int
    replacement: bytes
    # To check the rewrite: the outermost expression holding the site (None when the
    # rewrite is valid by construction), the node that changes and, below it, the
    # field that changes (("ops", 2): its third comparison operator).
    anchor: ast.expr | None = None
    target: ast.AST | None = None
    suffix: Path = ()
    shift: tuple[int, int] = (0, 0)  # the anchor's (line_shift, col_shift)


@dataclass(frozen=True)
class Scan:
    """What one walk of a function finds: its mutation sites, and whether its own body
    (not nested functions, classes or lambdas) returns or yields a value and raises."""

    sites: list[Site]
    returns_value: bool
    raises: bool


def mutation_sites(parsed: ParsedFunction) -> list[Site]:
    """Every mutation site of the function body, in walk order.

    The function's own header (parameters, defaults, annotations) is never mutated,
    nor anything inside an f-string or an annotation. Never raises for valid source.
    """
    return parsed.scan.sites


def apply_site(source: str, site: Site) -> tuple[str, dict[str, Any]] | None:
    """``(buggy_source, mutation)`` for one site, or None if the rewrite does not give
    exactly that one changed node (the check parses only the enclosing expression).

    ``mutation`` is ``{"kind", "line", "before", "after"}``: ``line`` is 1-based in
    ``source``, ``before``/``after`` the whole line.
    """
    lines = source.split("\n")
    raw = lines[site.line - 1].encode("utf-8")
    new_raw = raw[: site.start] + site.replacement + raw[site.end:]
    if site.anchor is not None and not _rewrite_is_one_site(lines, site, new_raw):
        return None
    after = new_raw.decode("utf-8")
    buggy = "\n".join(lines[: site.line - 1] + [after] + lines[site.line:])
    mutation = {"kind": site.kind, "line": site.line, "before": lines[site.line - 1],
                "after": after}
    return buggy, mutation


def inject_bug(source: str, seed: int, function_id: str,
               kind: str | None = None) -> tuple[str, dict[str, Any]] | None:
    """``(buggy_source, mutation)`` for one function on its own, or None if no site.

    The kind (unless given) and the site are drawn from ``seed`` and ``function_id``,
    stable across runs and machines. Raises what :meth:`ParsedFunction.parse` raises.
    """
    sites = mutation_sites(ParsedFunction.parse(source))
    by_kind = _group(sites)
    kinds = [kind] if kind is not None else sorted(
        by_kind, key=lambda k: _rank(seed, function_id, k))
    for chosen in kinds:
        found = _first_valid(source, by_kind.get(chosen, []), seed, function_id)
        if found is not None:
            return found
    return None


@dataclass(frozen=True)
class Assignment:
    """The corpus-wide choice: one mutant per function that has a site, and which of
    them the bugfix family leaves out to keep every kind at or under the cap."""

    mutants: dict[str, tuple[str, dict[str, Any]]]
    over_cap: frozenset[str]

    def kind_counts(self) -> dict[str, int]:
        """Mutants per kind among those kept for bugfix, in :data:`KINDS` order."""
        counts = dict.fromkeys(KINDS, 0)
        for function_id, (_, mutation) in self.mutants.items():
            if function_id not in self.over_cap:
                counts[mutation["kind"]] += 1
        return {k: n for k, n in counts.items() if n}


def assign_mutations(functions: Mapping[str, ParsedFunction], seed: int, *,
                     max_share: float = MAX_KIND_SHARE,
                     kinds: Mapping[str, int] | None = None) -> Assignment:
    """One mutant per function of ``functions`` (function id -> parsed function),
    balancing kinds across the corpus.

    The most constrained functions choose first (fewest kinds available, ties broken
    by a seeded hash); each takes the available kind used least so far (ties by a
    seeded hash) and a seeded site of that kind. If a kind still ends above
    ``max_share`` of all mutants (functions that had no other choice), the seeded
    last of them are marked ``over_cap`` until it no longer does. Deterministic for
    the same functions and seed. Functions too deeply nested to walk get no mutant.
    Only the number of kinds is held per function between counting and choosing, so a
    ``functions`` mapping that parses on access keeps no AST alive; ``kinds`` (function
    id -> its number of kinds with a site, as :func:`kinds_with_sites` counts them),
    when the caller counted them already, saves reading ``functions`` twice.
    """
    candidates: dict[str, int] = {}
    if kinds is not None:
        candidates = {function_id: n for function_id, n in kinds.items() if n}
    else:
        for function_id, parsed in functions.items():
            n = kinds_with_sites(parsed)
            if n:
                candidates[function_id] = n
    order = sorted(candidates, key=lambda f: (candidates[f], _rank(seed, f, "")))
    counts = dict.fromkeys(KINDS, 0)
    mutants: dict[str, tuple[str, dict[str, Any]]] = {}
    for function_id in order:
        try:
            parsed = functions[function_id]
            by_kind = _group(mutation_sites(parsed))
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue  # parsed on access and no longer parses: no mutant
        source = parsed.source
        for kind in sorted(by_kind, key=lambda k: (counts[k], _rank(seed, function_id, k))):
            found = _first_valid(source, by_kind[kind], seed, function_id)
            if found is not None:
                mutants[function_id] = found
                counts[kind] += 1
                break
    return Assignment(mutants, frozenset(_over_cap(mutants, seed, max_share)))


def kinds_with_sites(parsed: ParsedFunction) -> int:
    """How many mutation kinds have a site in ``parsed`` (0 when it is nested too deeply
    to walk). Raises nothing."""
    try:
        return len(_group(mutation_sites(parsed)))
    except (RecursionError, MemoryError):
        return 0


def _over_cap(mutants: dict[str, tuple[str, dict[str, Any]]], seed: int,
              max_share: float) -> set[str]:
    """Function ids to leave out so that no kind is above ``max_share`` of the rest."""
    by_kind: dict[str, list[str]] = {}
    for function_id, (_, mutation) in mutants.items():
        by_kind.setdefault(mutation["kind"], []).append(function_id)
    if len(by_kind) * max_share < 1:
        return set()  # too few kinds for the cap to be reachable at all
    total = len(mutants)
    dropped: set[str] = set()
    while True:
        kind, ids = max(by_kind.items(), key=lambda item: (len(item[1]), item[0]))
        excess = len(ids) - max_share * total
        if excess <= 0:
            return dropped
        # Dropping d items of this kind: (n - d) <= share * (total - d).
        n_drop = min(len(ids), int(-(-excess // (1 - max_share))))
        ids.sort(key=lambda f: _rank(seed, f, "cap"))
        dropped.update(ids[len(ids) - n_drop:])
        del ids[len(ids) - n_drop:]
        total -= n_drop


def _group(sites: list[Site]) -> dict[str, list[Site]]:
    by_kind: dict[str, list[Site]] = {}
    for site in sites:
        by_kind.setdefault(site.kind, []).append(site)
    return by_kind


def _rank(seed: int, function_id: str, salt: str) -> bytes:
    return hashlib.blake2b(f"{seed}:{function_id}:{salt}".encode(), digest_size=8).digest()


def _first_valid(source: str, sites: list[Site], seed: int,
                 function_id: str) -> tuple[str, dict[str, Any]] | None:
    order = sorted(range(len(sites)),
                   key=lambda i: _rank(seed, function_id, f"{sites[i].kind}:{i}"))
    for index in order:
        found = apply_site(source, sites[index])
        if found is not None:
            return found
    return None


# -- checking a rewrite ---------------------------------------------------------------


def ast_differences(a: Any, b: Any) -> list[Path]:
    """Paths (fields and list indices from the roots) of the smallest nodes where two
    ASTs differ. Positions and ``ctx`` are ignored. Iterative: any depth is fine."""
    out: list[Path] = []
    stack: list[tuple[Any, Any, Path]] = [(a, b, ())]
    while stack:
        x, y, path = stack.pop()
        if type(x) is not type(y):
            out.append(path)
        elif isinstance(x, ast.AST):
            for name in x._fields:
                if name == "ctx":
                    continue
                vx, vy = getattr(x, name, None), getattr(y, name, None)
                if isinstance(vx, list) and isinstance(vy, list):
                    if len(vx) != len(vy):
                        out.append((*path, name))
                    else:
                        stack.extend((ix, iy, (*path, name, i))
                                     for i, (ix, iy) in enumerate(zip(vx, vy, strict=True)))
                else:
                    stack.append((vx, vy, (*path, name)))
        elif x != y:
            out.append(path)
    return sorted(out, key=lambda p: tuple(str(part) for part in p))


def changed_site(original: ast.AST, mutant: ast.AST) -> Path | None:
    """The path of the smallest node holding every difference between two ASTs
    (None if they are equal)."""
    paths = ast_differences(original, mutant)
    if not paths:
        return None
    common = paths[0]
    for path in paths[1:]:
        n = 0
        while n < min(len(common), len(path)) and common[n] == path[n]:
            n += 1
        common = common[:n]
    return common


def node_at(tree: ast.AST, path: Path) -> Any:
    """The node (or field value) reached by following ``path`` from ``tree``."""
    node: Any = tree
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def _rewrite_is_one_site(lines: list[str], site: Site, new_line: bytes) -> bool:
    """Parse the site's enclosing expression with the rewrite applied: it must parse
    and differ from the original only inside the site's node."""
    anchor = site.anchor
    assert anchor is not None
    line_shift, col_shift = site.shift
    start_line, end_line = anchor.lineno - line_shift, anchor.end_lineno - line_shift
    segment: list[bytes] = []
    for number in range(start_line, end_line + 1):
        raw = lines[number - 1].encode("utf-8")
        lo = anchor.col_offset - col_shift if number == start_line else 0
        hi = anchor.end_col_offset - col_shift if number == end_line else len(raw)
        if number == site.line:
            hi += len(new_line) - len(raw)
            raw = new_line
        segment.append(raw[lo:hi])
    # Brackets let the expression span lines as it did inside its statement.
    text = b"(" + b"\n".join(segment) + b"\n)"
    try:
        rewritten = syntax_tree(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    differences = ast_differences(anchor, rewritten)
    expected = (*_path_to(anchor, site.target), *site.suffix)
    return bool(differences) and all(d[:len(expected)] == expected for d in differences)


def _path_to(root: ast.AST, target: ast.AST | None) -> Path:
    """The path from ``root`` to the node ``target`` (by identity) inside it."""
    stack: list[tuple[Any, Path]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if node is target:
            return path
        for name, value in ast.iter_fields(node):
            if isinstance(value, list):
                stack.extend((item, (*path, name, i)) for i, item in enumerate(value)
                             if isinstance(item, ast.AST))
            elif isinstance(value, ast.AST):
                stack.append((value, (*path, name)))
    raise ValueError("target is not inside root")


# -- finding sites --------------------------------------------------------------------


def _scan(parsed: ParsedFunction) -> Scan:
    """Walk the function body once, iteratively (any depth is fine): sites of every
    kind, and the body facts of the function's own scope.

    Each node travels with its anchor, the outermost expression holding it (None for
    statements), and whether it belongs to the function's own scope.
    """
    lines = parsed.source.encode("utf-8").split(b"\n")
    sites: list[Site] = []
    returns_value = raises = False
    finders, scopes, name_type = _SITE_FINDERS, _SCOPES, ast.Name
    stack: list[tuple[ast.AST, ast.expr | None, bool]] = [
        (stmt, None, True) for stmt in parsed.node.body]
    while stack:
        node, anchor, own = stack.pop()
        kind = type(node)
        finder = finders.get(kind)
        if finder is not None:
            sites.extend(finder(node, anchor, parsed, lines))
        if own:
            if kind is ast.Return:
                returns_value = returns_value or node.value is not None
            elif kind is ast.Yield or kind is ast.YieldFrom:
                returns_value = True
            elif kind is ast.Raise:
                raises = True
            elif kind in scopes:
                own = False
        fields = _CHILD_FIELDS.get(kind)
        if fields is None:
            fields = _CHILD_FIELDS[kind] = tuple(
                f for f in kind._fields if f not in _SKIPPED_FIELDS)
        for name in fields:
            value = getattr(node, name)
            for item in (value if type(value) is list else (value,)):
                # Names are the commonest node and hold nothing: not worth a visit.
                if isinstance(item, ast.AST) and type(item) is not name_type:
                    stack.append((item, anchor or (item if isinstance(item, ast.expr)
                                                   else None), own))
    return Scan(sites, returns_value, raises)


_SCOPES = frozenset({ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda})
# Fields walked per node type: no annotations (they do not run), no f-string parts
# (they are strings), no expression contexts or operators (leaves the site finders
# read from their parent), and none of the leaves' plain-value fields.
_CHILD_FIELDS: dict[type, tuple[str, ...]] = {
    ast.JoinedStr: (), ast.Name: (), ast.Constant: (), ast.alias: (), ast.arg: (),
    ast.Attribute: ("value",), ast.keyword: ("value",), ast.Global: (), ast.Nonlocal: (),
    ast.Pass: (), ast.Break: (), ast.Continue: (),
}


def _gap_words(lines: list[bytes], parsed: ParsedFunction, start: tuple[int, int],
               end: tuple[int, int]) -> list[tuple[int, int, int, bytes]]:
    """``(line, start, end, word)`` of the words between two AST positions.

    Only brackets, whitespace, continuations, comments and operators can sit between
    two operands, so dropping comments and splitting on the rest leaves the operator.
    """
    first, last = parsed.line(start[0]), parsed.line(end[0])
    words = []
    for number in range(first, last + 1):
        raw = lines[number - 1]
        lo = parsed.col(start[1]) if number == first else 0
        hi = parsed.col(end[1]) if number == last else len(raw)
        segment = raw[lo:hi]
        comment = segment.find(b"#")
        if comment >= 0:
            segment = segment[:comment]
        words += [(number, lo + m.start(), lo + m.end(), m.group())
                  for m in _GAP_WORD.finditer(segment)]
    return words


def _operator_between(lines, parsed, left: ast.AST, right: ast.AST,
                      words: tuple[bytes, ...]) -> tuple[int, int, int] | None:
    """``(line, start, end)`` of the operator ``words`` between two nodes, if written
    exactly so on one line."""
    found = _gap_words(lines, parsed, (left.end_lineno, left.end_col_offset),
                       (right.lineno, right.col_offset))
    if tuple(w for *_, w in found) != words or found[0][0] != found[-1][0]:
        return None
    return found[0][0], found[0][1], found[-1][2]


def _compare_sites(node: ast.Compare, anchor, parsed, lines) -> Iterator[Site]:
    operands = [node.left, *node.comparators]
    for index, op in enumerate(node.ops):
        kind, words, replacement = _COMPARE[type(op)]
        at = _operator_between(lines, parsed, operands[index], operands[index + 1], words)
        if at is not None:
            yield Site(kind, *at, replacement, anchor, node, ("ops", index),
                       (parsed.line_shift, parsed.col_shift))


def _boolop_sites(node: ast.BoolOp, anchor, parsed, lines) -> Iterator[Site]:
    # With three or more operands one swapped keyword regroups them: not one site.
    if len(node.values) != 2:
        return
    word, replacement = _BOOL_WORDS[type(node.op)]
    at = _operator_between(lines, parsed, node.values[0], node.values[1], (word,))
    if at is not None:
        yield Site("and_or_swap", *at, replacement, anchor, node, (),
                   (parsed.line_shift, parsed.col_shift))


def _is_one(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is int and node.value == 1


def _binop_sites(node: ast.BinOp, anchor, parsed, lines) -> Iterator[Site]:
    """``x + 1`` / ``x - 1`` -> ``x`` and ``1 + x`` -> ``x``."""
    symbol = {ast.Add: b"+", ast.Sub: b"-"}.get(type(node.op))
    if symbol is None:
        return
    shift = (parsed.line_shift, parsed.col_shift)
    if _is_one(node.right):
        at = _operator_between(lines, parsed, node.left, node.right, (symbol,))
        if at is None or parsed.line(node.right.end_lineno) != at[0]:
            return
        line, start, _ = at
        raw = lines[line - 1]
        while start > 0 and raw[start - 1:start] in (b" ", b"\t"):
            start -= 1
        yield Site("off_by_one", line, start, parsed.col(node.right.end_col_offset), b"",
                   anchor, node, (), shift)
    elif _is_one(node.left) and symbol == b"+":
        at = _operator_between(lines, parsed, node.left, node.right, (symbol,))
        if at is None or parsed.line(node.left.lineno) != at[0]:
            return
        line, _, end = at
        raw = lines[line - 1]
        while end < len(raw) and raw[end:end + 1] in (b" ", b"\t"):
            end += 1
        yield Site("off_by_one", line, parsed.col(node.left.col_offset), end, b"",
                   anchor, node, (), shift)


def _range_sites(node: ast.Call, anchor, parsed, lines) -> Iterator[Site]:
    """``range(n)`` / ``range(a, n)`` -> ``range(n - 1)``: one iteration short."""
    if not (isinstance(node.func, ast.Name) and node.func.id == "range"
            and 1 <= len(node.args) <= 2 and not node.keywords):
        return
    index = len(node.args) - 1
    stop = node.args[index]
    if isinstance(stop, _ATOMS):
        line, col = parsed.line(stop.end_lineno), parsed.col(stop.end_col_offset)
        yield Site("off_by_one", line, col, col, b" - 1", anchor, stop, (),
                   (parsed.line_shift, parsed.col_shift))


def _not_sites(node: ast.UnaryOp, anchor, parsed, lines) -> Iterator[Site]:
    if not isinstance(node.op, ast.Not) or node.operand.lineno != node.lineno:
        return
    line, start = parsed.line(node.lineno), parsed.col(node.col_offset)
    raw = lines[line - 1]
    if raw[start:start + 3] != b"not":
        return
    end = start + 3
    while raw[end:end + 1] in (b" ", b"\t"):
        end += 1
    yield Site("not_dropped", line, start, end, b"", anchor, node, (),
               (parsed.line_shift, parsed.col_shift))


def _return_sites(node: ast.Return, anchor, parsed, lines) -> Iterator[Site]:
    """``return x`` -> ``return``: one line, a real value, and no string literal lost."""
    value = node.value
    if value is None or node.end_lineno != node.lineno or (
            isinstance(value, ast.Constant) and value.value is None):
        return
    if any(isinstance(n, ast.JoinedStr) or (isinstance(n, ast.Constant)
                                            and isinstance(n.value, str | bytes))
           for n in ast.walk(value)):
        return
    line, start = parsed.line(node.lineno), parsed.col(node.col_offset)
    if lines[line - 1][start:start + 6] != b"return":
        return
    yield Site("return_value_removed", line, start + 6, parsed.col(node.end_col_offset), b"")


def _bool_sites(node: ast.Constant, anchor, parsed, lines) -> Iterator[Site]:
    if type(node.value) is not bool or node.end_lineno != node.lineno:
        return
    line = parsed.line(node.lineno)
    start, end = parsed.col(node.col_offset), parsed.col(node.end_col_offset)
    written = lines[line - 1][start:end]
    if written in (b"True", b"False"):
        yield Site("bool_flip", line, start, end, b"False" if node.value else b"True")


_SITE_FINDERS = {
    ast.Compare: _compare_sites,
    ast.BoolOp: _boolop_sites,
    ast.BinOp: _binop_sites,
    ast.Call: _range_sites,
    ast.UnaryOp: _not_sites,
    ast.Return: _return_sites,
    ast.Constant: _bool_sites,
}
