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
import json
import os
import random
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from trackb_core import corpus_env, difftest, families
from trackb_core.codeblocks import syntax_tree
from trackb_core.config import input_field
from trackb_core.corpus import (
    CORPUS_HELP,
    SNAPSHOT_FILE,
    CorpusSetting,
    ResolvedCorpus,
    corpora_sha256,
    corpus_files,
    corpus_provenance,
    corpus_sources,
    resolve_corpora,
    spec_uri,
    write_snapshot,
)
from trackb_core.errors import InputError
from trackb_core.mutations import (
    KINDS,
    Assignment,
    ParsedFunction,
    assign_mutations,
    kinds_with_sites,
)
from trackb_core.partition import (
    PartitionOptions,
    Progress,
    finished_parts,
    member,
    part_store,
    part_summary,
    run_parts,
    sum_counts,
)
from trackb_core.stage import say, stage_run
from trackb_core.store import Store
from trackb_core.tasks import build_tasks, paused_gc

SKIP_REASONS = ("not_utf8", "syntax_error", "too_deep", "too_large", "unreadable")
# Modules per chunk of tasks and hidden tests: enough runs for every sandbox worker
# (difftest.MODULES_PER_RUN each), few enough that a chunk's rows stay small.
CHUNK_MODULES = 256


class ExtractConfig(PartitionOptions):
    """Extract functions from a Python corpus and build instruction tasks from them.

    Reads a corpus, or a list of corpora: local folders of .py files, pypi:NAME==VERSION
    (downloaded with pip, unpacked and cached under $TRACKB_CACHE/corpus), archives of
    a repository at a commit. Writes functions.jsonl (one row per function: name, file,
    line, source, signature, docstring, args, ...; with several corpora, file is
    <corpus>/<path> and corpus the corpus's name), tasks.jsonl (id, category,
    instruction, source_function, source_file, ...) and corpus.tar.gz.

    With ``partitions`` > 1 the tasks and hidden tests (the sandbox runs, the costly
    part) are built in that many parts, each for its share of the modules, and merged
    into the same files one part writes.
    """

    corpus: CorpusSetting = input_field("pypi:verl==0.9.1", description=CORPUS_HELP,
                                        kind="corpus")
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

    With ``partition`` set: only that part (:func:`_extract`), into its part folder of
    ``out``. With ``partitions`` > 1 and no ``partition``: every unfinished part as a
    process here (:func:`trackb_core.partition.run_parts`), then :func:`merge`;
    PartitionsFailed names the parts that failed (the others are kept).

    Streams: each file is parsed, its function rows written to a spool file and its
    AST dropped before the next; tasks (and hidden tests) are built a chunk of modules
    at a time from the kept rows. For the whole corpus only ids, mutation kinds and the
    chosen mutants are held, so peak memory does not grow with the number of files.

    Raises MissingInputError / InputError / ConfigError / UnavailableError from the
    corpora (see :func:`trackb_core.corpus.resolve_corpora`), InputError if no function
    at all is extracted, StoreError if ``out`` is not writable.
    """
    if config.partition is not None:
        part = config.part(config.partition)
        return _extract(part, part_store(out, config.partition, config.partitions))
    if config.partitions > 1:
        run_parts("extract", config, out)
        return merge(config, out)
    return _extract(config, out)


def _extract(config: ExtractConfig, out: Store) -> dict[str, Any]:
    """One stage run: the whole corpus, or with ``partition`` set one part of it.

    A part walks, samples and assigns mutants exactly as one whole run does (cheap, and
    the same in every part), then builds tasks and hidden tests only for its files
    (:func:`file_parts`), writing their rows in the whole run's order. Part 0 also
    writes functions.jsonl and corpus.tar.gz, once, for the merge: every part could,
    but each would upload the same snapshot of the corpus.
    """
    part = config.partition
    with stage_run("extract", config, out) as run:
        corpora = resolve_corpora(config.corpus)
        many = len(corpora) > 1
        for corpus in corpora:
            say("extract", f"corpus {corpus.key} -> {corpus.path}")
        wanted = families.resolve(config.categories)
        with tempfile.TemporaryDirectory(prefix="trackb-extract-") as tmp:
            spool = Path(tmp)
            with run.timed("extract"):
                walked = spool_functions(corpora, spool / "all.jsonl", config.min_lines,
                                         config.max_lines, config.max_file_bytes,
                                         key_files=many)
            if not walked.extracted:
                skips = ", ".join(f"{k}={v}" for k, v in walked.files_skipped.items()
                                  if v) or "none"
                raise InputError(
                    f"no functions of {config.min_lines}-{config.max_lines} lines in corpus "
                    f"{spec_uri(config.corpus)} (files skipped: {skips})")
            keep = None
            if config.max_functions is not None and walked.extracted > config.max_functions:
                keep = set(random.Random(config.seed).sample(range(walked.extracted),
                                                             config.max_functions))
            kept = KeptFunctions.write(spool / "all.jsonl", keep, spool / "functions.jsonl")
            (spool / "all.jsonl").unlink()
            say("extract", f"{walked.extracted} functions from {walked.files} files, "
                           f"keeping {kept.count}")

            env_path = None
            derive = config.derive_tests and any(f.uses_hidden_tests for f in wanted)
            if derive:
                with run.timed("execution_env"):
                    env = execution_env(config.execution_env, [c.path for c in corpora])
                    run.extra["execution_env"] = env
                    env_path = corpus_env.from_manifest(env)
            with run.timed("tasks"):
                assignment = kept.assign_mutations(config.seed, walked.mutation_kinds) \
                    if any(f.needs_mutants for f in wanted) else Assignment({}, frozenset())
                walked.mutation_kinds.clear()
            built = _TaskCounts(wanted)
            hidden = HiddenTestCounts()
            tests_seconds = 0.0
            progress = None
            if part is not None:
                mine = _part_files(kept, corpora, many, derive, config.partitions, part)
                progress = Progress(out, sum(mine.values()), unit="functions")
                say("extract", f"partition {part} of {config.partitions}: {len(mine)} "
                               f"files, {sum(mine.values())} functions")
            with open(spool / "tasks.jsonl", "w", encoding="utf-8") as tasks_out:
                for corpus, chunk in kept.chunks(corpora, key_files=many):
                    if part is not None:
                        chunk = [row for row in chunk if row["file"] in mine]
                        if not chunk:
                            continue
                    started = time.perf_counter()
                    tasks, skipped = build_tasks(chunk, config.categories, config.seed,
                                                 assignment=assignment)
                    run.timings["tasks"] = round(run.timings["tasks"] + time.perf_counter()
                                                 - started, 3)
                    if derive:
                        started = time.perf_counter()
                        attach_hidden_tests(tasks, chunk, corpus.path, config.seed, wanted,
                                            env_path, counts=hidden,
                                            file_prefix=f"{corpus.key}/" if many else "")
                        tests_seconds += time.perf_counter() - started
                    built.add(tasks, skipped)
                    for task in tasks:
                        tasks_out.write(json.dumps(task, sort_keys=True, ensure_ascii=False)
                                        + "\n")
                    if progress is not None:
                        progress.advance(len(chunk))
            if derive:
                run.timings["hidden_tests"] = round(tests_seconds, 3)
                run.extra["hidden_tests"] = hidden.summary(kept.count, env_path is not None)
                if part is not None:  # what the merge sums (a summary's shares cannot be)
                    run.extra["hidden_tests_totals"] = hidden.totals()
                say("extract", hidden.said(len(hidden.files)))
            if not built.tasks and part is None:  # a part may own none: the merge checks
                raise InputError(f"no tasks could be built from corpus "
                                 f"{spec_uri(config.corpus)} (skipped: {built.skipped})")

            run.put_file("tasks.jsonl", spool / "tasks.jsonl")
            if part is None or part == 0:
                run.put_file("functions.jsonl", spool / "functions.jsonl")
                # Later stages run unit tests against these exact files, maybe with no
                # network.
                write_snapshot(corpora, spool / SNAPSHOT_FILE)
                run.put_file(SNAPSHOT_FILE, spool / SNAPSHOT_FILE)
            if progress is not None:
                progress.finish()

        run.counts.update({
            "files": walked.files,
            "files_skipped": walked.files_skipped,
            "functions_extracted": walked.extracted,
            "functions_skipped": walked.functions_skipped,
            "functions": kept.count,
            "functions_with_docstring": kept.with_docstring,
            "tasks": built.tasks,
            "tasks_per_category": built.per_category,
            "tasks_skipped": dict(sorted(built.skipped.items())),
            "mutation_kinds": built.mutation_kinds,
        })
        sources = corpus_sources(config.corpus)
        provenance = [corpus_provenance(c, s.source) for c, s in zip(corpora, sources,
                                                                     strict=True)]
        first = corpora[0]
        run.extra["corpus"] = {
            "uri": spec_uri(config.corpus),
            "name": first.metadata.get("name", Path(first.path).name) if not many else None,
            "version": first.metadata.get("version") if not many else None,
            # the same sha256 as the manifest's corpus input
            "sha256": first.sha256 if isinstance(config.corpus, str)
            else corpora_sha256(provenance),
            "corpora": [{**entry, **walked.per_corpus[entry["key"]],
                         "functions": kept.per_corpus.get(entry["key"], 0) if many
                         else kept.count} for entry in provenance],
        }
        say("extract", f"{built.tasks} tasks {built.per_category}; skipped {built.skipped}")
        bugs = sum(built.mutation_kinds.values())
        if bugs:
            kinds = built.mutation_kinds
            top = max(kinds, key=kinds.__getitem__)
            say("extract", f"bug kinds: {sum(n > 0 for n in kinds.values())} used, "
                           f"largest {top} {kinds[top] / bugs:.0%}")
    return run.manifest


def file_parts(chunk: list[dict[str, Any]], file_prefix: str, derive: bool,
               count: int) -> dict[str, int]:
    """The part (of ``count``) that builds the tasks of each file of ``chunk`` (rows of
    one chunk of :meth:`KeptFunctions.chunks`, files as written in functions.jsonl).

    Without hidden tests, a file's own :func:`~trackb_core.partition.member`. With them,
    the part of the first module of its derivation run
    (:func:`trackb_core.difftest.module_batches` over the chunk, as one whole run makes
    them): a module imports and is called in one process with the others of its run,
    so a part takes whole runs and derives exactly what one whole run derives. Files
    that are no module (no run) go by their own member. Raises nothing."""
    files = list(dict.fromkeys(str(row["file"]) for row in chunk))
    parts: dict[str, int] = {}
    if derive:
        for batch in difftest.module_batches(f.removeprefix(file_prefix) for f in files):
            owner = member(file_prefix + batch[0], count)
            parts.update({file_prefix + name: owner for name in batch})
    for file in files:
        parts.setdefault(file, member(file, count))
    return parts


def _part_files(kept: KeptFunctions, corpora: list[ResolvedCorpus], many: bool,
                derive: bool, count: int, part: int) -> dict[str, int]:
    """The files whose tasks part ``part`` of ``count`` builds (:func:`file_parts`),
    each with its number of kept functions."""
    mine: dict[str, int] = {}
    for corpus, chunk in kept.chunks(corpora, key_files=many):
        owners = file_parts(chunk, f"{corpus.key}/" if many else "", derive, count)
        for row in chunk:
            if owners[row["file"]] == part:
                mine[row["file"]] = mine.get(row["file"], 0) + 1
    return mine


# Counts every part of a partitioned extract holds whole (the walk and the sample run
# in every part); the merge takes them from part 0 and sums the rest.
WHOLE_RUN_COUNTS = ("files", "files_skipped", "functions_extracted", "functions_skipped",
                    "functions", "functions_with_docstring")


def merge(config: ExtractConfig, out: Store) -> dict[str, Any]:
    """Write the step's functions.jsonl, tasks.jsonl, corpus.tar.gz and manifest into
    ``out`` from its finished parts; returns the manifest. The files are byte-identical
    to an unpartitioned run's: functions.jsonl and the snapshot are part 0's, tasks.jsonl
    the parts' rows in functions.jsonl order (each function's rows are in one part, in
    order), streamed through temp files. Counts and ``hidden_tests`` are the whole
    run's; timings are the longest part's (the parts ran side by side) and the sum of
    their ``hidden_tests``; ``partitions`` lists each part's counts.

    Raises MissingInputError naming the parts that are not finished, InputError if the
    parts disagree on the corpus or their rows do not merge (or no task was built at
    all), StoreError if a part cannot be read or ``out`` written.
    """
    with stage_run("extract", config, out) as run, \
            tempfile.TemporaryDirectory(prefix="trackb-extract-merge-") as tmp:
        parts = finished_parts(config, out, run.inputs)
        first = parts[0][1]
        for _, manifest in parts[1:]:
            differ = [key for key in WHOLE_RUN_COUNTS if manifest["counts"].get(key)
                      != first["counts"].get(key)]
            differ += [key for key in ("corpus", "execution_env")
                       if manifest.get(key) != first.get(key)]
            if differ:
                raise InputError(f"the partitions of {out.uri} walked different corpora "
                                 f"or environments ({', '.join(differ)} differ); rerun them")
        local = Path(tmp)
        for key in ("functions.jsonl", SNAPSHOT_FILE):
            parts[0][0].get_file(key, local / key)
            run.put_file(key, local / key)
        for index, (store, _) in enumerate(parts):
            store.get_file("tasks.jsonl", local / f"tasks-{index}.jsonl")
        merge_tasks(local / "functions.jsonl",
                    [local / f"tasks-{index}.jsonl" for index in range(len(parts))],
                    local / "tasks.jsonl", where=out.uri)
        run.put_file("tasks.jsonl", local / "tasks.jsonl")

        counts = [manifest.get("counts", {}) for _, manifest in parts]
        run.counts.update({key: first["counts"][key] for key in WHOLE_RUN_COUNTS})
        run.counts.update(sum_counts({k: v for k, v in c.items() if k not in WHOLE_RUN_COUNTS}
                                     for c in counts))
        if not run.counts.get("tasks"):
            raise InputError(f"no tasks could be built from corpus {spec_uri(config.corpus)} "
                             f"(skipped: {run.counts.get('tasks_skipped')})")
        for key in ("corpus", "execution_env"):
            if key in first:
                run.extra[key] = first[key]
        if "hidden_tests" in first:
            totals = sum_counts(m["hidden_tests_totals"] for _, m in parts)
            run.extra["hidden_tests"] = hidden_tests_summary(
                totals, first["hidden_tests"]["environment"] == "declared")
        timings = [manifest.get("timings", {}) for _, manifest in parts]
        for key in sorted({k for t in timings for k in t} - {"total_seconds"}):
            run.timings[key] = max(float(t.get(key, 0.0)) for t in timings)
        if "hidden_tests" in run.timings:
            run.timings["hidden_tests_sum"] = round(
                sum(float(t.get("hidden_tests", 0.0)) for t in timings), 3)
        run.extra["partitions"] = part_summary(parts)
        say("extract", f"merged {len(parts)} partitions: {run.counts['tasks']} tasks of "
                       f"{run.counts['functions']} functions")
    return run.manifest


def merge_tasks(functions: Path, parts: list[Path], target: Path, *, where: str) -> None:
    """Write to ``target`` the task rows of the files ``parts`` in the order of the
    functions in ``functions`` (the order one whole run writes them): a k-way merge
    keyed by each row's ``function_id``, one line of each part in memory. Raises
    InputError if a part holds a row out of that order or of no function."""
    handles = [open(path, "rb") for path in parts]
    try:
        heads = [handle.readline() for handle in handles]
        ids = [_function_id(line) for line in heads]
        with open(functions, "rb") as rows, open(target, "wb") as sink:
            for line in rows:
                function_id = json.loads(line)["id"]
                for index, handle in enumerate(handles):
                    while heads[index] and ids[index] == function_id:
                        sink.write(heads[index])
                        heads[index] = handle.readline()
                        ids[index] = _function_id(heads[index])
        left = [i for i, head in enumerate(heads) if head]
        if left:
            raise InputError(f"the partitions of {where} do not merge: tasks of function "
                             f"{ids[left[0]]} out of functions.jsonl order (in "
                             f"{', '.join(parts[i].name for i in left)})")
    finally:
        for handle in handles:
            handle.close()


def _function_id(line: bytes) -> str | None:
    return json.loads(line)["function_id"] if line.strip() else None


@dataclass
class Walked:
    """What :func:`spool_functions` found: files walked and skipped by reason, functions
    extracted (rows in the spool) and skipped, per corpus its files and functions, and
    per function the number of mutation kinds it offers."""

    files: int = 0
    extracted: int = 0
    files_skipped: dict[str, int] = dataclass_field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    functions_skipped: dict[str, int] = dataclass_field(default_factory=dict)
    per_corpus: dict[str, dict[str, int]] = dataclass_field(default_factory=dict)
    # function id -> how many mutation kinds have a site in it (counted on the file's
    # AST while it is parsed anyway; fenced sources left out)
    mutation_kinds: dict[str, int] = dataclass_field(default_factory=dict)


def spool_functions(corpora: list[ResolvedCorpus], spool: Path, min_lines: int,
                    max_lines: int, max_file_bytes: int, *, key_files: bool) -> Walked:
    """Write every function row of ``corpora`` (files their globs take, in corpus then
    sorted path order) to ``spool``, one JSON line each, parsing one file at a time
    and keeping none of its AST. With ``key_files`` each row's ``file`` is
    ``<corpus key>/<path>`` (and its ``corpus`` the key), so paths and ids are unique
    across corpora. Never raises for a bad file (skipped and counted); OSError if the
    spool cannot be written."""
    from tqdm import tqdm

    walked = Walked()
    with open(spool, "w", encoding="utf-8") as handle, paused_gc():
        for corpus in corpora:
            files = corpus_files(corpus.path, corpus.include, corpus.exclude)
            before = walked.extracted
            prefix = f"{corpus.key}/" if key_files else ""
            for path in tqdm(files, desc=f"extract {corpus.key}", unit="file", disable=None):
                found, reason, skipped = file_functions(corpus.path, path, min_lines,
                                                        max_lines, max_file_bytes)
                if reason is not None:
                    walked.files_skipped[reason] += 1
                for why, n in skipped.items():
                    walked.functions_skipped[why] = walked.functions_skipped.get(why, 0) + n
                for row, view in found:
                    if key_files:
                        row = keyed_row(row, corpus.key, prefix)
                    if "```" not in row["source"]:  # a fenced source gets no task, no mutant
                        walked.mutation_kinds[row["id"]] = kinds_with_sites(view)
                    handle.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
                walked.extracted += len(found)
                del found  # the file's ASTs go before the next file is parsed
            walked.files += len(files)
            walked.per_corpus[corpus.key] = {"files": len(files),
                                             "functions_extracted": walked.extracted - before}
    return walked


def keyed_row(row: dict[str, Any], key: str, prefix: str) -> dict[str, Any]:
    """A function row of corpus ``key`` as a run of several corpora writes it: ``file``
    under the key, ``corpus`` the key, and the id of that path (unique across corpora)."""
    file = prefix + row["file"]
    function_id = hashlib.sha256(f"{file}::{row['qualname']}::{row['line']}".encode()
                                 ).hexdigest()[:12]
    return {**row, "id": function_id, "file": file, "corpus": key}


class KeptFunctions:
    """The kept function rows in a JSONL file (functions.jsonl), read back a few at a
    time: where each row starts, how many there are per corpus, and a view of their
    parsed sources that parses on access (:meth:`assign_mutations`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offsets: dict[str, int] = {}  # function id -> its line's byte offset
        self.count = 0
        self.with_docstring = 0
        self.per_corpus: dict[str, int] = {}

    @classmethod
    def write(cls, spool: Path, keep: set[int] | None, target: Path) -> KeptFunctions:
        """The rows of ``spool`` whose index is in ``keep`` (all: None), copied to
        ``target``. Raises OSError if either file fails."""
        kept = cls(target)
        with open(spool, encoding="utf-8") as rows, open(target, "wb") as out:
            for index, line in enumerate(rows):
                if keep is not None and index not in keep:
                    continue
                row = json.loads(line)
                if "```" not in row["source"]:  # a fenced source gets no task, no mutant
                    kept.offsets[row["id"]] = out.tell()
                kept.count += 1
                kept.with_docstring += row["docstring"] is not None
                corpus = str(row.get("corpus", ""))
                kept.per_corpus[corpus] = kept.per_corpus.get(corpus, 0) + 1
                out.write(line.encode("utf-8"))
        if "" in kept.per_corpus and len(kept.per_corpus) == 1:
            kept.per_corpus = {}
        return kept

    def chunks(self, corpora: list[ResolvedCorpus], *, key_files: bool
               ) -> Iterator[tuple[ResolvedCorpus, list[dict[str, Any]]]]:
        """``(corpus, rows)``: the kept rows in file order, cut at module boundaries into
        chunks of at most :data:`CHUNK_MODULES` modules of one corpus."""
        by_key = {c.key: c for c in corpora}
        chunk: list[dict[str, Any]] = []
        files: set[str] = set()
        corpus = corpora[0]
        with open(self.path, encoding="utf-8") as rows:
            for line in rows:
                row = json.loads(line)
                row_corpus = by_key[row["corpus"]] if key_files else corpora[0]
                if chunk and (row_corpus is not corpus or (
                        row["file"] not in files and len(files) >= CHUNK_MODULES)):
                    yield corpus, chunk
                    chunk, files = [], set()
                corpus = row_corpus
                chunk.append(row)
                files.add(row["file"])
        if chunk:
            yield corpus, chunk

    def assign_mutations(self, seed: int, kinds: dict[str, int]) -> Assignment:
        """:func:`trackb_core.mutations.assign_mutations` over every kept function with
        no code fence, given ``kinds`` (function id -> its number of mutation kinds, of
        every function extracted); each is parsed when it is looked at and dropped
        after."""
        return assign_mutations(_ParsedOnDemand(self), seed, kinds={
            function_id: kinds.get(function_id, 0) for function_id in self.offsets})

    def source(self, function_id: str) -> str:
        with open(self.path, "rb") as rows:
            rows.seek(self.offsets[function_id])
            return json.loads(rows.readline())["source"]


class _ParsedOnDemand(Mapping[str, ParsedFunction]):
    """Kept functions by id, parsed from their source on each access."""

    def __init__(self, kept: KeptFunctions) -> None:
        self.kept = kept

    def __getitem__(self, function_id: str) -> ParsedFunction:
        return ParsedFunction.parse(self.kept.source(function_id))

    def __iter__(self) -> Iterator[str]:
        return iter(self.kept.offsets)

    def __len__(self) -> int:
        return len(self.kept.offsets)


class _TaskCounts:
    """Tasks built so far: how many, per category, skipped by reason, bug kinds shown."""

    def __init__(self, wanted: list[families.Family]) -> None:
        self.tasks = 0
        self.per_category = {family.name: 0 for family in wanted}
        self.shown = {family.name for family in wanted if family.shows_mutant}
        self.mutation_kinds = dict.fromkeys(KINDS, 0)
        self.skipped: dict[str, int] = {}

    def add(self, tasks: list[dict[str, Any]], skipped: dict[str, int]) -> None:
        self.tasks += len(tasks)
        for task in tasks:
            self.per_category[task["category"]] += 1
            if task["category"] in self.shown:
                self.mutation_kinds[task["mutation"]["kind"]] += 1
        for reason, n in skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n


def execution_env(mode: str, corpora: Path | list[Path]) -> dict[str, Any]:
    """The manifest's ``execution_env`` for ``mode``: for ``declared``, the requirements
    every corpus declares and the lock pip resolved for them
    (:mod:`trackb_core.corpus_env`). Raises UnavailableError (no package index),
    InputError (not installable as wheels)."""
    if mode != "declared":
        return corpus_env.describe(mode, [], [])
    folders = [corpora] if isinstance(corpora, Path) else corpora
    requirements = sorted({r for folder in folders
                           for r in corpus_env.declared_requirements(folder)})
    say("extract", f"execution environment: {len(requirements)} declared requirements")
    lock = corpus_env.resolve_lock(requirements)
    say("extract", f"execution environment: {len(lock)} wheels to add "
                   f"({', '.join(e['name'] for e in lock[:8])}{', ...' if len(lock) > 8 else ''})")
    return corpus_env.describe(mode, requirements, lock)


def attach_hidden_tests(tasks: list[dict[str, Any]], functions: list[dict[str, Any]],
                        corpus: Path, seed: int, wanted: list[families.Family],
                        env: Path | None = None, *, counts: HiddenTestCounts | None = None,
                        file_prefix: str = "") -> dict[str, Any]:
    """Derive each function's hidden tests (:func:`trackb_core.difftest.derive_tests`, in
    the sandbox, with the corpus's execution environment ``env`` when there is one) and
    put them on its tasks of the families that use them (field ``hidden_tests``);
    returns the counts for the manifest. With ``env``, the share of functions whose
    module imports without it is measured too (``importable_share_base``).

    ``functions`` may be one chunk of a corpus: ``counts`` then gathers the chunks'
    results (:meth:`HiddenTestCounts.summary` sums them up). ``file_prefix`` is the
    corpus key folder that the rows' ``file`` starts with in a run of several corpora;
    the modules import from ``corpus`` with it removed. Raises nothing for what the
    corpus code does."""
    if file_prefix:
        functions = [{**f, "file": f["file"].removeprefix(file_prefix)} for f in functions]
    mutants = {t["function_id"]: t["buggy_source"] for t in tasks
               if isinstance(t.get("buggy_source"), str)}
    step = max(1, len({f["file"] for f in functions}) // 10)

    def progress(done: int, total: int) -> None:
        if done == total or done % step == 0:
            say("extract", f"hidden tests: {done}/{total} module runs in the sandbox")

    workers = os.cpu_count() or 1
    base = None
    if env is not None:
        # the same import runs without the environment: the share it adds is measured
        base = difftest.derive_tests(functions, {}, corpus, seed=seed, workers=workers)
    derived = difftest.derive_tests(functions, mutants, corpus, seed=seed, workers=workers,
                                    python_path=[env] if env is not None else None,
                                    progress=progress)
    users = {f.name for f in wanted if f.uses_hidden_tests}
    for task in tasks:
        tests = derived.tests.get(task["function_id"])
        if tests is not None and task["category"] in users:
            task["hidden_tests"] = tests
    counts = counts if counts is not None else HiddenTestCounts()
    counts.add(derived, base, functions, file_prefix)
    return counts.summary(len(functions), env is not None)


class HiddenTestCounts:
    """Hidden-test results gathered over chunks of a corpus (or of several): per
    function only whether it has tests and how many cases; per module its status."""

    def __init__(self) -> None:
        self.derived = difftest.Derived()
        self.base_modules: dict[str, str] = {}
        self.files: list[str] = []

    def add(self, derived: difftest.Derived, base: difftest.Derived | None,
            functions: list[dict[str, Any]], file_prefix: str = "") -> None:
        self.derived.tests.update({k: {"cases": v["cases"]} for k, v in derived.tests.items()})
        self.derived.reasons.update(derived.reasons)
        self.derived.modules.update({file_prefix + k: v for k, v in derived.modules.items()})
        if base is not None:
            self.base_modules.update({file_prefix + k: v for k, v in base.modules.items()})
        self.files.extend(file_prefix + f["file"] for f in functions)

    def summary(self, n_functions: int, declared: bool) -> dict[str, Any]:
        """The manifest's ``hidden_tests``: :meth:`trackb_core.difftest.Derived.counts`
        over every function added, the environment, and ``importable_share_base``."""
        return hidden_tests_summary(self.totals(), declared)

    def totals(self) -> dict[str, Any]:
        """What :meth:`summary` is made of, as numbers and dicts of numbers that add up
        over disjoint sets of functions (:func:`trackb_core.partition.sum_counts`): the
        parts of a partitioned extract record them, their merge sums them."""
        imported = imported_base = 0
        missing: dict[str, int] = {}
        for file in self.files:
            status = self.derived.modules.get(file, "")
            imported += status == "imported"
            imported_base += self.base_modules.get(file, "") == "imported"
            if status.startswith("missing "):
                name = status.removeprefix("missing ")
                missing[name] = missing.get(name, 0) + 1
        reasons: dict[str, int] = {}
        for why in self.derived.reasons.values():
            reasons[why] = reasons.get(why, 0) + 1
        return {
            "functions": len(self.files),
            "functions_with_tests": len(self.derived.tests),
            "cases": sum(t["cases"] for t in self.derived.tests.values()),
            "without_tests": dict(sorted(reasons.items())),
            "modules_tried": len(self.derived.modules),
            "modules_imported": sum(s == "imported" for s in self.derived.modules.values()),
            "functions_importable": imported,
            "functions_importable_base": imported_base,
            "missing_modules": dict(sorted(missing.items())),
        }

    def said(self, n_functions: int) -> str:
        counts = self.derived.counts([{"file": f} for f in self.files])
        return (f"hidden tests for {counts['functions_with_tests']} of {n_functions} "
                f"functions; the modules of {counts['functions_importable']} import in the "
                "sandbox")


def hidden_tests_summary(totals: dict[str, Any], declared: bool) -> dict[str, Any]:
    """The manifest's ``hidden_tests`` from :meth:`HiddenTestCounts.totals` (of one run,
    or summed over the parts of one): the fields of
    :meth:`trackb_core.difftest.Derived.counts`, ``environment`` and
    ``importable_share_base``. Raises KeyError for totals missing a field."""
    n = totals["functions"]

    def share(imported: int) -> float | None:
        return round(imported / n, 4) if n else None

    missing = sorted(totals["missing_modules"].items(), key=lambda kv: (-kv[1], kv[0]))
    return {
        "functions_with_tests": totals["functions_with_tests"],
        "cases": totals["cases"],
        "without_tests": dict(sorted(totals["without_tests"].items())),
        "modules_tried": totals["modules_tried"],
        "modules_imported": totals["modules_imported"],
        "functions_importable": totals["functions_importable"],
        "importable_share": share(totals["functions_importable"]),
        "missing_modules": dict(missing[:10]),
        "environment": "declared" if declared else "base",
        "importable_share_base": share(totals["functions_importable_base" if declared
                                              else "functions_importable"]),
    }


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
            found, reason, skipped = file_functions(root, path, min_lines, max_lines,
                                                    max_file_bytes)
            if reason is not None:
                files_skipped[reason] += 1
                continue
            for row, view in found:
                functions.append(row)
                if parsed is not None:
                    parsed[row["id"]] = view
            for why, n in skipped.items():
                functions_skipped[why] = functions_skipped.get(why, 0) + n
    return functions, files_skipped, functions_skipped


def file_functions(root: Path, path: Path, min_lines: int, max_lines: int,
                   max_file_bytes: int
                   ) -> tuple[list[tuple[dict[str, Any], ParsedFunction]], str | None,
                              dict[str, int]]:
    """``(rows with their parsed functions, why the file was skipped or None, functions
    skipped by reason)`` for one file ``path`` under ``root``. Never raises for a bad
    file: the reason is one of :data:`SKIP_REASONS`."""
    text, reason = _read_text(path, max_file_bytes)
    if reason is not None:
        return [], reason, {}
    try:
        found, skipped = _functions_with_nodes(text, path.relative_to(root).as_posix(),
                                               min_lines, max_lines)
    except (SyntaxError, ValueError):
        return [], "syntax_error", {}
    except (RecursionError, MemoryError):
        return [], "too_deep", {}  # nested deeper than the parser can build
    return found, None, skipped


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
