"""Stage ``extract``: a Python corpus -> its functions -> instruction tasks.

Walks every ``.py`` file of the corpus in sorted path order, keeps every function and
method of ``min_lines``-``max_lines`` source lines (the ``def`` line to the last body
line, decorators excluded, as the seed counted), and builds the task families of
:mod:`trackb_core.tasks` from them. Files that are not UTF-8, do not parse or are too
large are skipped and counted by reason; they never stop the run.
"""

from __future__ import annotations

import ast
import hashlib
import os
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from trackb_core import corpus_env, difftest, families
from trackb_core.codeblocks import syntax_tree
from trackb_core.config import StageConfig, input_field
from trackb_core.corpus import SNAPSHOT_FILE, python_files, resolve_corpus, snapshot_bytes
from trackb_core.errors import InputError
from trackb_core.mutations import KINDS, ParsedFunction
from trackb_core.stage import say, stage_run
from trackb_core.store import Store
from trackb_core.tasks import build_tasks, paused_gc

SKIP_REASONS = ("not_utf8", "syntax_error", "too_deep", "too_large", "unreadable")


class ExtractConfig(StageConfig):
    """Extract functions from a Python corpus and build instruction tasks from them.

    Reads a corpus: a local folder of .py files, or pypi:NAME==VERSION (downloaded with
    pip, unpacked and cached under $TRACKB_CACHE/corpus). Writes functions.jsonl (one
    row per function: name, file, line, source, signature, docstring, args, ...) and
    tasks.jsonl (id, category, instruction, source_function, source_file, ...).
    """

    corpus: str = input_field(
        "pypi:verl==0.9.1",
        description="Corpus to walk: a folder of .py files or pypi:NAME==VERSION.",
        kind="corpus",
    )
    min_lines: int = Field(5, ge=1, description="Smallest function kept, in source lines.")
    max_lines: int = Field(60, ge=1, description="Largest function kept, in source lines.")
    max_file_bytes: int = Field(
        1_000_000, ge=1, description="Files larger than this many bytes are skipped."
    )
    max_functions: int | None = Field(
        None, ge=1,
        description="Keep a seeded random sample of this many functions (none: keep all).",
    )
    seed: int = Field(42, description="Seed for the function sample and bug injection.")
    derive_tests: bool = Field(
        True, description="Derive hidden unit tests by differential execution: call each "
        "function the sandbox can call on generated inputs, record what the original does, "
        "and keep plain-assert tests that pass on it and catch its mutant and a stub. They "
        "are the reference teacher's unit_test answers and the functional tests of "
        "complete and bugfix items. Corpus code runs only in the sandbox.")
    execution_env: Literal["base", "declared"] = Field(
        "base", description="Where hidden tests import the corpus's modules: 'base' (the "
        "environment trackb runs in) or 'declared' (plus the corpus's declared "
        "dependencies, wheels only, installed once into $TRACKB_CACHE/envs and locked in "
        "the manifest; needs a package index at extract, and later stages install the "
        "same lock). With 'declared' the card states the share of functions whose module "
        "imports both ways.")
    categories: list[str] = Field(
        default_factory=lambda: list(families.names()),
        description="Task families to build (comma-separated); default: every registered "
        "family."
    )

    @field_validator("categories")
    @classmethod
    def _known_categories(cls, value: list[str]) -> list[str]:
        known = list(families.names())
        unknown = [c for c in value if c not in known]
        if unknown:
            raise ValueError(f"unknown categories {unknown}; choose from {known}")
        if not value:
            raise ValueError(f"name at least one of {known}")
        return value

    @model_validator(mode="after")
    def _line_range(self) -> ExtractConfig:
        if self.min_lines > self.max_lines:
            raise ValueError(f"min_lines ({self.min_lines}) is above max_lines "
                             f"({self.max_lines})")
        return self


def run(config: ExtractConfig, out: Store) -> dict[str, Any]:
    """Run the stage into ``out``; returns the manifest.

    Raises MissingInputError / InputError / ConfigError / UnavailableError from the
    corpus (see :func:`trackb_core.corpus.resolve_corpus`), InputError if no function
    at all is extracted, StoreError if ``out`` is not writable.
    """
    with stage_run("extract", config, out) as run:
        corpus = resolve_corpus(config.corpus)
        say("extract", f"corpus {config.corpus} -> {corpus.path}")

        parsed: dict[str, ParsedFunction] = {}
        with run.timed("extract"):
            files = python_files(corpus.path)
            functions, files_skipped, functions_skipped = extract_functions(
                corpus.path, files, config.min_lines, config.max_lines,
                config.max_file_bytes, parsed=parsed,
            )
        if not functions:
            skips = ", ".join(f"{k}={v}" for k, v in files_skipped.items() if v) or "none"
            raise InputError(
                f"no functions of {config.min_lines}-{config.max_lines} lines in corpus "
                f"{config.corpus} (files skipped: {skips})"
            )
        extracted = len(functions)
        if config.max_functions is not None and extracted > config.max_functions:
            keep = set(random.Random(config.seed).sample(range(extracted), config.max_functions))
            functions = [fn for i, fn in enumerate(functions) if i in keep]
        say("extract", f"{extracted} functions from {len(files)} files, "
                       f"keeping {len(functions)}")

        with run.timed("tasks"):
            tasks, tasks_skipped = build_tasks(functions, config.categories, config.seed,
                                               parsed=parsed)
        parsed.clear()  # the file ASTs are no longer needed
        if not tasks:
            raise InputError(f"no tasks could be built from corpus {config.corpus} "
                             f"(skipped: {tasks_skipped})")
        wanted = families.resolve(config.categories)
        if config.derive_tests and any(f.uses_hidden_tests for f in wanted):
            with run.timed("execution_env"):
                env = execution_env(config.execution_env, corpus.path)
                run.extra["execution_env"] = env
                env_path = corpus_env.from_manifest(env)
            with run.timed("hidden_tests"):
                run.extra["hidden_tests"] = attach_hidden_tests(
                    tasks, functions, corpus.path, config.seed, wanted, env_path)

        run.write_jsonl("functions.jsonl", functions)
        run.write_jsonl("tasks.jsonl", tasks)
        # Later stages run unit tests against these exact files, maybe with no network.
        run.write_bytes(SNAPSHOT_FILE, snapshot_bytes(corpus.path))

        per_category = {family.name: 0 for family in wanted}
        shown = {family.name for family in wanted if family.shows_mutant}
        mutation_kinds = dict.fromkeys(KINDS, 0)
        for task in tasks:
            per_category[task["category"]] += 1
            if task["category"] in shown:
                mutation_kinds[task["mutation"]["kind"]] += 1
        run.counts.update({
            "files": len(files),
            "files_skipped": files_skipped,
            "functions_extracted": extracted,
            "functions_skipped": functions_skipped,
            "functions": len(functions),
            "functions_with_docstring": sum(fn["docstring"] is not None for fn in functions),
            "tasks": len(tasks),
            "tasks_per_category": per_category,
            "tasks_skipped": tasks_skipped,
            "mutation_kinds": mutation_kinds,
        })
        meta = corpus.metadata
        run.extra["corpus"] = {
            "uri": config.corpus,
            "name": meta.get("name", Path(corpus.path).name),
            "version": meta.get("version"),
            "sha256": corpus.sha256,
        }
        say("extract", f"{len(tasks)} tasks {per_category}; skipped {tasks_skipped}")
        bugs = sum(mutation_kinds.values())
        if bugs:
            top = max(mutation_kinds, key=mutation_kinds.__getitem__)
            say("extract", f"bug kinds: {sum(n > 0 for n in mutation_kinds.values())} used, "
                           f"largest {top} {mutation_kinds[top] / bugs:.0%}")
    return run.manifest


def execution_env(mode: str, corpus: Path) -> dict[str, Any]:
    """The manifest's ``execution_env`` for ``mode``: for ``declared``, the corpus's
    requirements and the lock pip resolved for them (:mod:`trackb_core.corpus_env`).
    Raises UnavailableError (no package index), InputError (not installable as wheels)."""
    if mode != "declared":
        return corpus_env.describe(mode, [], [])
    requirements = corpus_env.declared_requirements(corpus)
    say("extract", f"execution environment: {len(requirements)} declared requirements")
    lock = corpus_env.resolve_lock(requirements)
    say("extract", f"execution environment: {len(lock)} wheels to add "
                   f"({', '.join(e['name'] for e in lock[:8])}{', ...' if len(lock) > 8 else ''})")
    return corpus_env.describe(mode, requirements, lock)


def attach_hidden_tests(tasks: list[dict[str, Any]], functions: list[dict[str, Any]],
                        corpus: Path, seed: int, wanted: list[families.Family],
                        env: Path | None = None) -> dict[str, Any]:
    """Derive each function's hidden tests (:func:`trackb_core.difftest.derive_tests`, in
    the sandbox, with the corpus's execution environment ``env`` when there is one) and
    put them on its tasks of the families that use them (field ``hidden_tests``);
    returns the counts for the manifest. With ``env``, the share of functions whose
    module imports without it is measured too (``importable_share_base``). Raises
    nothing for what the corpus code does."""
    mutants = {t["function_id"]: t["buggy_source"] for t in tasks
               if isinstance(t.get("buggy_source"), str)}
    step = max(1, len({f["file"] for f in functions}) // 10)

    def progress(done: int, total: int) -> None:
        if done == total or done % step == 0:
            say("extract", f"hidden tests: {done}/{total} modules run in the sandbox")

    workers = os.cpu_count() or 1
    base_share = None
    if env is not None:
        # the same import runs without the environment: the share it adds is measured
        base = difftest.derive_tests(functions, {}, corpus, seed=seed, workers=workers)
        base_share = base.counts(functions)["importable_share"]
    derived = difftest.derive_tests(functions, mutants, corpus, seed=seed, workers=workers,
                                    python_path=[env] if env is not None else None,
                                    progress=progress)
    users = {f.name for f in wanted if f.uses_hidden_tests}
    for task in tasks:
        tests = derived.tests.get(task["function_id"])
        if tests is not None and task["category"] in users:
            task["hidden_tests"] = tests
    counts = derived.counts(functions)
    counts["environment"] = "declared" if env is not None else "base"
    counts["importable_share_base"] = base_share if env is not None \
        else counts["importable_share"]
    say("extract", f"hidden tests for {counts['functions_with_tests']} of {len(functions)} "
                   f"functions; the modules of {counts['functions_importable']} import in "
                   "the sandbox")
    return counts


def extract_functions(
    root: Path, files: list[Path], min_lines: int, max_lines: int, max_file_bytes: int,
    *, parsed: dict[str, ParsedFunction] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int], dict[str, int]]:
    """``(functions, files_skipped, functions_skipped)`` for ``files`` under ``root``.

    Never raises for a bad file: it is skipped and counted under its reason (one of
    :data:`SKIP_REASONS`). ``parsed``, if given, is filled with each kept function's
    AST (function id -> :class:`~trackb_core.mutations.ParsedFunction`), so building
    tasks need not parse every function again.
    """
    from tqdm import tqdm

    functions: list[dict[str, Any]] = []
    files_skipped = dict.fromkeys(SKIP_REASONS, 0)
    functions_skipped: dict[str, int] = {}
    with paused_gc():
        for path in tqdm(files, desc="extract", unit="file", disable=None):
            rel = path.relative_to(root).as_posix()
            text, reason = _read_text(path, max_file_bytes)
            if reason is not None:
                files_skipped[reason] += 1
                continue
            try:
                found, skipped = _functions_with_nodes(text, rel, min_lines, max_lines)
            except (SyntaxError, ValueError):
                files_skipped["syntax_error"] += 1
                continue
            except (RecursionError, MemoryError):
                files_skipped["too_deep"] += 1  # nested deeper than the parser can build
                continue
            for row, view in found:
                functions.append(row)
                if parsed is not None:
                    parsed[row["id"]] = view
            for reason, n in skipped.items():
                functions_skipped[reason] = functions_skipped.get(reason, 0) + n
    return functions, files_skipped, functions_skipped


def _read_text(path: Path, max_file_bytes: int) -> tuple[str, str | None]:
    """``(text, None)``, or ``("", reason)`` with one of :data:`SKIP_REASONS`."""
    try:
        # Size first: a huge file is never read into memory.
        if path.stat().st_size > max_file_bytes:
            return "", "too_large"
        data = path.read_bytes()
    except OSError:
        return "", "unreadable"  # vanished, a dangling link, no permission
    if len(data) > max_file_bytes:  # grew since stat()
        return "", "too_large"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return "", "not_utf8"


def functions_in_source(
    text: str, rel: str, min_lines: int = 5, max_lines: int = 60
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The function rows of one file's text, in source order, and skips by reason.

    Raises SyntaxError (or ValueError for null bytes) if ``text`` does not parse, and
    RecursionError or MemoryError if it nests deeper than the parser can build.
    """
    found, skipped = _functions_with_nodes(text, rel, min_lines, max_lines)
    return [row for row, _ in found], skipped


def _functions_with_nodes(
    text: str, rel: str, min_lines: int, max_lines: int
) -> tuple[list[tuple[dict[str, Any], ParsedFunction]], dict[str, int]]:
    # ast numbers lines on \n, \r\n and \r alike; one convention keeps slices aligned.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    tree = syntax_tree(text)
    lines = text.split("\n")
    found: list[tuple[dict[str, Any], ParsedFunction]] = []
    skipped: dict[str, int] = {}
    for node, qualname, is_method in _walk_functions(tree):
        n_lines = node.end_lineno - node.lineno + 1
        if not min_lines <= n_lines <= max_lines:
            continue
        try:
            view = _function_view(lines, node)
            row = _function_row(view, node, rel, qualname, is_method, n_lines)
        except (SyntaxError, ValueError):
            skipped["unparsable_source"] = skipped.get("unparsable_source", 0) + 1
            continue
        except (RecursionError, MemoryError):
            # e.g. a default value nested too deeply for ast.unparse
            skipped["too_deep"] = skipped.get("too_deep", 0) + 1
            continue
        found.append((row, view))
    return found, skipped


def _function_view(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef
                   ) -> ParsedFunction:
    """The function's source with the file's own node for it, positions shifted.

    When every line of the def starts with its indentation, removing that indentation
    moves every position by the same amount, so the file's node serves as is. Lines
    further left (inside brackets or strings) move differently: then the source is
    parsed on its own, which also proves it still parses. Raises SyntaxError or
    ValueError if it does not.
    """
    body = lines[node.lineno - 1 : node.end_lineno]
    first = body[0]
    indent = first[: len(first) - len(first.lstrip())]
    source = _function_source(lines, node)
    if all(line.startswith(indent) or not line.strip() for line in body):
        return ParsedFunction(source, node, line_shift=node.lineno - 1,
                              col_shift=len(indent.encode("utf-8")))
    return ParsedFunction.parse(source)


def _function_row(view: ParsedFunction, node: ast.FunctionDef | ast.AsyncFunctionDef,
                  rel: str, qualname: str, is_method: bool, n_lines: int) -> dict[str, Any]:
    return {
        "id": hashlib.sha256(f"{rel}::{qualname}::{node.lineno}".encode()).hexdigest()[:12],
        "name": node.name,
        "qualname": qualname,
        "file": rel,
        "line": node.lineno,
        "end_line": node.end_lineno,
        "n_lines": n_lines,
        "source": view.source,
        "signature": function_signature(view.source, view),
        "docstring": ast.get_docstring(node),
        "args": _arguments(node.args),
        "returns": _unparse(node.returns),
        "is_async": isinstance(node, ast.AsyncFunctionDef),
        "is_method": is_method,
        "decorators": [_unparse(d) for d in node.decorator_list],
    }


# Per node type, its statement lists: the only places a def can sit.
_BODIES: dict[type, tuple[str, ...]] = {
    kind: tuple(f for f in ("body", "orelse", "finalbody", "handlers", "cases")
                if f in kind._fields)
    for kind in (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.If,
                 ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try,
                 ast.TryStar, ast.ExceptHandler, ast.Match, ast.match_case)
}


def _walk_functions(tree: ast.Module):
    """``(node, qualname, is_method)`` for every function, in source order.

    Qualified names follow Python's ``__qualname__``: ``Class.method``,
    ``outer.<locals>.inner``. Iterative, and only statement lists are entered (a def
    is a statement), so deeply nested expressions cost nothing here.
    """
    # (node, name, flag): a def carries its qualname and whether it is a method; any
    # other node the prefix and in-class flag that its own children inherit.
    stack: list[tuple[ast.AST, str, bool]] = [(tree, "", False)]
    while stack:
        node, name, flag = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node, name, flag
            prefix, in_class = f"{name}.<locals>.", False
        else:
            prefix, in_class = name, flag
        children = []
        for field in _BODIES.get(type(node), ()):
            for child in getattr(node, field):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                    children.append((child, f"{prefix}{child.name}", in_class))
                elif isinstance(child, ast.ClassDef):
                    children.append((child, f"{prefix}{child.name}.", True))
                else:
                    # Functions inside if/try/with blocks keep the enclosing scope's prefix.
                    children.append((child, prefix, in_class and _is_block(child)))
        stack.extend(reversed(children))


def _is_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If | ast.Try | ast.With | ast.AsyncWith | ast.For
                      | ast.AsyncFor | ast.While | ast.TryStar | ast.Match | ast.match_case
                      | ast.ExceptHandler)


def _function_source(lines: list[str], node: ast.AST) -> str:
    """The def's lines (no decorators) with the def's own indentation removed.

    Only the def line's exact indentation is stripped, and only where a line starts
    with it: continuation lines inside brackets or strings may sit further left, and
    ``textwrap.dedent`` would then dedent nothing at all.
    """
    body = lines[node.lineno - 1 : node.end_lineno]
    first = body[0]
    indent = first[: len(first) - len(first.lstrip())]
    if indent:
        body = [line[len(indent):] if line.startswith(indent) else line for line in body]
    return "\n".join(body) + "\n"


def function_signature(source: str, view: ParsedFunction | None = None) -> str:
    """The ``def ...:`` header of ``source``, up to and including its colon.

    Located on the AST: the header's colon is the first ``:`` outside a comment after
    its last parameter, default or return annotation. ``view`` is ``source`` already
    parsed. Raises ValueError if there is no def (SyntaxError if it does not parse).
    """
    view = view or ParsedFunction.parse(source)
    node, args = view.node, view.node.args
    parts = [*args.posonlyargs, *args.args, args.vararg, *args.kwonlyargs, args.kwarg,
             *args.defaults, *args.kw_defaults, node.returns]
    ends = [(n.end_lineno, n.end_col_offset) for n in parts if n is not None]
    last_line, last_col = max(ends) if ends else (node.lineno, node.col_offset)
    lines = source.split("\n")
    row, col = view.line(last_line), view.col(last_col)
    while row <= len(lines):
        raw = lines[row - 1].encode("utf-8")
        rest = raw[col:]
        colon, comment = rest.find(b":"), rest.find(b"#")
        if colon >= 0 and (comment < 0 or colon < comment):
            return "\n".join(lines[: row - 1] + [raw[: col + colon + 1].decode("utf-8")])
        row, col = row + 1, 0
    raise ValueError("no function header found")


def _unparse(node: ast.AST | None) -> str | None:
    if node is None:
        return None
    # Most annotations and defaults are a name, a dotted name or a small constant:
    # written out directly, exactly as ast.unparse would, at a fraction of its cost.
    if type(node) is ast.Name:
        return node.id
    if type(node) is ast.Attribute and type(node.value) is ast.Name:
        return f"{node.value.id}.{node.attr}"
    if type(node) is ast.Constant and (node.value is None or type(node.value) in (bool, int)):
        return repr(node.value)
    return ast.unparse(node)


def _arguments(args: ast.arguments) -> list[dict[str, Any]]:
    """Every parameter with its kind, annotation and default, in signature order."""
    positional = [(a, "posonly") for a in args.posonlyargs] + [(a, "arg") for a in args.args]
    # Defaults belong to the last positional parameters.
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults))
    defaults += list(args.defaults)
    rows = [_arg(a, kind, d) for (a, kind), d in zip(positional, defaults, strict=True)]
    if args.vararg:
        rows.append(_arg(args.vararg, "vararg", None))
    rows += [_arg(a, "kwonly", d) for a, d in zip(args.kwonlyargs, args.kw_defaults,
                                                  strict=True)]
    if args.kwarg:
        rows.append(_arg(args.kwarg, "kwarg", None))
    return rows


def _arg(arg: ast.arg, kind: str, default: ast.expr | None) -> dict[str, Any]:
    return {"name": arg.arg, "kind": kind, "annotation": _unparse(arg.annotation),
            "default": _unparse(default)}
