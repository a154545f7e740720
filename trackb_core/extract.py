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
import io
import random
import tokenize
import warnings
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from trackb_core.config import StageConfig, input_field
from trackb_core.corpus import python_files, resolve_corpus
from trackb_core.errors import InputError
from trackb_core.stage import say, stage_run
from trackb_core.store import Store
from trackb_core.tasks import CATEGORIES, build_tasks

SKIP_REASONS = ("not_utf8", "syntax_error", "too_large")


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
    categories: list[str] = Field(
        list(CATEGORIES), description="Task families to build (comma-separated)."
    )

    @field_validator("categories")
    @classmethod
    def _known_categories(cls, value: list[str]) -> list[str]:
        unknown = [c for c in value if c not in CATEGORIES]
        if unknown:
            raise ValueError(f"unknown categories {unknown}; choose from {list(CATEGORIES)}")
        if not value:
            raise ValueError(f"name at least one of {list(CATEGORIES)}")
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

        with run.timed("extract"):
            files = python_files(corpus.path)
            functions, files_skipped, functions_skipped = extract_functions(
                corpus.path, files, config.min_lines, config.max_lines, config.max_file_bytes
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
            tasks, tasks_skipped = build_tasks(functions, config.categories, config.seed)
        if not tasks:
            raise InputError(f"no tasks could be built from corpus {config.corpus} "
                             f"(skipped: {tasks_skipped})")

        run.write_jsonl("functions.jsonl", functions)
        run.write_jsonl("tasks.jsonl", tasks)

        per_category = {c: 0 for c in CATEGORIES if c in config.categories}
        for task in tasks:
            per_category[task["category"]] += 1
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
        })
        meta = corpus.metadata
        run.extra["corpus"] = {
            "uri": config.corpus,
            "name": meta.get("name", Path(corpus.path).name),
            "version": meta.get("version"),
            "sha256": corpus.sha256,
        }
        say("extract", f"{len(tasks)} tasks {per_category}; skipped {tasks_skipped}")
    return run.manifest


def extract_functions(
    root: Path, files: list[Path], min_lines: int, max_lines: int, max_file_bytes: int
) -> tuple[list[dict[str, Any]], dict[str, int], dict[str, int]]:
    """``(functions, files_skipped, functions_skipped)`` for ``files`` under ``root``.

    Never raises for a bad file: it is skipped and counted under its reason.
    """
    from tqdm import tqdm

    functions: list[dict[str, Any]] = []
    files_skipped = dict.fromkeys(SKIP_REASONS, 0)
    functions_skipped: dict[str, int] = {}
    for path in tqdm(files, desc="extract", unit="file", disable=None):
        rel = path.relative_to(root).as_posix()
        data = path.read_bytes()
        if len(data) > max_file_bytes:
            files_skipped["too_large"] += 1
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            files_skipped["not_utf8"] += 1
            continue
        try:
            found, skipped = functions_in_source(text, rel, min_lines, max_lines)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            files_skipped["syntax_error"] += 1
            continue
        functions.extend(found)
        for reason, n in skipped.items():
            functions_skipped[reason] = functions_skipped.get(reason, 0) + n
    return functions, files_skipped, functions_skipped


def functions_in_source(
    text: str, rel: str, min_lines: int = 5, max_lines: int = 60
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The function rows of one file's text, in source order, and skips by reason.

    Raises SyntaxError (or ValueError for null bytes) if ``text`` does not parse.
    """
    # ast numbers lines on \n, \r\n and \r alike; one convention keeps slices aligned.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old code
        tree = ast.parse(text)
    lines = text.split("\n")
    rows: list[dict[str, Any]] = []
    skipped: dict[str, int] = {}
    for node, qualname, is_method in _walk_functions(tree):
        n_lines = node.end_lineno - node.lineno + 1
        if not min_lines <= n_lines <= max_lines:
            continue
        source = _function_source(lines, node)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ast.parse(source)
            signature = function_signature(source)
        except (SyntaxError, ValueError, tokenize.TokenError):
            skipped["unparsable_source"] = skipped.get("unparsable_source", 0) + 1
            continue
        rows.append({
            "id": hashlib.sha256(f"{rel}::{qualname}::{node.lineno}".encode()).hexdigest()[:12],
            "name": node.name,
            "qualname": qualname,
            "file": rel,
            "line": node.lineno,
            "end_line": node.end_lineno,
            "n_lines": n_lines,
            "source": source,
            "signature": signature,
            "docstring": ast.get_docstring(node),
            "args": _arguments(node.args),
            "returns": _unparse(node.returns),
            "is_async": isinstance(node, ast.AsyncFunctionDef),
            "is_method": is_method,
            "decorators": [ast.unparse(d) for d in node.decorator_list],
        })
    return rows, skipped


def _walk_functions(tree: ast.Module):
    """``(node, qualname, is_method)`` for every function, in source order.

    Qualified names follow Python's ``__qualname__``: ``Class.method``,
    ``outer.<locals>.inner``.
    """

    def visit(node: ast.AST, prefix: str, in_class: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                qualname = f"{prefix}{child.name}"
                yield child, qualname, in_class
                yield from visit(child, f"{qualname}.<locals>.", False)
            elif isinstance(child, ast.ClassDef):
                yield from visit(child, f"{prefix}{child.name}.", True)
            else:
                # Functions inside if/try/with blocks keep the enclosing scope's prefix.
                yield from visit(child, prefix, in_class and _is_block(child))

    yield from visit(tree, "", False)


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


def function_signature(source: str) -> str:
    """The ``def ...:`` header of ``source``, up to and including its colon.

    Raises tokenize.TokenError if ``source`` does not tokenize.
    """
    depth = 0
    seen_def = False
    lines = source.split("\n")
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.string == "def" and depth == 0:
            seen_def = True
        elif tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        elif seen_def and depth == 0 and tok.type == tokenize.OP and tok.string == ":":
            row, col = tok.end
            return "\n".join(lines[: row - 1] + [lines[row - 1][:col]])
    raise ValueError("no function header found")


def _unparse(node: ast.AST | None) -> str | None:
    return None if node is None else ast.unparse(node)


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
