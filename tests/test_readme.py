"""The README's Python examples run as written (those that need ../shared are skipped)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(_python_blocks()) >= 3


def test_per_layer_examples_run(capsys):
    namespace: dict = {}
    ran = 0
    for block in _python_blocks():
        if "../shared" in block:
            continue  # the whole-network example: covered by the shared tests
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
        ran += 1
    assert ran >= 2
    # The documented outcome of the first example: the planted channels, error ~0.
    result = namespace["result"]
    assert result.kept.tolist() == [0, 1, 2, 3, 4, 5]
    assert result.rel_error < 1e-12
    assert namespace["same"].kept.tolist() == [0, 1, 2, 3, 4, 5]
    printed = capsys.readouterr().out
    assert "[0 1 2 3 4 5]" in printed


@pytest.mark.parametrize("command", ["chanprune demo", "python -m pytest -q"])
def test_readme_names_the_two_commands(command):
    assert command in README.read_text()


def test_main_job_command_installs_what_its_plot_needs():
    from _planted import pyproject

    # The README says the demo writes demo.png, which needs matplotlib: the `plot` extra.
    text = README.read_text()
    assert "demo.png" in text
    line = next(ln for ln in text.splitlines() if ln.rstrip().endswith("&& chanprune demo"))
    assert 'pip install -e ".[plot]"' in line
    project = pyproject()["project"]
    assert any(r.startswith("matplotlib") for r in project["optional-dependencies"]["plot"])
