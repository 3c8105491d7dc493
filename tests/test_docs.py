"""The docs are tested: every command line in a ```bash block of README.md and docs/*.md composes and passes the
schema checks (nothing trains), so a renamed key or option breaks CI instead of a reader. The config tools
(`ptm ls`, `ptm cat`, `ptm validate`, `ptm --version`) are checked here too."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ptmcli import runs
from ptmcli.cli import CONFIG_TOOLS, main, parse_run_args
from ptmcli.compose import COMMANDS, checked, parse
from ptmcli.configtools import invocation_of
from ptmcli.errors import PtmError
from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def runnable_lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, ptm arguments) of each ptm command in the file's ```bash blocks."""
    found, in_bash = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_bash = not in_bash and line.strip() == "```bash"
            continue
        if not in_bash:
            continue
        line = line.replace("<ts>", "2026-01-01_00-00-00")  # the timestamp a run directory gets
        words = shlex.split(re.sub(r"<[^>]*>", "x", line.replace('"$(', "").replace(')"', "")), comments=True)
        for start, word in enumerate(words):
            if word in ("ptm", "ptmcli") and (start == 0 or words[start - 1] in ("-m", "eval")):
                found.append((number, words[start + 1 :]))
                break
    return found


def check_command(args: list[str]) -> None:
    """What running `ptm ARGS` would check before doing anything: composition and schema, or argument names."""
    name, rest = (args[0], args[1:]) if args else ("", [])
    if name in ("--help", "-h", "--version") or "--help" in rest or "--shell-completion" in rest:
        return
    if name in COMMANDS:
        checked(parse(name, rest))
    elif name in ("cat", "validate"):
        checked(invocation_of(rest))
    elif name == "prepare":
        checked(parse("pretrain", [a for a in rest if not a.startswith("output=")]))
    elif name == "runs":
        runs.parse_args(rest[1:] if rest[:1] == ["compare"] else rest)
    elif name not in CONFIG_TOOLS:
        parse_run_args(name, rest)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_command_in_the_docs_parses(path):
    lines = runnable_lines(path)
    problems = []
    for number, args in lines:
        try:
            check_command(args)
        except PtmError as err:
            problems.append(f"{path.name}:{number}: ptm {' '.join(args)}\n    {err}")
    assert not problems, "\n".join(problems)


def test_the_docs_have_runnable_commands_and_the_readme_stays_short():
    counts = {p.name: len(runnable_lines(p)) for p in DOCS}
    assert counts["README.md"] >= 8 and sum(counts.values()) >= 60, counts
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
    links = re.findall(r"\]\((docs/[^)#]+)", (ROOT / "README.md").read_text())
    assert links and all((ROOT / link).exists() for link in links), links
    # a guide emptied by mistake (docs/interop.md was, by commit 67a8550) still "exists"
    assert all(len((ROOT / link).read_text()) > 1000 for link in links), links


def test_a_broken_doc_line_is_caught():
    with pytest.raises(PtmError, match="Did you mean 'max_steps'"):
        check_command(["pretrain", "conf=demo", "trainer.max_stpes=3"])
    with pytest.raises(PtmError, match="unexpected argument 'splt=test'"):
        check_command(["evaluate", "run=x", "splt=test"])


def test_ls_cat_validate_and_version(capsys, tmp_path):
    main(["ls"])
    out = capsys.readouterr().out
    assert "recipes (ptm pretrain conf=NAME)" in out and "news-cls" in out and "lora" in out
    main(["cat", "conf=demo", "trainer.max_steps=7"])
    out = capsys.readouterr().out
    assert "  max_steps: 7  # optimizer steps to train for" in out and "family: bert" in out
    main(["cat", "task=ner"])
    assert "kind: token-cls" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main(["validate", "conf=demo", "data=files", f"data.source={tmp_path / 'none.txt'}"])
    assert stop.value.code == 2 and "none.txt' does not exist" in capsys.readouterr().err
    main(["validate", "task=news-cls", "trainer.max_steps=3"])
    err = capsys.readouterr().err
    assert "ok ptm finetune" in err and "1,691 / 209 / 188 train/val/test" in err
    main(["--version"])
    assert re.fullmatch(r"ptm \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)
