"""Stage extract: function rows, the stage run, and every bad input it must survive."""

from __future__ import annotations

import ast
import hashlib
import json
import textwrap
from pathlib import Path

import pytest

from trackb_core import extract
from trackb_core.config import build_config
from trackb_core.errors import ConfigError, InputError, MissingInputError
from trackb_core.extract import ExtractConfig, functions_in_source
from trackb_core.families import names
from trackb_core.stage import MANIFEST
from trackb_core.store import LocalStore

CATEGORIES = names()

GOOD = textwrap.dedent('''\
    import functools


    def plain(a, b=2):
        """Add two numbers."""
        total = a + b
        if total > 10:
            return 10
        return total


    class Thing:
        @functools.lru_cache(maxsize=None)
        @staticmethod
        def decorated(x: int, /, y: "str" = "s", *args: int, z: bool = False,
                      w, **kw) -> list[int]:
            out = []
            for i in range(x):
                out.append(i)
            return out

        async def fetch(self, url):
            async with self.session.get(url) as response:
                if response.status != 200:
                    raise RuntimeError(url)
                return await response.text()

        def outer(self):
            def inner(v):
                a = v
                b = a
                c = b
                return c == 1
            return inner


    def tiny():
        return 1
    ''')


def _rows(text: str = GOOD, rel: str = "pkg/mod.py"):
    rows, skipped = functions_in_source(text, rel, 5, 60)
    assert skipped == {}
    return {r["qualname"]: r for r in rows}


# -- function rows ------------------------------------------------------------------------


def test_functions_methods_and_nested_are_found_in_source_order():
    rows = _rows()
    assert list(rows) == ["plain", "Thing.decorated", "Thing.fetch", "Thing.outer",
                          "Thing.outer.<locals>.inner"]  # tiny() has 2 lines
    assert [r["is_method"] for r in rows.values()] == [False, True, True, True, False]
    assert rows["Thing.fetch"]["is_async"] and not rows["plain"]["is_async"]


def test_row_fields():
    row = _rows()["plain"]
    assert row["id"] == hashlib.sha256(b"pkg/mod.py::plain::4").hexdigest()[:12]
    assert (row["name"], row["file"], row["line"], row["end_line"], row["n_lines"]) == \
        ("plain", "pkg/mod.py", 4, 9, 6)
    assert row["source"].startswith("def plain(a, b=2):\n") and row["source"].endswith(
        "return total\n")
    assert row["signature"] == "def plain(a, b=2):"
    assert row["docstring"] == "Add two numbers."
    assert row["args"] == [
        {"name": "a", "kind": "arg", "annotation": None, "default": None},
        {"name": "b", "kind": "arg", "annotation": None, "default": "2"},
    ]
    assert row["returns"] is None and row["decorators"] == []
    assert json.dumps(row)  # JSON-able


def test_decorators_are_excluded_from_lines_and_source():
    row = _rows()["Thing.decorated"]
    assert row["decorators"] == ["functools.lru_cache(maxsize=None)", "staticmethod"]
    assert row["line"] == 15 and row["n_lines"] == 6  # counted from the def line
    assert row["source"].startswith("def decorated(")  # dedented, no decorator
    assert "@" not in row["source"]
    assert row["signature"] == ('def decorated(x: int, /, y: "str" = "s", *args: int, '
                                "z: bool = False,\n              w, **kw) -> list[int]:")
    assert row["args"] == [
        {"name": "x", "kind": "posonly", "annotation": "int", "default": None},
        {"name": "y", "kind": "arg", "annotation": "'str'", "default": "'s'"},
        {"name": "args", "kind": "vararg", "annotation": "int", "default": None},
        {"name": "z", "kind": "kwonly", "annotation": "bool", "default": "False"},
        {"name": "w", "kind": "kwonly", "annotation": None, "default": None},
        {"name": "kw", "kind": "kwarg", "annotation": None, "default": None},
    ]
    assert row["returns"] == "list[int]"


def test_nested_function_source_is_dedented_and_parses():
    row = _rows()["Thing.outer.<locals>.inner"]
    assert row["source"] == ("def inner(v):\n    a = v\n    b = a\n    c = b\n"
                             "    return c == 1\n")


def test_line_limits_are_inclusive():
    body = "def f():\n" + "    x = 1\n" * 3 + "    return x\n"  # 5 lines
    assert [r["name"] for r in functions_in_source(body, "m.py", 5, 5)[0]] == ["f"]
    assert functions_in_source(body, "m.py", 6, 60)[0] == []
    assert functions_in_source(body, "m.py", 1, 4)[0] == []


def test_crlf_and_continuation_lines_left_of_the_def():
    text = ("class A:\r\n    def f(self):\r\n        s = '''\r\nflush left\r\n'''\r\n"
            "        t = (1,\r\n2)\r\n        u = s\r\n        return t\r\n")
    (row,) = functions_in_source(text, "m.py", 5, 60)[0]
    assert row["source"] == ("def f(self):\n    s = '''\nflush left\n'''\n    t = (1,\n2)\n"
                             "    u = s\n    return t\n")


def test_syntax_error_propagates_from_one_file():
    with pytest.raises(SyntaxError):
        functions_in_source("def f(:\n    pass\n", "bad.py")


# -- config ---------------------------------------------------------------------------


def test_config_defaults_and_validation():
    config = ExtractConfig()
    assert config.corpus == "pypi:verl==0.9.1"
    assert (config.min_lines, config.max_lines, config.seed) == (5, 60, 42)
    assert config.categories == list(CATEGORIES)
    assert ExtractConfig.__doc__.splitlines()[0].endswith(".")
    for name, info in ExtractConfig.model_fields.items():
        assert info.description, name
    with pytest.raises(ConfigError, match="unknown categories"):
        build_config(ExtractConfig, {"categories": ["docstring", "poem"]})
    with pytest.raises(ConfigError, match="min_lines"):
        build_config(ExtractConfig, {"min_lines": 30, "max_lines": 10})
    with pytest.raises(ConfigError, match="Extra inputs"):
        build_config(ExtractConfig, {"corpuss": "x"})


# -- the stage on a real corpus -------------------------------------------------------------


def _run(tmp_path, name="out", **values):
    out = LocalStore(tmp_path / name)
    manifest = extract.run(ExtractConfig(**values), out)
    return out, manifest


def _jsonl(store, key):
    return [json.loads(line) for line in store.get_bytes(key).decode().splitlines()]


@pytest.fixture(scope="module")
def stdlib_run(stdlib_corpus, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("extract"), corpus=str(stdlib_corpus))


def test_stage_writes_functions_tasks_and_manifest(stdlib_run, stdlib_corpus):
    out, manifest = stdlib_run
    functions = _jsonl(out, "functions.jsonl")
    tasks = _jsonl(out, "tasks.jsonl")
    assert json.loads(out.get_bytes(MANIFEST)) == manifest
    assert set(manifest["outputs"]) == {"functions.jsonl", "tasks.jsonl", "corpus.tar.gz"}
    counts = manifest["counts"]
    assert counts["files"] == 10
    assert counts["files_skipped"] == dict.fromkeys(extract.SKIP_REASONS, 0)
    assert counts["functions"] == len(functions) == counts["functions_extracted"] > 50
    assert counts["functions_with_docstring"] == sum(f["docstring"] is not None
                                                     for f in functions)
    assert counts["tasks"] == len(tasks)
    assert counts["tasks_per_category"] == {
        c: sum(t["category"] == c for t in tasks) for c in CATEGORIES}
    assert all(counts["tasks_per_category"][c] > 0 for c in CATEGORIES)
    assert counts["tasks_skipped"].get("bugfix_no_site", 0) + \
        counts["tasks_skipped"].get("bugfix_kind_cap", 0) == \
        len(functions) - counts["tasks_per_category"]["bugfix"]
    bugfix = [t for t in tasks if t["category"] == "bugfix"]
    assert counts["mutation_kinds"] == {
        k: sum(t["mutation"]["kind"] == k for t in bugfix) for k in counts["mutation_kinds"]}
    assert sum(counts["mutation_kinds"].values()) == len(bugfix)
    assert max(counts["mutation_kinds"].values()) <= 0.25 * len(bugfix)
    assert manifest["corpus"]["sha256"] == manifest["inputs"]["corpus"]["sha256"]
    assert manifest["corpus"]["name"] == stdlib_corpus.name
    assert {f["file"] for f in functions} >= {"json/decoder.py", "textwrap.py"}
    assert [f["file"] for f in functions] == sorted(f["file"] for f in functions)
    for n in (f["n_lines"] for f in functions):
        assert 5 <= n <= 60


def test_same_corpus_twice_gives_byte_identical_files(stdlib_run, stdlib_corpus, tmp_path):
    out, _ = stdlib_run
    again, _ = _run(tmp_path, corpus=str(stdlib_corpus))
    for key in ("functions.jsonl", "tasks.jsonl"):
        assert again.get_bytes(key) == out.get_bytes(key)


def test_max_functions_is_a_seeded_sample(stdlib_corpus, stdlib_run, tmp_path):
    _, full = stdlib_run
    one, manifest = _run(tmp_path, "a", corpus=str(stdlib_corpus), max_functions=10, seed=1)
    two, _ = _run(tmp_path, "b", corpus=str(stdlib_corpus), max_functions=10, seed=1)
    other, _ = _run(tmp_path, "c", corpus=str(stdlib_corpus), max_functions=10, seed=2)
    assert manifest["counts"]["functions"] == 10
    assert manifest["counts"]["functions_extracted"] == full["counts"]["functions"]
    assert one.get_bytes("tasks.jsonl") == two.get_bytes("tasks.jsonl")
    assert one.get_bytes("functions.jsonl") != other.get_bytes("functions.jsonl")
    ids = [f["id"] for f in _jsonl(one, "functions.jsonl")]
    assert {t["function_id"] for t in _jsonl(one, "tasks.jsonl")} <= set(ids)


def test_categories_subset(stdlib_corpus, tmp_path):
    out, manifest = _run(tmp_path, corpus=str(stdlib_corpus), categories=["complete"])
    assert {t["category"] for t in _jsonl(out, "tasks.jsonl")} == {"complete"}
    assert set(manifest["counts"]["tasks_per_category"]) == {"complete"}


# -- bad input: one-line error naming the problem, no manifest ------------------------------

NOT_UTF8 = "x = 'caf\xe9'\n".encode("latin-1")


def _fails(tmp_path, corpus, error, message):
    out = LocalStore(tmp_path / "out")
    with pytest.raises(error) as info:
        extract.run(ExtractConfig(corpus=str(corpus)), out)
    text = str(info.value)
    assert "\n" not in text
    assert message in text, text
    assert not out.exists(MANIFEST)
    return text


def test_empty_corpus_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    _fails(tmp_path, tmp_path / "empty", InputError, "holds no .py files")


def test_missing_corpus_dir(tmp_path):
    text = _fails(tmp_path, tmp_path / "nowhere", MissingInputError, "corpus folder not found")
    assert "--corpus" in text


def test_only_a_syntax_error_file(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "bad.py").write_text("def f(:\n    pass\n")
    _fails(tmp_path, tmp_path / "c", InputError,
           f"no functions of 5-60 lines in corpus {tmp_path / 'c'} "
           "(files skipped: syntax_error=1)")


def test_only_a_non_utf8_file(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "latin.py").write_bytes(NOT_UTF8)
    _fails(tmp_path, tmp_path / "c", InputError, "(files skipped: not_utf8=1)")


def test_only_short_functions(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "short.py").write_text("def f():\n    return 1\n")
    _fails(tmp_path, tmp_path / "c", InputError, "(files skipped: none)")


def test_stale_manifest_is_removed_on_failure(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "bad.py").write_text("def f(:\n")
    LocalStore(tmp_path / "out").put_text(MANIFEST, "{}")
    _fails(tmp_path, tmp_path / "c", InputError, "syntax_error=1")


def test_bad_files_are_skipped_and_counted(tmp_path):
    corpus = tmp_path / "c"
    (corpus / "pkg").mkdir(parents=True)
    (corpus / "pkg" / "good.py").write_text(GOOD)
    (corpus / "pkg" / "bad.py").write_text("def f(:\n    pass\n")
    (corpus / "latin.py").write_bytes(NOT_UTF8)
    (corpus / "null.py").write_bytes(b"x = 1\x00\n")
    (corpus / "huge.py").write_text("x = 1\n" * 200_000)  # 1.2 MB
    out, manifest = _run(tmp_path, corpus=str(corpus))
    assert manifest["counts"]["files"] == 5
    assert manifest["counts"]["files_skipped"] == {
        "not_utf8": 1, "syntax_error": 2, "too_deep": 0, "too_large": 1, "unreadable": 0}
    assert manifest["counts"]["functions"] == 5
    assert {f["file"] for f in _jsonl(out, "functions.jsonl")} == {"pkg/good.py"}


# Code that the parser accepts but that nests deeper than recursive walkers (the
# old qualname walk, ast.unparse) survive, and code the parser itself refuses.
DEEP_BUT_PARSES = textwrap.dedent("""\
    def deep_body(a):
        b = a
        c = b
        if c:
            return a{subscripts} == 1
        return None


    def deep_default(a, b=x{subscripts}):
        c = a
        d = c
        e = d
        return e
    """).format(subscripts="[0]" * 2000)
ADVERSARIAL = {
    "empty.py": "",
    "only_comments.py": "# nothing here\n",
    "syntax.py": "def f(:\n    pass\n",
    "deep_recursion.py": "x = " + "+".join(["1"] * 100_000) + "\n",  # RecursionError
    "deep_memory.py": "x = " + "-" * 100_000 + "1\n",  # MemoryError: parser stack overflow
    "deep_parens.py": "x = " + "(" * 300 + "1" + ")" * 300 + "\n",  # SyntaxError
    "deep_indent.py": "".join("    " * i + f"if x{i}:\n" for i in range(120)) + "    pass\n",
    "deep_but_parses.py": DEEP_BUT_PARSES,
    "shapes.py": textwrap.dedent("""\
        import functools

        square = lambda x: x * x  # a lambda is not a def


        @functools.wraps(print)
        @staticmethod
        async def fetch(session, url, retries=3):
            async with session.get(url) as response:
                if response.status != 200 and retries > 0:
                    return await fetch(session, url, retries - 1)
                return await response.text()


        def outer(values):
            def inner(v):
                total = 0
                for item in v:
                    total += item
                return total is not None
            key = lambda v: not v
            return sorted(values, key=key)
        """),
}


def _adversarial_corpus(root):
    (root / "pkg").mkdir(parents=True)
    for name, text in ADVERSARIAL.items():
        (root / "pkg" / name).write_text(text)
    (root / "latin.py").write_bytes(NOT_UTF8)
    (root / "huge.py").write_text("x = 1\n" * 200_000)  # 1.2 MB, over the limit
    (root / "pkg" / "loop").symlink_to("..", target_is_directory=True)  # dir -> parent
    (root / "self.py").symlink_to("self.py")  # a link to itself
    (root / "dangling.py").symlink_to("missing.py")
    return root


def test_adversarial_corpus_never_crashes_and_counts_each_reason(tmp_path):
    corpus = _adversarial_corpus(tmp_path / "c")
    out, manifest = _run(tmp_path, corpus=str(corpus))
    counts = manifest["counts"]
    # The symlinks lead nowhere walkable: neither followed (no loop) nor counted.
    assert counts["files"] == len(ADVERSARIAL) + 2
    assert counts["files_skipped"] == {"not_utf8": 1, "syntax_error": 3, "too_deep": 2,
                                       "too_large": 1, "unreadable": 0}
    assert counts["functions_skipped"] == {"too_deep": 1}  # deep_default's default value
    functions = {f["qualname"]: f for f in _jsonl(out, "functions.jsonl")}
    assert set(functions) == {"deep_body", "fetch", "outer", "outer.<locals>.inner"}
    assert functions["fetch"]["is_async"]
    assert functions["fetch"]["decorators"] == ["functools.wraps(print)", "staticmethod"]
    assert functions["fetch"]["signature"] == "async def fetch(session, url, retries=3):"
    tasks = _jsonl(out, "tasks.jsonl")
    assert {t["function_id"] for t in tasks} == {f["id"] for f in functions.values()}
    for task in (t for t in tasks if t["category"] == "bugfix"):
        assert ast.parse(task["buggy_source"])


def test_a_file_that_cannot_be_read_is_counted(tmp_path, monkeypatch):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "good.py").write_text(GOOD)
    (corpus / "gone.py").write_text(GOOD)
    real_read = Path.read_bytes

    def read_bytes(path):
        if path.name == "gone.py":
            raise FileNotFoundError(path)  # deleted between listing and reading
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    _, manifest = _run(tmp_path, corpus=str(corpus))
    assert manifest["counts"]["files_skipped"]["unreadable"] == 1
    assert manifest["counts"]["functions"] == 5


@pytest.mark.integration
def test_pypi_name_that_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKB_CACHE", str(tmp_path / "cache"))
    text = _fails(tmp_path, "pypi:no-such-package-trackb-xyz==0.0.1", MissingInputError,
                  "pypi: no distribution no-such-package-trackb-xyz==0.0.1 (pip: ")
    assert text.startswith("--corpus: ")


@pytest.mark.integration
def test_real_verl_corpus(tmp_path):
    # extraction only: hidden tests of real verl code are tests/test_trivial_answers.py's
    out, manifest = _run(tmp_path, corpus="pypi:verl==0.9.1", derive_tests=False)
    counts = manifest["counts"]
    assert counts["files"] == 454
    assert sum(counts["files_skipped"].values()) == 0
    # The wheel's verl/ package alone holds ~2,700; its tests/ and scripts/ add ~600.
    assert 2_500 <= counts["functions"] <= 3_500
    functions = _jsonl(out, "functions.jsonl")
    in_package = sum(f["file"].startswith("verl/") for f in functions)
    assert 2_000 <= in_package <= 3_000
    assert manifest["corpus"]["name"] == "verl" and manifest["corpus"]["version"] == "0.9.1"
    assert manifest["corpus"]["sha256"] == manifest["inputs"]["corpus"]["sha256"]
    assert all(counts["tasks_per_category"][c] > 1_000 for c in CATEGORIES)
