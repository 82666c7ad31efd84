"""The README's commands and the examples' docstring commands, run as written: the command
line's own parser and code (in this process, to spare a start-up per command), with small
step counts passed through the documented options. Commands that need a data set on disk
(``--data-dir``) are run against an empty folder and must stop with one ``error:`` line that
names the missing data."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from contrastive import cli

ROOT = Path(__file__).resolve().parents[1]

#: Small budgets through each command's documented options (appended: the last one wins; the
#: linear probe, most of a 2-step cell's time, is left to ``eval``).
SMALL = {
    "compare": ["--steps", "2", "--seeds", "0", "--no-progress", "--set",
                "train.final_probe=false"],
    "train": ["--steps", "3", "--no-progress", "--set", "final_probe=false"],
    "eval": ["--no-progress"],
    "mi-bench": ["--steps-per-level", "2", "--no-progress"],
    "reproduce": ["--steps", "3", "--no-progress"],
    "list": [],
}


def _commands(text: str) -> list[list[str]]:
    """The ``contrastive ...`` and ``python examples/...`` lines of the bash blocks, with line
    continuations joined and comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["contrastive"] or words[:2] == ["python", "examples/"
                                                              "retrieval_benchmark.py"]:
                out.append(words)
    return out


def _localise(words: list[str], data: Path) -> list[str]:
    """Repository paths made absolute (the commands run in a scratch folder); ``~/data`` and
    ``~/weights`` point at an empty folder."""
    out = []
    for w in words:
        if w.startswith("examples/"):
            w = str(ROOT / w)
        w = w.replace("~/data", str(data)).replace("~/weights", str(data))
        out.append(w)
    return out


def _example_main():
    spec = importlib.util.spec_from_file_location("retrieval_benchmark",
                                                  ROOT / "examples/retrieval_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _run(words: list[str], capsys) -> tuple[int, str]:
    if words[0] == "python":
        code = _example_main()(words[2:])
    else:
        code = cli.main(words[1:])
    return code, capsys.readouterr().err


def _check(words: list[str], tmp_path: Path, capsys) -> None:
    data = tmp_path / "no-data"
    data.mkdir(exist_ok=True)
    cmd = _localise(words, data)
    if "--data-dir" in words:  # needs a data set on disk: a one-line error naming it
        code, err = _run(cmd, capsys)
        lines = [s for s in err.strip().splitlines() if s.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (cmd, err)
        assert str(data) in lines[0], lines[0]
        return
    if cmd[0] == "python":
        extra = ["--steps", "2", "--seeds", "0", "--output", str(tmp_path / "rb")]
    else:
        extra = list(SMALL[cmd[1]])  # outputs go to the scratch folder, the working folder
    code, err = _run(cmd + extra, capsys)
    assert code == 0, (cmd + extra, err)


@pytest.fixture(autouse=True)
def _keep_threads():
    """The command line sets torch's thread count; give the test process its own back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_readme_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative --output folders land here
    commands = _commands((ROOT / "README.md").read_text())
    kinds = {w[1] for w in commands if w[0] == "contrastive"}
    assert {"compare", "train", "eval", "mi-bench", "reproduce", "list"} <= kinds
    for words in commands:
        _check(words, tmp_path, capsys)
    # the train example config really ran: its checkpoint is what `eval` read
    assert (tmp_path / "runs/nce/eval/eval.json").is_file()
    assert (tmp_path / "runs/compare_example/results.json").is_file()


def test_example_docstring_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    doc = (ROOT / "examples/retrieval_benchmark.py").read_text().split('"""')[1]
    commands = _commands("```bash\n" + doc.replace("    python", "python") + "```")
    assert len(commands) == 2
    for words in commands:
        _check(words, tmp_path, capsys)


@pytest.mark.parametrize("name", ["train.yaml", "compare.yaml"])
def test_example_configs_are_mentioned_in_the_readme(name):
    assert f"examples/configs/{name}" in (ROOT / "README.md").read_text()
