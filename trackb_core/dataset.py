"""The build-dataset stage: filter, deduplicate and split the teacher's responses.

Reads ``responses.jsonl`` (from generate) and writes ``train.jsonl``, ``test.jsonl`` and
a dataset card ``README.md``. The split is grouped by source function: every row made
from one function (or from an exact copy of it in another file) lands on the same side,
because the seed's plain shuffle let the same function sit in train and test. It is
stratified by category and independent of the input's row order.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from typing import Any

from pydantic import Field

from trackb_core import codeblocks, prompts
from trackb_core.config import StageConfig, declared_inputs, input_field
from trackb_core.errors import InputError
from trackb_core.stage import say, stage_run, upstream_corpus
from trackb_core.store import Store

STAGE = "build-dataset"
CATEGORIES = ("docstring", "explain", "bugfix", "complete", "unit_test")
CODE_CATEGORIES = ("complete", "bugfix", "unit_test")
REQUIRED_FIELDS = ("id", "category", "instruction", "response", "source_function")
ROW_FIELDS = ("id", "category", "instruction", "response", "source_function", "source_file",
              "function_id", "function_name")

# The seed's placeholder patterns (its hallucination regexes): a gold answer that
# matches one would teach the model the very thing the metric penalises.
PLACEHOLDERS = [re.compile(p, re.IGNORECASE) for p in (
    r"<\s*insert.*?>", r"\bTODO\b", r"\bTBD\b", r"\byour_[a-zA-Z_]+\b", r"\bsome_module\b",
    r"\bfoo\b.*\b(bar|baz)\b",
)]


class DatasetConfig(StageConfig):
    """Filter, deduplicate and split teacher responses into a train/test dataset.

    Reads responses.jsonl (the generate stage's output folder or the file itself).
    Writes train.jsonl and test.jsonl (rows with id, category, instruction, response,
    source fields and the chat messages trl trains on, sorted by id) and README.md, a
    dataset card. The split is grouped by source function and stratified by category.
    """

    responses: str = input_field("", kind="file", filename="responses.jsonl",
                                 description="Teacher responses: responses.jsonl or the "
                                 "folder holding it")
    test_ratio: float = Field(0.15, gt=0.0, lt=1.0,
                              description="Share of each category's rows to hold out for test")
    seed: int = Field(42, description="Seed that orders source-function groups for the split")
    min_response_chars: int = Field(20, ge=0, description="Shorter responses are rejected")
    max_response_chars: int = Field(8000, ge=1, description="Longer responses are rejected")


# -- filters -------------------------------------------------------------------------


def rejection_reason(row: dict[str, Any], config: DatasetConfig) -> str | None:
    """Why ``row`` is unfit for training (the seed's basic filters), or None if it is fit."""
    response = str(row["response"]).strip()
    category = row["category"]
    if category not in CATEGORIES:
        return "unknown_category"
    if len(response) < config.min_response_chars:
        return "too_short"
    if len(response) > config.max_response_chars:
        return "too_long"
    if any(p.search(response) for p in PLACEHOLDERS):
        return "placeholder"
    if category in CODE_CATEGORIES:
        blocks = codeblocks.seed_code_blocks(response)
        if not blocks:
            return "no_code_block"
        if not codeblocks.compiles(blocks[0]):
            return "code_does_not_compile"
    if category == "unit_test":
        if "def test_" not in response:
            return "no_test_function"
        if "assert" not in response:
            return "no_assert"
    if category == "docstring" and '"""' not in response and "'''" not in response:
        return "no_triple_quote"
    return None


def _normalise(text: str) -> str:
    return " ".join(str(text).split())


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def dedup_key(row: dict[str, Any]) -> str:
    """Exact-duplicate key: whitespace-collapsed instruction + response."""
    return _sha256(_normalise(row["instruction"]) + "\0" + _normalise(row["response"]))


def group_key(row: dict[str, Any]) -> str:
    """Split group: the whitespace-normalised source function, so copies group together."""
    return _sha256(_normalise(row["source_function"]))


# -- split ---------------------------------------------------------------------------


def grouped_split(rows: list[dict[str, Any]], test_ratio: float,
                  seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, test)``: no group on both sides, each category near ``test_ratio`` in test.

    Groups are visited in the order of ``sha256(f"{seed}:{group}")``; a group goes to
    test when that brings the per-category test counts closer to their targets. Test is
    non-empty (and train too) whenever there are at least two groups. The result does
    not depend on the order of ``rows``.
    """
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: str(r["id"])):
        groups[group_key(row)].append(row)
    order = sorted(groups, key=lambda g: (_sha256(f"{seed}:{g}"), g))
    target = {c: n * test_ratio for c, n in Counter(r["category"] for r in rows).items()}

    in_test: Counter[str] = Counter()
    test_groups: list[str] = []
    for key in order:
        adds = Counter(r["category"] for r in groups[key])
        before = sum(abs(in_test[c] - target[c]) for c in adds)
        after = sum(abs(in_test[c] + adds[c] - target[c]) for c in adds)
        if after < before:
            test_groups.append(key)
            in_test.update(adds)
    if len(order) >= 2 and not test_groups:
        # a tiny dataset where every group overshoots: hold out the smallest, first in order
        test_groups.append(min(order, key=lambda g: len(groups[g])))
    if len(order) >= 2 and len(test_groups) == len(order):
        test_groups.pop()
    chosen = set(test_groups)
    train = [r for key in order if key not in chosen for r in groups[key]]
    test = [r for key in order if key in chosen for r in groups[key]]
    return sorted(train, key=lambda r: str(r["id"])), sorted(test, key=lambda r: str(r["id"]))


def dataset_row(row: dict[str, Any]) -> dict[str, Any]:
    """The published row: task fields, response and the chat messages trl trains on."""
    out = {k: row.get(k, "") for k in ROW_FIELDS}
    out["messages"] = (prompts.prompt_messages(str(row["instruction"]))
                       + prompts.completion_messages(str(row["response"])))
    if row["category"] == "bugfix" and "mutation" in row:
        out["mutation"] = row["mutation"]
    return out


# -- the stage -----------------------------------------------------------------------


def run(config: DatasetConfig, out: Store) -> dict:
    """Run the build-dataset stage into ``out``; returns the manifest.

    Raises MissingInputError (no responses file), InputError (a malformed row, or no
    row left after filtering).
    """
    with stage_run(STAGE, config, out) as run:
        where = run.input_uri("responses")
        rows = run.read_jsonl("responses")
        _check_rows(rows, where)
        rows.sort(key=lambda r: str(r["id"]))

        with run.timed("filter"):
            rejected: Counter[str] = Counter()
            kept, seen = [], set()
            duplicates = 0
            for row in rows:
                reason = rejection_reason(row, config)
                if reason:
                    rejected[reason] += 1
                    continue
                key = dedup_key(row)
                if key in seen:
                    duplicates += 1
                    continue
                seen.add(key)
                kept.append(row)
        if not kept:
            raise InputError(f"{where}: no row survives the filters "
                             f"(rejected: {dict(sorted(rejected.items()))})")

        with run.timed("split"):
            train, test = grouped_split(kept, config.test_ratio, config.seed)
        run.write_jsonl("train.jsonl", [dataset_row(r) for r in train])
        run.write_jsonl("test.jsonl", [dataset_row(r) for r in test])

        counts = {
            "rows_in": len(rows),
            "rejected": dict(sorted(rejected.items())),
            "duplicates_removed": duplicates,
            "train": _per_category(train),
            "test": _per_category(test),
            "train_rows": len(train),
            "test_rows": len(test),
            "train_groups": len({group_key(r) for r in train}),
            "test_groups": len({group_key(r) for r in test}),
        }
        run.counts.update(counts)
        teachers = sorted({f"{r.get('teacher', '?')} ({r.get('teacher_model', '?')})"
                           for r in kept})
        card = dataset_card(config, counts, upstream_corpus(config.responses, "responses.jsonl"), teachers)
        run.write_text("README.md", card)
        say(STAGE, f"train {len(train)} rows, test {len(test)} rows; rejected "
                   f"{sum(rejected.values())}, duplicates {duplicates}")
    return run.manifest


def _check_rows(rows: list[dict[str, Any]], where: str) -> None:
    if not rows:
        raise InputError(f"{where} holds no responses")
    for number, row in enumerate(rows, 1):
        missing = [k for k in REQUIRED_FIELDS if not isinstance(row.get(k), str) or not row[k]]
        if missing:
            raise InputError(f"{where}: row {number} lacks {', '.join(missing)}")


def _per_category(rows: list[dict[str, Any]]) -> dict[str, int]:
    return dict(sorted(Counter(r["category"] for r in rows).items()))


def dataset_card(config: DatasetConfig, counts: dict[str, Any], corpus: dict[str, Any] | None,
                 teachers: list[str]) -> str:
    """The dataset's README.md. Deterministic: no timestamps, stable ordering.

    It leaves out the input's hash (in the manifest): the same rows in another order
    make the same dataset and so the same card.
    """
    import yaml

    categories = sorted(set(counts["train"]) | set(counts["test"]))
    lines = [
        "---",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        "    path: train.jsonl",
        "  - split: test",
        "    path: test.jsonl",
        "task_categories:",
        "- text-generation",
        "tags:",
        "- code",
        "- python",
        "- trackb",
        "---",
        "",
        "# trackb code instruction dataset",
        "",
        "Python code tasks (docstring, explain, bugfix, complete, unit_test) built from a "
        "source corpus by trackb, with gold responses from a teacher, for supervised "
        "fine-tuning of a code model.",
        "",
        "## Source",
        "",
    ]
    if corpus:
        # "path" is where this machine unpacked it: not a property of the dataset
        described = ", ".join(f"{k}: {corpus[k]}" for k in sorted(corpus)
                              if k not in ("sha256", "path"))
        lines.append(f"- Corpus: {described} (sha256 `{corpus.get('sha256', '?')}`)")
    else:
        lines.append("- Corpus: unknown (no upstream manifest found)")
    lines += [f"- Teacher: {', '.join(teachers) or 'unknown'}",
              "", "## Splits", "",
              "| category | train | test | total |", "|---|---:|---:|---:|"]
    for category in categories:
        tr, te = counts["train"].get(category, 0), counts["test"].get(category, 0)
        lines.append(f"| {category} | {tr} | {te} | {tr + te} |")
    lines.append(f"| **all** | {counts['train_rows']} | {counts['test_rows']} | "
                 f"{counts['train_rows'] + counts['test_rows']} |")
    lines += ["", f"Source-function groups: {counts['train_groups']} in train, "
                  f"{counts['test_groups']} in test.", "", "## Filtering", "",
              f"{counts['rows_in']} responses in. Rejected by reason:", ""]
    lines += [f"- {reason}: {n}" for reason, n in counts["rejected"].items()] or ["- none"]
    lines += [
        "",
        "Exact duplicates removed (whitespace-normalised instruction + response): "
        f"{counts['duplicates_removed']}.",
        "",
        "Filters: response length bounds; placeholder text (TODO, TBD, `<insert ...>`, "
        "`your_...`, ...); for complete, bugfix and unit_test the first code block exists "
        "and compiles; unit_test needs `def test_` and `assert`; docstring needs a triple "
        "quote.",
        "",
        "## Split method",
        "",
        "Grouped by source function: the group key is the sha256 of the whitespace-"
        "normalised function source, so every task made from one function, and from exact "
        "copies of it in other files, is on one side only. Groups are visited in the order "
        f"of sha256(\"{config.seed}:<group>\") and a group goes to test when that brings each "
        f"category's test count closer to {config.test_ratio:g} of its rows (stratified by "
        "category). Rows are sorted by id; the split does not depend on input order.",
        "",
        "## Fields",
        "",
        "`id`, `category`, `instruction`, `response`, `source_function`, `source_file`, "
        "`function_id`, `function_name`, `messages` (system + user + assistant chat turns, "
        "built by `trackb_core.prompts`, the same function training and evaluation use), "
        "and `mutation` on bugfix rows.",
        "",
        "## Config",
        "",
        "```yaml",
        yaml.safe_dump(_config_without_inputs(config), sort_keys=True).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _config_without_inputs(config: DatasetConfig) -> dict[str, Any]:
    # input URIs are machine-specific paths; the card records their hashes instead
    data = config.model_dump(mode="json")
    for name, *_ in declared_inputs(config):
        data.pop(name, None)
    return data
