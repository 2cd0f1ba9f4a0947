"""benchmark/compose.py: composing two intervention scripts of one base into a standalone script.

- Every pair of intervention scripts of every family in algos/ (found by the base their docstrings declare, not
  listed here) is composed: either the merge is clean, and the composed script imports, its `Args` fields are
  exactly the union of its parents', it runs a smoke budget to a completed summary.json, and with both methods
  switched off it writes the base script's episodes.csv byte for byte; or the command reports a conflict (exit
  status 1, base line numbers, nothing written).
- The merge on tiny synthetic scripts, with both diff engines: two insertions at one base position are joined A then
  B (also where the engines place blank lines differently), identical changes are taken once, overlapping changes
  are a conflict with line numbers and no output, `--allow-markers` writes diff3 markers, and duplicate definitions
  (functions, Args fields) are conflicts.
- Bad input through the command line: one `error:` line, exit status 2.

The composed scripts run in this process with one torch thread (as tests/test_dqn_gap.py does); only the
command-line error cases start subprocesses (`python -m benchmark.compose` imports nothing heavy)."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import re
import subprocess
import sys

import pytest
import torch
import tyro

from helpers import ALGOS_DIR, REPO_ROOT, algo_scripts, assert_one_line_error, describe, load_script, read_json

sys.path.insert(0, REPO_ROOT)
from benchmark import compose  # noqa: E402
from benchmark.launch import load_suite  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# The families of algos/, from the bases the scripts declare


def find_families() -> dict[str, list[str]]:
    """base file name -> the intervention scripts that declare it, sorted."""
    families: dict[str, list[str]] = {}
    for name in algo_scripts():
        base = compose.declared_base(compose.read_script(os.path.join(ALGOS_DIR, name)))
        if base is not None:
            families.setdefault(os.path.basename(base), []).append(name)
    return families


def composed_from(script: str) -> set[str]:
    """The parents of a composed script in algos/ (its docstring's "composed from algos/A and algos/B"), else {}."""
    doc = " ".join(compose.read_script(os.path.join(ALGOS_DIR, script)).docstring.split())
    match = re.search(r"composed from algos/(\w+\.py) and algos/(\w+\.py)", doc)
    return set() if match is None else {match[1], match[2]} | composed_from(match[1]) | composed_from(match[2])


FAMILIES = find_families()
# every pair of one family, except a composed script with one of its own parents (it always duplicates that method)
PAIRS = [(base, a, b) for base, members in sorted(FAMILIES.items()) for a, b in itertools.combinations(members, 2)
         if a not in composed_from(b) and b not in composed_from(a)]

# How to switch each method off, so that its script is its base script (each script's own tests check this alone:
# test_dqn_gap.py, test_dqn_hlgauss.py, test_dqn_reset.py, test_dqn_softmoe.py, test_dqn_pruning.py, test_dqn_rigl.py,
# test_dqn_mico.py, test_dqn_qdagger.py, test_dqn_cchain.py, test_ppo_gtr.py, test_ppo_simplicial.py,
# test_ppo_cchain.py, test_ppo_regrama.py, test_ppo_sigreg.py, test_ppo_decoupled.py, test_ppo_vaco.py,
# test_ppo_asyppo.py, test_ppo_kl.py, test_ppo_moe.py, test_ppo_stable.py, test_sac_reset.py, test_sac_simplicial.py,
# test_sac_regrama.py, test_sac_optimistic.py, test_sac_least.py; ReDo has no off switch but a recycle that never fires).
# A new intervention script needs an entry here.
OFF = {
    "dqn_redo.py": dict(redo_period=10**9),
    "dqn_hlgauss.py": dict(value_loss="mse"),
    "dqn_gap.py": dict(bottleneck="flatten", encoder_width=1),
    "dqn_reset.py": dict(reset_period=0),
    "dqn_softmoe.py": dict(moe_type="none"),
    "dqn_pruning.py": dict(sparsity=0.0),
    "dqn_rigl.py": dict(sparsity=0.0),
    "dqn_mico.py": dict(mico_weight=0.0),
    "dqn_qdagger.py": dict(),  # no --teacher-checkpoint: dqn.py (tests/test_dqn_qdagger.py)
    "dqn_cchain.py": dict(cchain=False),
    "ppo_gtr.py": dict(objective="clip"),
    "ppo_simplicial.py": dict(sem_placement="none"),
    "ppo_cchain.py": dict(cchain=False),
    "ppo_regrama.py": dict(regrama_tau=-1.0),
    "ppo_sigreg.py": dict(sigreg_lambda=0.0),
    "ppo_decoupled.py": dict(),  # the defaults on CartPole (separate MLPs, every loss off, no critic phase) are ppo.py's
    "ppo_vaco.py": dict(align=False, trust_region="clip"),  # and the default --policy-lag 0
    "ppo_asyppo.py": dict(num_critics=1, critic_width=64, adv_mask_quantile=0.0, ent_filter_quantile=0.0),
    "ppo_kl.py": dict(kl_beta=0.0),  # the init reference: a frozen copy, never used (the kl/ logs only)
    "ppo_moe.py": dict(moe_type="none"),
    "ppo_stable.py": dict(mlp_type="plain", layer_norm=False, optimizer="adam"),  # depth and width: ppo.py's
    "sac_simplicial.py": dict(sem_placement="none"),
    "sac_reset.py": dict(reset_every=0),
    "sac_regrama.py": dict(regrama_tau=-1.0),
    "sac_optimistic.py": dict(),  # the defaults (256-wide actor and critics, min target) are sac.py's
    "sac_least.py": dict(least_window=0),
}



def off_switch(script: str) -> dict:
    """The flags that switch `script`'s method off: OFF, or for a composed script of algos/ both parents' switches."""
    if script in OFF:
        return OFF[script]
    parents = composed_from(script)
    assert parents, f"add the off switch of {script} to OFF in tests/test_compose.py"
    return {key: value for parent in sorted(parents) for key, value in off_switch(parent).items()}


COMPOSED = [name for name in algo_scripts() if composed_from(name)]  # composed scripts committed to algos/


@pytest.mark.parametrize("script", COMPOSED)
def test_committed_composition_is_up_to_date(script, tmp_path):
    """A composed script in algos/ is exactly what the command writes from its parents today: a change to a parent
    that was not carried into it (by composing again with --force) fails here."""
    doc = " ".join(compose.read_script(os.path.join(ALGOS_DIR, script)).docstring.split())
    a, b = re.search(r"composed from algos/(\w+\.py) and algos/(\w+\.py)", doc).groups()
    out = tmp_path / "algos" / script  # an algos/ directory, so the docstring names it algos/<script>
    out.parent.mkdir()
    assert compose.main([os.path.join(ALGOS_DIR, a), os.path.join(ALGOS_DIR, b), "-o", str(out)]) == 0
    with open(os.path.join(ALGOS_DIR, script)) as f:
        assert out.read_text() == f.read(), (
            f"algos/{script} differs from a fresh composition: python -m benchmark.compose algos/{a} algos/{b} "
            f"-o algos/{script} --force")


def documented_pairs() -> dict[tuple[str, str], tuple[str, str]]:
    """The table of docs/conventions.md, section 9: (A, B) -> ("clean" or "conflict", the row)."""
    with open(os.path.join(REPO_ROOT, "docs", "conventions.md")) as f:
        text = f.read().split("## 9. Composing two interventions", 1)[1]
    return {(f"{a}.py", f"{b}.py"): (result, row) for row, a, b, result in
            re.findall(r"^(\| \w+ \| `(\w+)` \+ `(\w+)` \| (clean|conflict) \|.*)$", text, re.M)}


# the smoke suite's arms: (script, env id) -> flags (the first arm of each), the budgets tests/script_budgets.py uses
SMOKE: dict[tuple[str, str], list[str]] = {}
for _run in load_suite("smoke")[1]:
    SMOKE.setdefault((os.path.basename(_run.script), _run.env_id), list(_run.flags))
FIRST_ENV = {}
for (_script, _env), _ in SMOKE.items():
    FIRST_ENV.setdefault(_script, _env)


def flag_pairs(flags: list[str]) -> dict[str, str | None]:
    out, i = {}, 0
    while i < len(flags):
        value = flags[i + 1] if i + 1 < len(flags) and not flags[i + 1].startswith("--") else None
        out[flags[i]] = value
        i += 2 if value is not None else 1
    return out


def unpair(pairs: dict[str, str | None]) -> list[str]:
    return [token for key, value in pairs.items() for token in ([key] if value is None else [key, value])]


def smoke_candidates(base: str, a: str, b: str) -> list[tuple[str, list[str]]]:
    """(env id, flags) to try, in order: each parent's smoke env with the base's arm there (else the parent's), plus
    both parents' method flags (their arm's flags that the base's arm for the same env does not have)."""
    extras = {}
    for parent in (a, b):
        env = FIRST_ENV[parent]
        own, of_base = flag_pairs(SMOKE[(parent, env)]), flag_pairs(SMOKE.get((base, env), []))
        extras.update({k: v for k, v in own.items() if of_base.get(k, "absent") != v})
    candidates = []
    for parent in (a, b):
        env = FIRST_ENV[parent]
        if env not in [c[0] for c in candidates]:
            flags = {**flag_pairs(SMOKE.get((base, env), SMOKE[(parent, env)])), **extras}
            candidates.append((env, unpair(flags)))
    return candidates


def load_path(path: str):
    """Import a composed script by path (registered in sys.modules: dataclasses resolve Args' annotations there)."""
    name = "composed_" + os.path.basename(path)[: -len(".py")]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def field_names(module) -> set[str]:
    return {f.name for f in dataclasses.fields(module.Args)}


def run_in_process(module, tmp_path, name: str, env_id: str, flags: list[str], **changes) -> str:
    args = tyro.cli(module.Args, args=["--env-id", env_id, *flags])
    args = dataclasses.replace(args, **changes, device="cpu", torch_threads=1, output_dir=str(tmp_path), run_name=name)
    module.run(args)
    return os.path.join(str(tmp_path), name)


BASE_RUNS: dict[str, bytes] = {}  # base script -> its episodes.csv on its first smoke arm (metrics off)


def base_episodes(base: str, tmp_path_factory) -> bytes:
    if base not in BASE_RUNS:
        env = FIRST_ENV[base]
        run_dir = run_in_process(load_script(base), tmp_path_factory.mktemp("base"), "base", env, SMOKE[(base, env)],
                                 seed=3, metrics_every=0)
        with open(os.path.join(run_dir, "episodes.csv"), "rb") as f:
            BASE_RUNS[base] = f.read()
        assert BASE_RUNS[base].count(b"\n") > 5, "the base's smoke run finished too few episodes to compare"
    return BASE_RUNS[base]


# ---------------------------------------------------------------------------------------------------------------
# Every pair of every family


def test_families_are_found():
    """The discovery is not vacuous: the DQN family has its interventions, and every intervention has a smoke arm."""
    assert len(FAMILIES.get("dqn.py", [])) >= 2 and PAIRS
    for members in FAMILIES.values():
        for script in members:
            assert script in FIRST_ENV, f"{script} has no arm in benchmark/suites/smoke.toml"


@pytest.mark.parametrize("base,a,b", PAIRS, ids=[f"{a[:-3]}+{b[:-3]}" for _, a, b in PAIRS])
def test_compose_pair(base, a, b, tmp_path, tmp_path_factory, capsys):
    stem = base[: -len(".py")]
    out = tmp_path / f"{a[:-3]}_{b[len(stem) + 1:-3]}.py"
    rc = compose.main([os.path.join(ALGOS_DIR, a), os.path.join(ALGOS_DIR, b), "-o", str(out)])
    captured = capsys.readouterr()
    assert rc in (0, 1), captured.out + captured.err
    documented, row = documented_pairs().get((a, b), (None, ""))
    assert documented == ("clean", "conflict")[rc], \
        f"docs/conventions.md, section 9, says {a} + {b}: {documented}; the command says: {captured.err or 'clean'}"
    for where in re.findall(r"^conflict: .*: base lines \d+-\d+ \(in ([\w.]+)\)", captured.err, re.M):
        assert where in row, f"docs/conventions.md, section 9: the row of {a} + {b} does not name {where}"
    if compose.git_available():  # docs/conventions.md: both diff engines give the same results on the scripts
        other = tmp_path / "difflib" / out.name
        other.parent.mkdir()
        assert compose.main([os.path.join(ALGOS_DIR, a), os.path.join(ALGOS_DIR, b), "-o", str(other),
                             "--engine", "difflib"]) == rc
        difflib_err = capsys.readouterr().err
        if rc == 0:
            assert code_of(other.read_text()) == code_of(out.read_text())
        else:
            assert re.findall(r"^conflict: .*$", difflib_err, re.M) == re.findall(r"^conflict: .*$", captured.err, re.M)
    if rc == 1:  # a reported conflict: where, and nothing written
        assert not out.exists(), "a conflicting composition wrote its output"
        assert re.search(rf"conflict: .*{re.escape(base)}: base lines \d+-\d+ \(|conflict: duplicate definition",
                         captured.err), captured.err
        assert "nothing written" in captured.err
        return
    assert rc == 0, captured.out + captured.err
    module = load_path(str(out))
    parents = load_script(a), load_script(b)
    assert field_names(module) == field_names(parents[0]) | field_names(parents[1])
    first = module.__doc__.splitlines()[0]
    doc = " ".join(module.__doc__.split())  # the composed paragraphs are wrapped
    for parent in parents:  # each parent's docstring body, its "Differences from the base script" list included
        lists = re.findall(r"Differences from the base script \(`diff [^`]+`", " ".join(parent.__doc__.split()))
        assert lists and all(line in doc for line in lists)
    assert f"Base script: algos/{base}; composed from algos/{a} and algos/{b}" in doc
    assert f"docs: docs/{a[:-3]}.md and docs/{b[:-3]}.md" in doc
    assert first.count(" + ") >= 2, first

    # a smoke budget: the first of the parents' smoke environments that the composition accepts
    errors = []
    for k, (env, flags) in enumerate(smoke_candidates(base, a, b)):
        try:
            run_dir = run_in_process(module, tmp_path, f"smoke{k}", env, flags)
        except module.UserError as err:
            errors.append(f"{env}: {err}")
            continue
        break
    else:
        pytest.fail(f"the composed script refused every smoke environment: {errors}")
    summary = read_json(os.path.join(run_dir, "summary.json"))
    assert summary["status"] == "completed" and summary["global_step"] == summary["total_timesteps"]
    config = read_json(os.path.join(run_dir, "config.json"))["args"]
    assert config["exp_name"] == out.name[: -len(".py")]
    assert set(config) >= field_names(parents[0]) | field_names(parents[1])

    # both methods switched off: the base script's episodes.csv, byte for byte
    off = {**off_switch(a), **off_switch(b)}
    env = FIRST_ENV[base]
    off_dir = run_in_process(module, tmp_path, "off", env, SMOKE[(base, env)], seed=3, metrics_every=0, **off)
    with open(os.path.join(off_dir, "episodes.csv"), "rb") as f:
        got = f.read()
    assert got == base_episodes(base, tmp_path_factory), \
        f"{out.name} with {off} wrote another episodes.csv than {base}"


# ---------------------------------------------------------------------------------------------------------------
# The merge on synthetic scripts

BASE = '''"""Toy on tests: a base script.

Differences from the base script: none (this *is* the base script).
"""

import os


class Args:
    seed: int = 1
    """the seed"""


def f(x):
    return x + 1


def run(args):
    y = f(args.seed)
    return y
'''


def intervention(method: str, code: str) -> str:
    return (f'"""Toy + {method} (a method) on tests.\n\nMethod: {method.lower()}.\n\nDifferences from the base '
            f'script:\n  - {method.lower()}.\n\nBase script: algos/base.py (the toy). Docs: docs/x.md.\n"""\n' + code)


def code_of(text: str) -> str:
    """The code after a module docstring that ends with a line of its own closing quotes."""
    return text.split('\n"""\n', 1)[1]


def base_code() -> str:
    return code_of(BASE)


def write(tmp_path, name: str, text: str) -> str:
    path = os.path.join(str(tmp_path), name)
    with open(path, "w") as f:
        f.write(text)
    return path


def toy(tmp_path, **methods: str) -> dict[str, str]:
    """base.py and one script per method, each the base's code with (old, new) replacements applied."""
    paths = {"base": write(tmp_path, "base.py", BASE)}
    for name, edits in methods.items():
        code = base_code()
        for old, new in edits:
            assert old in code
            code = code.replace(old, new, 1)
        paths[name] = write(tmp_path, f"base_{name}.py", intervention(name.capitalize(), code))
    return paths


ENGINES = ["difflib"] + (["git"] if compose.git_available() else [])
ARGS_END = '    """the seed"""\n'


@pytest.mark.parametrize("engine", ENGINES)
def test_insertions_at_one_place_are_joined_a_then_b(tmp_path, capsys, engine):
    paths = toy(tmp_path,
                alpha=[(ARGS_END, ARGS_END + '\n    # --- Alpha ---\n    alpha: int = 2\n    """alpha"""\n'),
                       ("    y = f(args.seed)\n", "    y = f(args.seed)\n    y = y * 2  # Alpha\n")],
                beta=[(ARGS_END, ARGS_END + '\n    # --- Beta ---\n    beta: int = 3\n    """beta"""\n'),
                      ("    y = f(args.seed)\n", "    y = f(args.seed)\n    y = y - 1  # Beta\n"),
                      ("import os\n", "import math\nimport os\n")])
    for first, second in (("alpha", "beta"), ("beta", "alpha")):
        out = os.path.join(str(tmp_path), f"{first}_{second}.py")
        assert compose.main([paths[first], paths[second], "-o", out, "--engine", engine]) == 0
        assert f"diffs by {engine}" in capsys.readouterr().out
        text = open(out).read()
        code = code_of(text)
        a_flag, b_flag = f"    {first}: int", f"    {second}: int"
        assert code.index(a_flag) < code.index(b_flag)  # A's insertion, then B's, in Args and in run()
        assert code.index(f"# {first.capitalize()}\n") < code.index(f"# {second.capitalize()}\n")
        assert code.count("import math\n") == 1 and code.count("\n\n\n\n") == 0
        namespace = {}
        exec(compile(text, out, "exec"), namespace)
        # alpha then beta: (1 + 1) * 2 - 1 = 3; beta then alpha: (1 + 1 - 1) * 2 = 2
        assert namespace["run"](namespace["Args"]) == {"alpha": 3, "beta": 2}[first]
        assert text.splitlines()[0] == f'"""Toy + {first.capitalize()} + {second.capitalize()} on tests: composed by ' \
                                       f'benchmark/compose.py.'


def test_blank_line_placement_does_not_change_the_order(tmp_path):
    """Two blocks appended after the last Args field: which blank line a diff puts each block against is arbitrary
    (difflib and git differ on the real scripts); the insertions are aligned so the order is A, B either way."""
    base = compose.read_script(write(tmp_path, "base.py", BASE)).code
    end = base.index(ARGS_END) + 1  # base[end] is the first of the two blank lines after Args
    a = base[:end] + ["\n", "    alpha: int = 1\n"] + base[end:]
    b = base[:end] + ["\n", "    beta: int = 1\n"] + base[end:]
    # A's edit described with its block before the blank line base[end], B's with its block after it
    h_a = compose.Hunk(end + 1, end + 1, end + 1, end + 3)
    h_b = compose.Hunk(end, end, end, end + 2)
    assert a[end + 1:end + 3] == ["    alpha: int = 1\n", "\n"] and a[end] == base[end] == "\n"
    unaligned = "".join(compose.merge3(base, a, b, [h_a], [h_b]).lines)
    assert unaligned.index("beta") < unaligned.index("alpha")  # what the alignment is for
    merged = compose.merge3(base, a, b, *compose.align_insertions(base, a, b, [h_a], [h_b]))
    assert not merged.conflicts and len(merged.unions) == 1
    text = "".join(merged.lines)
    assert text.index("alpha") < text.index("beta") and "\n\n\n\n" not in text.split("def f")[0]


@pytest.mark.parametrize("engine", ENGINES)
def test_overlapping_changes_are_a_conflict(tmp_path, capsys, engine):
    paths = toy(tmp_path, alpha=[("    return x + 1\n", "    return x + 2  # Alpha\n")],
                beta=[("    return x + 1\n", "    return (x + 1) * 3  # Beta\n")])
    out = os.path.join(str(tmp_path), "out.py")
    assert compose.main([paths["alpha"], paths["beta"], "-o", out, "--engine", engine]) == 1
    err = capsys.readouterr().err
    line = BASE.splitlines().index("    return x + 1") + 1
    assert f"conflict: {paths['base']}: base lines {line}-{line} (in f): both scripts change them" in err
    assert "return x + 2  # Alpha" in err and "return (x + 1) * 3  # Beta" in err and "return x + 1\n" in err
    assert "nothing written" in err and not os.path.exists(out)

    # --allow-markers: the file, with diff3 markers, and still exit status 1
    assert compose.main([paths["alpha"], paths["beta"], "-o", out, "--engine", engine, "--allow-markers"]) == 1
    assert "warning: wrote" in capsys.readouterr().err
    code = code_of(open(out).read())
    expected = (f"<<<<<<< {paths['alpha']}\n    return x + 2  # Alpha\n||||||| {paths['base']}\n    return x + 1\n"
                f"=======\n    return (x + 1) * 3  # Beta\n>>>>>>> {paths['beta']}\n")
    assert expected in code


def test_a_change_touching_the_other_sides_insertion_is_a_conflict(tmp_path, capsys):
    """As in diff3 and git merge-file, hunks that touch are one region: only two pure insertions are joined."""
    paths = toy(tmp_path, alpha=[("def f(x):\n", "def f(x):\n    x = abs(x)  # Alpha\n")],
                beta=[("    return x + 1\n", "    return x - 1  # Beta\n")])
    assert compose.main([paths["alpha"], paths["beta"], "-o", os.path.join(str(tmp_path), "o.py")]) == 1
    assert "(in f): both scripts change them" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["function", "field"])
def test_duplicate_definitions_are_a_conflict(tmp_path, capsys, what):
    if what == "function":  # both add a helper `g`, at different places: the text merges, the module would not
        edits = {"alpha": [("def run(args):\n", "def g():\n    return 1\n\n\ndef run(args):\n")],
                 "beta": [("    return y\n", "    return y\n\n\ndef g():\n    return 2\n")]}
        name = "`g`"
    else:  # both add an Args field `scale`
        edits = {m: [(ARGS_END, ARGS_END + f"    scale: int = {v}\n")] for m, v in (("alpha", 1), ("beta", 2))}
        name = "`Args.scale`"
    paths = toy(tmp_path, **edits)
    out = os.path.join(str(tmp_path), "out.py")
    assert compose.main([paths["alpha"], paths["beta"], "-o", out]) == 1
    err = capsys.readouterr().err
    assert f"conflict: duplicate definition: {name} is defined at lines" in err
    assert not os.path.exists(out)


def test_force_and_the_output_checks(tmp_path, capsys):
    paths = toy(tmp_path, alpha=[("    return x + 1\n", "    return x + 11  # Alpha\n")],
                beta=[("    return y\n", "    return y * 2  # Beta\n")])
    out = write(tmp_path, "out.py", "# someone's file\n")
    with pytest.raises(compose.ComposeError, match="exists: pass --force"):
        compose.compose(paths["alpha"], paths["beta"], out)
    assert open(out).read() == "# someone's file\n"
    assert compose.main([paths["alpha"], paths["beta"], "-o", out, "--force"]) == 0
    namespace = {}
    exec(compile(open(out).read(), out, "exec"), namespace)
    assert namespace["run"](namespace["Args"]) == 24  # (1 + 11) * 2
    for target in (paths["alpha"], paths["base"]):
        with pytest.raises(compose.ComposeError, match="one of the parents or the base"):
            compose.compose(paths["alpha"], paths["beta"], target, force=True)


# ---------------------------------------------------------------------------------------------------------------
# Bad input through the command line


def cli(*args: str):
    return subprocess.run([sys.executable, "-m", "benchmark.compose", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)


def test_bad_input_is_one_line_and_exit_status_2(tmp_path):
    out = str(tmp_path / "out.py")
    redo, hl, gtr = "algos/dqn_redo.py", "algos/dqn_hlgauss.py", "algos/ppo_gtr.py"
    assert_one_line_error(cli(redo, redo, "-o", out), "the same script")
    assert_one_line_error(cli("algos/dqn.py", redo, "-o", out), "algos/dqn.py is the base script of algos/dqn_redo.py")
    assert_one_line_error(cli(redo, "algos/dqn.py", "-o", out), "is the base script")
    assert_one_line_error(cli(redo, gtr, "-o", out), "based on dqn.py", "on ppo.py")
    assert_one_line_error(cli("algos/bbf_atari.py", redo, "-o", out), "bbf_atari.py declares no base script")
    assert_one_line_error(cli(redo, hl, "-o", redo), "one of the parents or the base")
    assert_one_line_error(cli(redo, hl, "-o", str(tmp_path / "out.txt")), "must end in .py")
    assert_one_line_error(cli(redo, str(tmp_path / "missing.py"), "-o", out), "cannot read")
    assert not os.path.exists(out)
    with open(out, "w") as f:
        f.write("x = 1\n")
    assert_one_line_error(cli(redo, hl, "-o", out), "exists: pass --force")


def test_cli_composes_and_reports_conflicts(tmp_path):
    """The command line end to end on the toy scripts: exit status 0 and the file, exit status 1 and no file."""
    paths = toy(tmp_path, alpha=[("    return x + 1\n", "    return x + 2  # Alpha\n")],
                beta=[("    return x + 1\n", "    return x + 3  # Beta\n")],
                gamma=[("    return y\n", "    return -y  # Gamma\n")])
    proc = cli(paths["alpha"], paths["gamma"], "-o", str(tmp_path / "ok.py"))
    assert proc.returncode == 0 and os.path.exists(tmp_path / "ok.py"), describe(proc)
    proc = cli(paths["alpha"], paths["beta"], "-o", str(tmp_path / "no.py"))
    assert proc.returncode == 1 and not os.path.exists(tmp_path / "no.py"), describe(proc)
    assert "conflict:" in proc.stderr and "Traceback" not in proc.stderr
