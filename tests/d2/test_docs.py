"""The commands the documentation shows still parse, and what they name exists.

Every ``python tools/X.py ...`` line in README.md, MODEL_CARD.md and docs/*.md (with its ``\\``
continuations) is parsed by that tool's own argument parser; every config file, tool and document
it or a Markdown link names must exist; every tool answers ``--help``.
"""
import glob
import os
import re
import shlex
import sys

import pytest

from tests.helpers import ROOT

DOCS = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "MODEL_CARD.md"),
        *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
TOOLS = ["train_net", "predict", "export_onnx", "benchmark", "pretrain_backbone", "convert_checkpoint",
         "convert_dataset"]
sys.path.insert(0, os.path.join(ROOT, "tools"))


def _parser(tool: str):
    module = __import__(tool)
    if tool == "train_net":
        return module.argument_parser().parse_args
    return module.parse_args


def documented_commands():
    """(document, line number, argv) of each ``python tools/X.py`` command in the docs."""
    found = []
    for path in DOCS:
        lines = open(path).read().split("\n")
        i = 0
        while i < len(lines):
            start, text = i, lines[i]
            while text.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            m = re.search(r"python (tools/\w+\.py)(.*)", text)
            if not m:
                continue
            rest = m.group(2).split(" #")[0].split("`")[0]  # drop a trailing comment / inline-code end
            found.append((os.path.relpath(path, ROOT), start + 1, m.group(1), shlex.split(rest)))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_commands_of_every_tool():
    shown = {tool for _, _, tool, _ in COMMANDS}
    assert {f"tools/{t}.py" for t in ("train_net", "predict", "export_onnx", "benchmark")} <= shown
    assert len(COMMANDS) > 30


@pytest.mark.parametrize("doc,line,tool,argv", COMMANDS, ids=[f"{d}:{n}" for d, n, _, _ in COMMANDS])
def test_documented_command_parses_and_names_existing_configs(doc, line, tool, argv):
    assert os.path.isfile(os.path.join(ROOT, tool)), f"{doc}:{line} names {tool}, which does not exist"
    name = os.path.basename(tool)[:-3]
    args = [a for a in argv if not a.startswith(("OMP_", "CUDA_"))]
    try:
        _parser(name)(args)
    except SystemExit as e:
        pytest.fail(f"{doc}:{line}: `python {tool} {' '.join(argv)}` does not parse (exit {e.code})")
    for a in argv:
        for token in a.split("="):
            if token.startswith("configs/") and token.endswith((".py", ".yaml")):
                assert os.path.isfile(os.path.join(ROOT, token)), f"{doc}:{line} names {token}, which does not exist"


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_answers_help(tool, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parser(tool)(["--help"])
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out


def test_links_and_named_files_in_the_docs_exist():
    missing = []
    for path in DOCS:
        text = open(path).read()
        folder = os.path.dirname(path)
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if target.startswith(("http://", "https://")):
                continue
            if not os.path.exists(os.path.normpath(os.path.join(folder, target))):
                missing.append(f"{os.path.relpath(path, ROOT)}: link {target}")
        for named in set(re.findall(r"`((?:configs|tools|docs|weights)/[\w./-]+\.(?:py|yaml|md|sh|pth|json))`", text)):
            if not os.path.exists(os.path.join(ROOT, named)):
                missing.append(f"{os.path.relpath(path, ROOT)}: {named}")
    assert not missing, "\n".join(missing)


def test_the_check_sees_a_broken_command():
    """Negative control: a flag the tool lacks and a config that does not exist are caught."""
    with pytest.raises(SystemExit):
        _parser("predict")(["--config-file", "x.py", "--weights", "w.pth", "--input", "a", "--no-such-flag"])
    assert not os.path.isfile(os.path.join(ROOT, "configs/no_such.py"))
