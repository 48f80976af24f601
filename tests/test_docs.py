"""The docs site builds with warnings as errors, its rendered sections re-render byte for byte from their result
files, and every command in a bash block of README.md or docs/*.md is checked: it names scripts, modules, configs,
extras and options that exist, and it runs in CI or a test, or its block is marked as needing data, a GPU or a
long run (``<!-- needs: data, gpu, long -->`` on the line before the block)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NEEDS = {"data", "gpu", "long"}  # the reasons a documented command does not run in the tests
MARK = re.compile(r"<!-- needs: ([a-z, ]+) -->")
# Commands that CI or a test runs as documented (a command is run there when its words appear, in order, in one
# line of that file); every other command sits in a marked block.
RUN_BY = {
    "python3 -m venv .venv": ".ci/run",
    ". .venv/bin/activate": ".ci/run",
    "pip install -e .[all]": ".ci/run",
    "python -m pytest -q": ".ci/run",
}
EXTERNAL = {"apt-get", "mkdocs", "mlflow", "wandb"}  # programs of other projects a page may show
LAUNCHERS = {"torchrun", "deepspeed"}  # their own options come before the script


@dataclass
class Command:
    """One command of a bash block: where it is, its words, the block's needs and the repo entry point it runs."""

    page: str
    line: int
    words: list[str]
    needs: set[str]
    entry: tuple[str, str] | None = None  # ("script", "recipes/x.py") or ("module", "data_tools.build_shards")
    args: list[str] = field(default_factory=list)  # the words after the entry point

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {shlex.join(self.words)}"


def bash_blocks(path: Path) -> list[tuple[int, str, set[str]]]:
    """(first line, text, needs) of each fenced bash block of a markdown file; needs from the marker before it."""
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start, body = i + 1, []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            before = next((x.strip() for x in reversed(lines[:start - 1]) if x.strip()), "")
            m = MARK.fullmatch(before)
            needs = {n.strip() for n in m.group(1).split(",")} if m else set()
            blocks.append((start + 1, "\n".join(body), needs))
        i += 1
    return blocks


def split_commands(text: str) -> list[tuple[int, list[str]]]:
    """(line offset, words) of each simple command in a bash block: continuations joined, comments dropped, split
    at ``&&``, ``||``, ``;`` and ``|``; ``sbatch --wrap '...'`` yields the wrapped command too."""
    out: list[tuple[int, list[str]]] = []
    logical, offset = "", 0
    for n, line in enumerate(text.splitlines() + [""]):
        if not logical:
            offset = n
        logical += line.strip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        lex = shlex.shlex(logical, posix=True, punctuation_chars=True)
        lex.whitespace_split, lex.commenters = True, "#"
        words: list[str] = []
        for tok in [*lex, ";"]:
            if tok in ("&&", "||", ";", "|"):
                if words:
                    out.append((offset, words))
                    if words[0] == "sbatch" and "--wrap" in words:
                        out += [(offset, w) for _, w in split_commands(words[words.index("--wrap") + 1])]
                words = []
            else:
                words.append(tok)
        logical = ""
    return out


def console_scripts() -> dict[str, str]:
    """pyproject's console scripts: name -> module."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {k: v.split(":")[0].removesuffix(".__main__") for k, v in project["scripts"].items()}


def parse(page: str, line: int, words: list[str], needs: set[str]) -> Command:
    """A command with its entry point resolved (environment assignments skipped)."""
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    cmd = Command(page, line, words, needs)
    prog, rest = words[0], words[1:]
    if prog in LAUNCHERS:
        i = 0
        while i < len(rest) and rest[i].startswith("-") and rest[i] != "-m":
            i += 2 if i + 1 < len(rest) and not rest[i + 1].startswith("-") and "=" not in rest[i] else 1
        rest = rest[i:]
        prog = "python"
    if prog in ("python", "python3") and rest:
        if rest[0] == "-m":
            cmd.entry, cmd.args = ("module", rest[1]), rest[2:]
        elif rest[0].endswith(".py"):
            cmd.entry, cmd.args = ("script", rest[0]), rest[1:]
    elif prog in console_scripts():
        cmd.entry, cmd.args = ("module", console_scripts()[prog]), rest
    return cmd


def documented_commands() -> list[Command]:
    """Every command of every bash block of the README and the docs pages."""
    cmds = []
    for page in PAGES:
        for start, text, needs in bash_blocks(page):
            for offset, words in split_commands(text):
                cmds.append(parse(page.relative_to(ROOT).as_posix(), start + offset, words, needs))
    return cmds


def module_file(name: str) -> Path | None:
    """The repository file a ``python -m`` module runs, None when it is not one of the repository's."""
    base = ROOT / Path(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__main__.py"):
        if f.is_file():
            return f
    return None


def run_by(cmd: Command) -> str | None:
    """The file of RUN_BY that runs ``cmd`` (its words in order in one line there), else None."""
    where = RUN_BY.get(" ".join(cmd.words))
    if where is None:
        return None
    for line in (ROOT / where).read_text().splitlines():
        words = iter(shlex.split(line, comments=True))
        if all(w in words for w in cmd.words):  # a subsequence: extra options there (-q) are fine
            return where
    return None


def test_every_documented_command_runs_or_is_marked():
    cmds = documented_commands()
    assert len(cmds) > 30 and any(c.page == "README.md" for c in cmds)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    problems = []
    for cmd in cmds:
        if cmd.needs - NEEDS:
            problems.append(f"{cmd}: unknown needs {sorted(cmd.needs - NEEDS)} (one of {sorted(NEEDS)})")
        if not cmd.needs and run_by(cmd) is None:
            problems.append(f"{cmd}: runs in no test; mark its block <!-- needs: data | gpu | long --> or run it")
        prog = cmd.words[0]
        if cmd.entry is None and prog not in (".", "pip", "sbatch", "python3", *EXTERNAL):
            problems.append(f"{cmd}: unknown program {prog!r}")
        if prog == "pip":  # pip install -e ".[extra,...]": the extras exist
            for spec in (w for w in cmd.words if w.startswith(".[")):
                missing = set(spec[2:-1].split(",")) - set(extras)
                problems += [f"{cmd}: no extra {sorted(missing)} in pyproject.toml"] if missing else []
        if cmd.entry and cmd.entry[0] == "script" and not (ROOT / cmd.entry[1]).is_file():
            problems.append(f"{cmd}: no script {cmd.entry[1]}")
        if cmd.entry and cmd.entry[0] == "module" and module_file(cmd.entry[1]) is None:
            top = cmd.entry[1].split(".")[0]  # another project's module (venv, pytest) is fine where it imports
            if (ROOT / top).is_dir() or importlib.util.find_spec(top) is None:
                problems.append(f"{cmd}: no module {cmd.entry[1]}")
        for word in cmd.words:  # configs and scripts of this repository the command reads
            path = word.split("=", 1)[-1]
            if re.fullmatch(r"(recipes|benchmarks|data_tools|medssl)/[\w/.-]+\.(py|yaml|yml)", path) \
                    and not (ROOT / path).is_file():
                problems.append(f"{cmd}: no file {path}")
    assert not problems, "\n".join(problems)


HELP = """
import contextlib, io, json, runpy, sys
out = {}
for kind, name, sub in json.loads(sys.argv[1]):
    buf = io.StringIO()
    sys.argv = [name, *([sub] if sub else []), "--help"]
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            run = runpy.run_module if kind == "module" else runpy.run_path
            run(name, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code or 0
        except BaseException as e:
            code = repr(e)
    out[f"{name} {sub or ''}".strip()] = [code, buf.getvalue()]
print(json.dumps(out))
"""


def test_documented_entry_points_answer_help_with_the_options_they_are_shown_with():
    """One process runs ``--help`` of every repository entry point the docs show (and of the subcommand shown);
    every long option a command is shown with appears in that help: an option that was renamed fails here."""
    cmds = [c for c in documented_commands() if c.entry and (c.entry[0] == "script" or module_file(c.entry[1]))]
    jobs = {}
    for c in cmds:
        sub = c.args[0] if c.args and re.fullmatch(r"[a-z][a-z-]+", c.args[0]) else None
        jobs[(c.entry[0], c.entry[1], None)] = jobs[(c.entry[0], c.entry[1], sub)] = None
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", HELP, json.dumps(list(jobs))], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    helps = json.loads(proc.stdout.strip().splitlines()[-1])
    problems = [f"{k} --help: {code} {text[-500:]}" for k, (code, text) in helps.items() if code != 0]
    for c in cmds:
        sub = c.args[0] if c.args and re.fullmatch(r"[a-z][a-z-]+", c.args[0]) else None
        text = helps[c.entry[1]][1] + (helps.get(f"{c.entry[1]} {sub}", [0, ""])[1] if sub else "")
        args = c.args[:c.args.index("--")] if "--" in c.args else c.args  # after "--": another program's options
        for opt in (a.split("=")[0] for a in args if a.startswith("--")):
            if not re.search(re.escape(opt) + r"\b", text):
                problems.append(f"{c}: {opt} is not in the --help of {c.entry[1]} {sub or ''}")
    assert not problems, "\n".join(problems)


def test_rendered_sections_rerender_byte_for_byte(monkeypatch):
    """Each page's rendered section is what render_readme writes from the result files it names."""
    from benchmarks.render_readme import TARGETS, render_file

    monkeypatch.chdir(ROOT)  # the sections name their result files from the repository root
    for section, target in TARGETS.items():
        text = (ROOT / target).read_text()
        body = text.split(f"<!-- {section}:begin -->\n")[1].split(f"<!-- {section}:end -->")[0]
        if section == "speed":  # one part per result file, each opening with its file and "measured"
            sources = re.findall(r"^`(benchmarks/results/[^`]+\.json)`: measured", body, re.M)
        else:
            sources = [re.match(r"`([^`]+\.json)`", body).group(1)]
        assert sources and "\n".join(render_file(Path(s), section) for s in sources) == body, (section, target)


def test_site_builds_with_warnings_as_errors(tmp_path):
    """``mkdocs build --strict``: a broken link, a missing page or a docstring griffe cannot read fails."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip('mkdocs / mkdocstrings not installed (pip install -e ".[docs]")')
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("load_backbone") > 1
    assert (tmp_path / "site" / "benchmarks" / "results" / "medmask" / "froc.png").is_file()


def test_readme_stays_a_newcomers_page():
    """At most ~150 lines, opening with the two commands CI runs (install + demo, then the tests)."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    first = [c for c in documented_commands() if c.page == "README.md"][:5]
    assert [" ".join(c.words) for c in first] == [
        "python3 -m venv .venv", ". .venv/bin/activate", "pip install -e .[all]",
        "python recipes/medmask_detect.py --dataset demo", ". .venv/bin/activate"]
    assert text.index("```bash") < text.index("## What medssl is")
