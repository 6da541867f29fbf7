"""README.md and docs/ stay true to the code: links resolve, every config key and CLI flag they name
exists, and the README's tour runs as written.

A fenced block in README.md preceded by the line `<!-- readme-test: run -->` is run line by line,
as written, in a scratch folder that mirrors the repository root (a symlink to each top-level
file), so the commands see what a fresh clone has and write nothing into the checkout.
"""
import os
import re
import subprocess
import sys

import pytest

from config import Config, all_keys
from conftest import ROOT

README = os.path.join(ROOT, "README.md")
DOCS_DIR = os.path.join(ROOT, "docs")
PAGES = [README] + sorted(os.path.join(DOCS_DIR, name) for name in os.listdir(DOCS_DIR) if name.endswith(".md"))
RUN_MARKER = "<!-- readme-test: run -->"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CONFIG_KEY = re.compile(r"(?:--|`)((?:data|model|train|eval)\.[a-z_]+)\b")
SCRIPT_LINE = re.compile(r"^\s*python ([a-z_]+\.py)(?: ([a-z][a-z0-9-]*))?(.*)$")


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def code_lines(text):
    """Lines inside fenced blocks and four-space-indented blocks (where commands are written)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced or line.startswith("    "):
            lines.append(line)
    return lines


def marked_commands(text):
    """The lines of every fenced block right after RUN_MARKER, in order."""
    commands, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == RUN_MARKER:
            assert lines[i + 1].startswith("```"), f"README.md:{i + 2}: {RUN_MARKER} must precede a fenced block"
            end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
            commands += [c for c in lines[i + 2:end] if c.strip() and not c.lstrip().startswith("#")]
    return commands


def heading_anchors(text):
    """GitHub's anchors: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in text.splitlines() if line.startswith("#") and not line.startswith("#!")}


def page_name(path):
    return os.path.relpath(path, ROOT)


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_relative_links_point_to_existing_files_and_headings(page):
    for target in LINK.findall(read(page)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not a file of the repository
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        assert os.path.isfile(resolved), f"{page_name(page)}: link {target!r}: no file {page_name(resolved)}"
        if anchor:
            assert anchor in heading_anchors(read(resolved)), \
                f"{page_name(page)}: link {target!r}: {page_name(resolved)} has no heading #{anchor}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {os.path.normpath(os.path.join(ROOT, t.partition("#")[0])) for t in LINK.findall(read(README))}
    assert [page_name(p) for p in PAGES[1:] if p not in linked] == []


def test_readme_stays_a_front_door():
    assert len(read(README).splitlines()) < 180


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_every_config_key_named_exists(page):
    keys, known = set(CONFIG_KEY.findall(read(page))), set(all_keys(Config()))
    files = {name for name in os.listdir(ROOT)}  # `train.py` is a file, not a key
    unknown = sorted(k for k in keys - known if k not in files)
    assert unknown == [], f"{page_name(page)} names config keys that config.Config lacks: {unknown}"


def test_the_config_key_pattern_finds_the_readme_keys():
    assert {"data.dir", "data.image_size", "train.epochs", "model.base_channels"} <= set(CONFIG_KEY.findall(read(README)))


def help_text(script, command=None):
    args = [sys.executable, script] + ([command] if command else []) + ["--help"]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(args[1:])} exited {result.returncode}: {result.stderr[-2000:]}"
    return result.stdout


def test_every_flag_in_a_command_exists():
    """Each `--flag` (not a --section.key) on a `python X.py ...` line of the README or docs/ is one
    that X.py (or its sub-command) declares."""
    wanted = {}
    for page in PAGES:
        for line in code_lines(read(page)):
            match = SCRIPT_LINE.match(line)
            if not match:
                continue
            script, word, rest = match.groups()
            command = word if script == "prepare_data.py" else None
            flags = {f for f in re.findall(r"--[\w-]+(?:\.[\w]+)?", f"{word or ''}{rest}") if "." not in f}
            wanted.setdefault((script, command), set()).update(flags)
    assert ("evaluate.py", None) in wanted and ("prepare_data.py", "brats") in wanted
    for (script, command), flags in sorted(wanted.items(), key=str):
        declared = set(re.findall(r"--[\w-]+", help_text(script, command)))
        declared |= {"--no-" + f[2:] for f in declared}  # argparse.BooleanOptionalAction
        assert flags <= declared, f"{script} {command or ''}: {sorted(flags - declared)} not declared"


def test_readme_test_command_is_what_ci_runs():
    ci = [line.strip() for line in read(os.path.join(ROOT, ".ci", "run")).splitlines() if line.strip()]
    assert ci[-1] == "python -m pytest -q tests"
    setup = read(README).split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    assert any(line.rstrip().endswith("&& " + ci[-1]) or line.strip() == ci[-1] for line in code_lines(setup))


def scratch_checkout(folder):
    """A folder that looks like the repository root: a symlink to each top-level file and package, and a `python`
    on PATH that is this interpreter."""
    for name in os.listdir(ROOT):
        path = os.path.join(ROOT, name)
        is_package = os.path.isfile(os.path.join(path, "__init__.py"))  # the library's folders; not runs/ or data/
        if not name.startswith(".") and (os.path.isfile(path) or is_package):
            os.symlink(path, os.path.join(folder, name))
    bin_dir = os.path.join(folder, ".bin")
    os.makedirs(bin_dir)
    python = os.path.join(bin_dir, "python")
    with open(python, "w") as f:  # a wrapper, not a symlink: a venv's python finds its packages by its path
        f.write(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    os.chmod(python, 0o755)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}


def test_the_readme_tour_runs_as_written(tmp_path):
    commands = marked_commands(read(README))
    for needed in ("python main.py --help", "python evaluate.py --help", "python prepare_data.py --help"):
        assert needed in commands, f"the README's tested block lost {needed!r}"
    assert any(c.startswith("python main.py --data.dir") and "--train.epochs 1" in c for c in commands)
    env = scratch_checkout(str(tmp_path))
    for command in commands:
        result = subprocess.run(command, shell=True, executable="/bin/bash", cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"README command failed ({result.returncode}): {command}\n" \
                                       f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert os.path.isfile(tmp_path / "runs" / "tiny" / "best.pt")
    assert os.listdir(tmp_path / "runs" / "tiny" / "all" / "predictions")
