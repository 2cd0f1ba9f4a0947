"""Compose two intervention scripts of one family into a new standalone script (docs/conventions.md, section 9).

    python -m benchmark.compose algos/dqn_redo.py algos/dqn_hlgauss.py -o algos/dqn_redo_hlgauss.py
    python -m benchmark.compose A.py B.py -o OUT.py --allow-markers   # write a conflicted merge anyway (exit 1)

Every intervention script is its base script plus the method (docs/conventions.md, section 1), and its module
docstring declares the base (`Base script: algos/<base>.py ...`). Composing A and B is a three-way merge of the two
diffs base -> A and base -> B onto the base:

- The module docstrings always differ (each replaced the base's), so they are not merged: the new script gets a new
  docstring naming both methods, then A's and B's docstring bodies (paper, method, "Differences from the base script"
  list) in their own sections, then the line `Base script: ...; composed from A and B by ...; docs: ...`.
- The code after the docstring is merged three-way. Each side's changes are the hunks of a line diff against the
  base: `git diff --no-index --histogram -U0` when `git` is on PATH, else Python's `difflib.SequenceMatcher` (no
  dependency beyond the standard library; the engine used is printed, `--engine` picks one). The merge of the hunks
  is done here rather than by `git merge-file`, which reports neither the base's line numbers of a conflict nor
  lets one resolve only the insertions. Hunks of the two sides that overlap or touch (as in diff3 and `git
  merge-file`) form one region; a region changed by one side only takes that side's text, a region both sides
  changed identically takes it once.
- The one automatic resolution: where both sides only *insert* lines at the same base position (the base region is
  empty: e.g. both append a flag block after the base's last `Args` field), the result is A's insertion, then B's.
  Where a diff places an insertion among equal lines (the blank lines around a block) is arbitrary, so two
  insertions that could sit at the same position are first moved to one (`align_insertions`).
- Every other region both sides changed is a conflict: the command prints each as `<base file>: base lines i-j (in
  <the enclosing def or class>)` with the base's and both sides' text, writes nothing and exits with status 1.
  `--allow-markers` writes the file with diff3-style markers (`<<<<<<<`, `|||||||`, `=======`, `>>>>>>>`) and still
  exits 1 with a warning.
- A clean merge is then checked: more definitions of one name in one scope than either parent has (two functions or
  classes of the same name, two `Args` fields of the same name; found with `ast`) are conflicts too; the result must
  `compile()`; and its `Args` fields must be exactly the union of A's and B's.

Bad input is one `error: ...` line and exit status 2: a script that declares no base (a base script, or one such as
bbf_atari.py that is not a minimal diff of another), two scripts of different bases, a script with itself, an output
that exists (without `--force`) or that is a parent or the base.

The composed script's `exp_name` default is its own file name (the scripts derive it from `__file__`). Each method
keeps its flags and defaults; switch one off with its own flags (docs/conventions.md, section 9).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field

BASE_RE = re.compile(r"^[ \t]*Base script:[ \t]*`?(?P<path>[\w./-]+\.py)`?", re.MULTILINE)
TITLE_RE = re.compile(r"^\s*(?P<algo>[^+]+?)\s*\+\s*(?P<method>.+?)\s+on\s+(?P<where>[\w-]+)\s*[.:]")  # "." or a composed ":"


class ComposeError(Exception):
    """Bad input: one `error: ...` line, exit status 2."""


# ---------------------------------------------------------------------------------------------------------------
# Reading a script: its docstring, its declared base


@dataclass
class Script:
    path: str  # as given on the command line (used in messages and in the composed docstring)
    text: str
    doc_source: list[str]  # the docstring's source lines, quotes included
    code: list[str]  # every line after the docstring, newline-terminated
    doc_end: int  # 1-based line number of the docstring's last line
    docstring: str  # the evaluated docstring

    @property
    def shown(self) -> str:
        return _display(self.path)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)[: -len(".py")] if self.path.endswith(".py") else os.path.basename(self.path)


def read_script(path: str) -> Script:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise ComposeError(f"cannot read {path}: {err.strerror}") from None
    if text and not text.endswith("\n"):
        text += "\n"
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as err:
        raise ComposeError(f"{path} is not valid Python (line {err.lineno}: {err.msg})") from None
    first = tree.body[0] if tree.body else None
    if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        raise ComposeError(f"{path} has no module docstring, so it declares no base script")
    lines = text.splitlines(keepends=True)
    return Script(path=path, text=text, doc_source=lines[: first.end_lineno], code=lines[first.end_lineno:],
                  doc_end=first.end_lineno, docstring=first.value.value)


def declared_base(script: Script) -> str | None:
    """The base script the docstring declares (`Base script: algos/dqn.py ...`), as a path in the script's own
    directory (the scripts name it relative to the repository root, and every script lives in algos/); None when
    the docstring declares none."""
    match = BASE_RE.search(script.docstring)
    if match is None:
        return None
    return os.path.join(os.path.dirname(script.path) or ".", os.path.basename(match["path"]))


def same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


# ---------------------------------------------------------------------------------------------------------------
# Diffs and the three-way merge


@dataclass(frozen=True)
class Hunk:
    """Base lines [b1, b2) (0-based, of the code after the docstring) become lines [o1, o2) of the other side."""

    b1: int
    b2: int
    o1: int
    o2: int


def git_available() -> bool:
    return shutil.which("git") is not None


def hunks_git(base: list[str], other: list[str]) -> list[Hunk]:
    with tempfile.TemporaryDirectory(prefix="compose-") as tmp:
        paths = []
        for name, lines in (("base", base), ("other", other)):
            paths.append(os.path.join(tmp, name))
            with open(paths[-1], "w", encoding="utf-8") as f:
                f.writelines(lines)
        # pinned options, so that the user's git config cannot change the hunks
        cmd = ["git", "-c", "core.quotePath=false", "-c", "diff.indentHeuristic=true", "diff", "--no-index",
               "--no-color", "--no-ext-diff", "--no-textconv", "--no-renames", "--histogram", "-U0", *paths]
        proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", cwd=tmp,  # no repository's config
                              env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull})
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"git diff failed: {proc.stderr.strip()}")
    hunks = []
    for match in re.finditer(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@", proc.stdout, re.MULTILINE):
        bs, bc, os_, oc = int(match[1]), int(match[2] or 1), int(match[3]), int(match[4] or 1)
        b1 = bs if bc == 0 else bs - 1  # a count of 0 gives the line *after which* lines are inserted
        o1 = os_ if oc == 0 else os_ - 1
        hunks.append(Hunk(b1, b1 + bc, o1, o1 + oc))
    return hunks


def hunks_difflib(base: list[str], other: list[str]) -> list[Hunk]:
    matcher = difflib.SequenceMatcher(None, base, other, autojunk=False)
    return [Hunk(i1, i2, j1, j2) for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag != "equal"]


ENGINES = {"git": hunks_git, "difflib": hunks_difflib}


def _slide_range(h: Hunk, hunks: list[Hunk], k: int, base: list[str], other: list[str]) -> tuple[int, int]:
    """How far the pure insertion `h` (= hunks[k]) can slide and still mean the same edit: up while its last line
    equals the base line above it, down while its first line equals the base line below it, never touching this
    side's neighbouring hunks. Returns its lowest and highest base position."""
    prev_end = hunks[k - 1].b2 if k > 0 else -1
    next_start = hunks[k + 1].b1 if k + 1 < len(hunks) else len(base) + 1
    lo = h.b1
    while lo - 1 > prev_end and other[h.o2 - 1 - (h.b1 - lo)] == base[lo - 1]:
        lo -= 1
    hi = h.b1
    while hi + 1 < next_start and hi < len(base) and other[h.o1 + (hi - h.b1)] == base[hi]:
        hi += 1
    return lo, hi


def align_insertions(base: list[str], a: list[str], b: list[str], hunks_a: list[Hunk],
                     hunks_b: list[Hunk]) -> tuple[list[Hunk], list[Hunk]]:
    """Put two pure insertions (one per side) that could sit at the same base position at the same one.

    Where an insertion goes among equal lines (typically blank lines around an appended block) is the diff engine's
    arbitrary choice, so two blocks that both scripts append at one place can come out of the diffs one line apart,
    and would then be merged in either order. Every pure insertion of A whose slide range meets one of B's is moved,
    with that one, to A's own position if the other can reach it, else B's, else the lowest common position; the
    union rule of `merge3` then orders them A, then B, whatever the engine."""
    hunks_a, hunks_b = list(hunks_a), list(hunks_b)
    ranges_b = {j: _slide_range(h, hunks_b, j, base, b) for j, h in enumerate(hunks_b) if h.b1 == h.b2}
    for i, h in enumerate(hunks_a):
        if h.b1 != h.b2:
            continue
        lo, hi = _slide_range(h, hunks_a, i, base, a)
        for j, (lo_b, hi_b) in ranges_b.items():
            common = max(lo, lo_b), min(hi, hi_b)
            if common[0] > common[1] or hunks_b[j].b1 == h.b1:
                continue
            g = hunks_b[j]
            pos = h.b1 if common[0] <= h.b1 <= common[1] else g.b1 if common[0] <= g.b1 <= common[1] else common[0]
            hunks_a[i] = Hunk(pos, pos, h.o1 + pos - h.b1, h.o2 + pos - h.b1)
            hunks_b[j] = Hunk(pos, pos, g.o1 + pos - g.b1, g.o2 + pos - g.b1)
            ranges_b[j] = (pos, pos)
            break
    return hunks_a, hunks_b


@dataclass
class Conflict:
    b1: int  # base region [b1, b2), 0-based in the code after the docstring
    b2: int
    base: list[str]
    a: list[str]
    b: list[str]
    a_span: tuple[int, int]  # the region's lines in A's code, 0-based [start, end)
    b_span: tuple[int, int]


@dataclass
class Merge:
    lines: list[str] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    unions: list[int] = field(default_factory=list)  # base positions where two insertions were joined, A then B


def _apply(base: list[str], other: list[str], hunks: list[Hunk], r1: int, r2: int) -> tuple[list[str], int, int]:
    """The text of base region [r1, r2) after `hunks` (all inside it), and its span in `other`."""
    out, pos = [], r1
    start = None
    for h in hunks:
        if start is None:
            start = h.o1 - (h.b1 - r1)
        out += base[pos:h.b1] + other[h.o1:h.o2]
        pos = h.b2
    out += base[pos:r2]
    return out, start, start + len(out)


def merge3(base: list[str], a: list[str], b: list[str], hunks_a: list[Hunk], hunks_b: list[Hunk],
           labels: tuple[str, str, str] = ("A", "base", "B")) -> Merge:
    """diff3 over the hunks of base -> a and base -> b. Regions whose hunks overlap or touch are merged as one;
    returns the merged lines (with diff3 markers at conflicts) and the conflicts."""
    tagged = sorted([(h.b1, h.b2, 0, h) for h in hunks_a] + [(h.b1, h.b2, 1, h) for h in hunks_b],
                    key=lambda t: (t[0], t[1], t[2]))
    result = Merge()
    shift = [0, 0]  # other-side line minus base line, after the hunks applied so far (to locate untouched regions)
    pos, i = 0, 0
    while i < len(tagged):
        r1, r2 = tagged[i][0], tagged[i][1]
        group = [tagged[i]]
        i += 1
        while i < len(tagged) and tagged[i][0] <= r2:  # overlapping or touching (git merge-file and diff3 agree)
            r2 = max(r2, tagged[i][1])
            group.append(tagged[i])
            i += 1
        result.lines += base[pos:r1]
        pos = r2
        sides = [[t[3] for t in group if t[2] == s] for s in (0, 1)]
        texts, spans = [], []
        for s, other in enumerate((a, b)):
            if sides[s]:
                text, start, end = _apply(base, other, sides[s], r1, r2)
            else:
                text, start, end = base[r1:r2], r1 + shift[s], r1 + shift[s] + (r2 - r1)
            texts.append(text)
            spans.append((start, end))
            shift[s] = end - r2
        if not sides[1]:
            result.lines += texts[0]
        elif not sides[0]:
            result.lines += texts[1]
        elif texts[0] == texts[1]:
            result.lines += texts[0]
        elif r1 == r2:  # both sides only insert, at the same base position: A's insertion, then B's
            result.lines += texts[0] + texts[1]
            result.unions.append(r1)
        else:
            result.conflicts.append(Conflict(r1, r2, base[r1:r2], texts[0], texts[1], spans[0], spans[1]))
            result.lines += ([f"<<<<<<< {labels[0]}\n"] + texts[0] + [f"||||||| {labels[1]}\n"] + base[r1:r2]
                             + ["=======\n"] + texts[1] + [f">>>>>>> {labels[2]}\n"])
    result.lines += base[pos:]
    return result


# ---------------------------------------------------------------------------------------------------------------
# Checks on the result: duplicate definitions, Args fields


def definitions(tree: ast.AST) -> dict[str, list[int]]:
    """Every name a `def`, `class` (in any scope), a module-level assignment or a class-level field defines, keyed
    by its qualified name ("QNetwork.__init__", "Args.redo_tau"), with the lines that define it. Statements inside
    `if`/`try`/`for`/`with` blocks count in the enclosing scope."""
    found: dict[str, list[int]] = {}

    def visit(body, prefix: str, scope: str):
        for node in body:
            names = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif scope in ("module", "class") and isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            elif scope in ("module", "class") and isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            for name in names:
                found.setdefault(prefix + name, []).append(node.lineno)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(node.body, f"{prefix}{node.name}.", "function")
            elif isinstance(node, ast.ClassDef):
                visit(node.body, f"{prefix}{node.name}.", "class")
            else:
                for attr in ("body", "orelse", "finalbody"):
                    visit(getattr(node, attr, []) or [], prefix, scope)
                for handler in getattr(node, "handlers", []) or []:
                    visit(handler.body, prefix, scope)
                for case in getattr(node, "cases", []) or []:
                    visit(case.body, prefix, scope)

    visit(tree.body, "", "module")
    return found


def duplicates(merged: ast.AST, a: ast.AST, b: ast.AST) -> dict[str, list[int]]:
    """Names the merge defines more often in one scope than either parent does (e.g. two functions of one name)."""
    got, in_a, in_b = definitions(merged), definitions(a), definitions(b)
    return {name: lines for name, lines in got.items()
            if len(lines) > max(len(in_a.get(name, [])), len(in_b.get(name, [])))}


def args_fields(tree: ast.AST) -> list[str] | None:
    """The annotated fields of the module-level `Args` class, in order (None without one)."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Args":
            return [s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
    return None


def position(tree: ast.AST, line: int) -> str:
    """Where base line `line` is, for messages: "in QNetwork.__init__", or "after Args" between definitions."""
    name = enclosing(tree, line)
    if name != "module level":
        return f"in {name}"
    before = [n for n in getattr(tree, "body", []) if n.end_lineno < line]
    if before and isinstance(before[-1], (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return f"after {before[-1].name}"
    return "at module level"


def enclosing(tree: ast.AST, line: int) -> str:
    """The qualified name of the innermost def or class holding `line` (1-based), or "module level"."""
    best = "module level"

    def visit(node, prefix: str):
        nonlocal best
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                if start <= line <= child.end_lineno:
                    best = prefix + child.name
                    visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return best


# ---------------------------------------------------------------------------------------------------------------
# The composed docstring


def _method(script: Script, base: Script) -> str:
    """The method's name from the docstring's title ("DQN + ReDo (Recycling ...) on EnvPool." -> "ReDo"), else from
    the file name."""
    title = script.docstring.strip().splitlines()[0]
    match = TITLE_RE.match(title)
    if match:
        method = match["method"]
        while re.search(r"\([^()]*\)", method):  # drop parentheticals, nested ones too
            method = re.sub(r"\s*\([^()]*\)", "", method)
        if method.strip():
            return method.strip()
    name = script.name
    return name[len(base.name) + 1:] if name.startswith(base.name + "_") else name


def _algo_and_where(script: Script) -> tuple[str, str] | None:
    match = TITLE_RE.match(script.docstring.strip().splitlines()[0])
    return (match["algo"], match["where"]) if match else None


def _doc_body(script: Script) -> list[str]:
    """The docstring's source lines after its title, without the closing quotes and the `Base script: ...`
    paragraph (the composed docstring gets its own)."""
    source = "".join(script.doc_source)
    match = re.match(r'^[rRuU]?"""(.*)"""\s*$', source, re.DOTALL)
    if match:
        body = match[1]
    else:  # other quoting: the evaluated docstring, escaped
        body = script.docstring.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    lines = body.splitlines()[1:]
    out, skipping = [], False
    for line in lines:
        if BASE_RE.match(line):
            skipping = True
        elif skipping and not line.strip():
            skipping = False
            continue
        if not skipping:
            out.append(line)
    while out and not out[0].strip():
        out.pop(0)
    while out and not out[-1].strip():
        out.pop()
    return out


def composed_docstring(a: Script, b: Script, base: Script, base_path: str, out: str, command: str) -> list[str]:
    methods = _method(a, base), _method(b, base)
    algo_where = _algo_and_where(a) or _algo_and_where(b)
    algo = algo_where[0] if algo_where else base.name.upper()
    where = f" on {algo_where[1]}" if algo_where else ""
    lines = [f'"""{algo} + {methods[0]} + {methods[1]}{where}: composed by benchmark/compose.py.', "",
             f"This script is {base_path} with the differences of {a.shown} and of {b.shown}, merged three-way "
             f"(docs/conventions.md, section 9). Both methods are on by default, each with its own flags and "
             f"defaults; each one's flags switch it off as in its own script."]
    for k, (script, method) in enumerate(((a, methods[0]), (b, methods[1])), start=1):
        lines += ["", f"=== Method {k}: {method} (from {script.shown}) ===", ""] + _doc_body(script)
    docs = [f"docs/{s.name}.md" for s in (a, b)]
    lines += ["", f"Base script: {base_path}; composed from {a.shown} and {b.shown} by `{command}`; docs: "
                  f"{docs[0]} and {docs[1]}. Conventions every script follows: docs/conventions.md.", '"""']
    wrapped = []
    for line in lines:  # to 120 columns (the parents' lines are shorter already and stay as they are)
        long = len(line) > 120
        wrapped += textwrap.wrap(line, 120, break_on_hyphens=False, break_long_words=False) if long else [line]
    return [line + "\n" for line in wrapped]


# ---------------------------------------------------------------------------------------------------------------
# The command


def _display(path: str) -> str:
    """A path as the composed docstring and the messages show it: a script of an `algos/` directory as
    `algos/<name>.py` (as the scripts name each other), else relative to the current directory when inside it."""
    if os.path.basename(os.path.dirname(os.path.abspath(path))) == "algos":
        return "algos/" + os.path.basename(path)
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _show(lines: list[str], indent: str = "    ") -> str:
    return "".join(indent + line if line.strip() else "\n" for line in lines) or f"{indent}(nothing)\n"


def _range(start: int, end: int, offset: int) -> str:
    """1-based file lines of the 0-based code span [start, end) (offset: the docstring's lines)."""
    return f"lines {start + offset + 1}-{end + offset}" if end > start else f"nothing (after line {start + offset})"


def compose(a_path: str, b_path: str, out: str, *, allow_markers: bool = False, force: bool = False,
            engine: str = "auto", stdout=None, stderr=None) -> int:
    """Compose; returns the exit status (0 clean, 1 conflict). Raises ComposeError for bad input."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    a, b = read_script(a_path), read_script(b_path)
    if same_file(a_path, b_path) or a.code == b.code:
        raise ComposeError(f"{a_path} and {b_path} are the same script: compose two different interventions")
    bases = declared_base(a), declared_base(b)
    for script, declared, other in ((a, bases[0], b), (b, bases[1], a)):
        if declared is None:
            other_base = declared_base(other)
            if other_base is not None and same_file(other_base, script.path):
                raise ComposeError(f"{script.path} is the base script of {other.path}: compose two interventions of "
                                   f"one base")
            raise ComposeError(f"{script.path} declares no base script (no 'Base script: algos/<base>.py' line in its "
                               f"docstring): only intervention scripts can be composed")
    if not same_file(bases[0], bases[1]):
        raise ComposeError(f"{a_path} is based on {os.path.basename(bases[0])} but {b_path} on "
                           f"{os.path.basename(bases[1])}: compose two interventions of one base")
    if not os.path.isfile(bases[0]):
        raise ComposeError(f"the base script {bases[0]} declared by {a_path} does not exist")
    if any(os.path.exists(p) and same_file(out, p) for p in (a_path, b_path, bases[0])):
        raise ComposeError(f"the output {out} is one of the parents or the base: choose a new file name")
    if os.path.exists(out) and not force:
        raise ComposeError(f"{out} exists: pass --force to overwrite it")
    if not out.endswith(".py"):
        raise ComposeError(f"the output {out} must end in .py (its exp_name is its file name)")
    base = read_script(bases[0])
    if engine == "auto":
        engine = "git" if git_available() else "difflib"
    diff = ENGINES[engine]
    hunks_a, hunks_b = diff(base.code, a.code), diff(base.code, b.code)
    hunks_a, hunks_b = align_insertions(base.code, a.code, b.code, hunks_a, hunks_b)
    base_label = _display(bases[0])
    merge = merge3(base.code, a.code, b.code, hunks_a, hunks_b, labels=(a.shown, base_label, b.shown))

    base_tree = ast.parse(base.text)
    offsets = base.doc_end, a.doc_end, b.doc_end
    problems = []
    for c in merge.conflicts:
        where = position(base_tree, c.b1 + offsets[0] + 1)
        problems.append(
            f"conflict: {base_label}: base {_range(c.b1, c.b2, offsets[0])} ({where}): both scripts change them\n"
            f"--- {base_label}, base {_range(c.b1, c.b2, offsets[0])}:\n{_show(c.base)}"
            f"--- {a.shown}, {_range(*c.a_span, offsets[1])}:\n{_show(c.a)}"
            f"--- {b.shown}, {_range(*c.b_span, offsets[2])}:\n{_show(c.b)}")
    command = shlex.join(["python", "-m", "benchmark.compose", a.shown, b.shown, "-o", _display(out)])
    text = "".join(composed_docstring(a, b, base, base_label, _display(out), command) + merge.lines)
    if not merge.conflicts:
        try:
            tree = ast.parse(text, filename=out)
        except SyntaxError as err:
            problems.append(f"conflict: the merged script does not parse (line {err.lineno}: {err.msg}): the two "
                            f"methods' changes do not fit together")
        else:
            for name, lines in sorted(duplicates(tree, ast.parse(a.text), ast.parse(b.text)).items()):
                problems.append(f"conflict: duplicate definition: `{name}` is defined at lines "
                                f"{', '.join(map(str, lines))} of the merged script: both scripts define it")
            fields = args_fields(tree), args_fields(ast.parse(a.text)), args_fields(ast.parse(b.text))
            if fields[1] is not None and fields[2] is not None and set(fields[0] or []) != set(fields[1]) | set(
                    fields[2]):
                problems.append(f"conflict: the merged Args fields are not the union of both scripts' fields "
                                f"(missing {sorted(set(fields[1]) | set(fields[2]) - set(fields[0] or []))}, extra "
                                f"{sorted(set(fields[0] or []) - set(fields[1]) - set(fields[2]))})")
            if not problems:
                try:  # compile() also checks what the parser does not (`return` outside a function, ...)
                    compile(text, out, "exec")
                except SyntaxError as err:
                    problems.append(f"conflict: the merged script does not compile (line {err.lineno}: {err.msg})")
    print(f"compose: {base_label} + ({a.shown}: {len(hunks_a)} hunks) + ({b.shown}: {len(hunks_b)} hunks), "
          f"diffs by {engine}", file=stdout)
    for pos in merge.unions:
        print(f"compose: both insert after {base_label} line {pos + offsets[0]} "
              f"({position(base_tree, max(pos + offsets[0], 1))}): {a.shown}'s lines, then {b.shown}'s", file=stdout)
    if problems:
        for problem in problems:
            print(problem, file=stderr)
        if not allow_markers:
            print(f"compose: {len(problems)} conflict(s); nothing written (--allow-markers writes the file with "
                  f"markers)", file=stderr)
            return 1
        _write(out, text)
        print(f"warning: wrote {out} with {len(merge.conflicts)} conflict marker block(s) ({len(problems)} "
              f"conflict(s) in all): it does not run until they are resolved", file=stderr)
        return 1
    _write(out, text)
    print(f"compose: wrote {out}", file=stdout)
    return 0


def _write(path: str, text: str):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.compose", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="the first intervention script (its insertions come first where both insert)")
    parser.add_argument("b", help="the second intervention script, of the same base")
    parser.add_argument("-o", "--output", required=True, help="the composed script to write, e.g. algos/dqn_a_b.py")
    parser.add_argument("--allow-markers", action="store_true",
                        help="on a conflict, write the file with conflict markers anyway (the exit status stays 1)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    parser.add_argument("--engine", choices=["auto", "git", "difflib"], default="auto",
                        help="what computes the line diffs: git diff (default when git is on PATH) or difflib")
    args = parser.parse_args(argv)
    try:
        return compose(args.a, args.b, args.output, allow_markers=args.allow_markers, force=args.force,
                       engine=args.engine)
    except ComposeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
