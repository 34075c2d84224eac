"""The course installs and tests itself: pyproject, environment.yml, README and CI agree."""

import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"pytorch": "torch"}  # conda-forge name → PyPI name


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[ ;]", spec.strip(), maxsplit=1)[0].lower()


def pyproject_names() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + project["optional-dependencies"]["test"]
    return {requirement_name(s) for s in specs}


def environment_yml():
    """(conda dependency names, pip lines, channels) of environment.yml, read without PyYAML."""
    names, pip_lines, channels, section = set(), [], [], None
    for line in (ROOT / "environment.yml").read_text().splitlines():
        stripped = line.split("#")[0].rstrip()
        if not stripped.strip():
            continue
        if not line.startswith(" "):
            section = stripped.rstrip(":").strip()
            continue
        item = stripped.strip().removeprefix("- ").strip()
        if section == "channels":
            channels.append(item)
        elif section == "dependencies":
            if item == "pip:":
                section = "pip"
            else:
                names.add(CONDA_NAMES.get(requirement_name(item), requirement_name(item)))
        elif section == "pip":
            pip_lines.append(item)
    return names - {"python", "pip"}, pip_lines, channels


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    names, pip_lines, channels = environment_yml()
    assert names == pyproject_names(), names ^ pyproject_names()
    assert channels == ["conda-forge"]
    assert pip_lines == ["-e .[test]"]


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    assert commands[0].startswith("pip install torch==2.13.0 && pip install -e . && minildm course --profile cpu")
    block = readme.split("<!-- test-command -->")[1].split("<!-- /test-command -->")[0]
    test_command = block.replace("```bash", "").replace("```", "").strip()
    assert test_command == commands[1] == 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest'
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install --quiet torch==2.13.0" in ci and "test-command" in ci
    extracted = subprocess.run(
        ["bash", "-c", "sed -n '/<!-- test-command -->/,/<!-- \\/test-command -->/p' README.md "
                       "| grep -v '^<!--' | grep -v '^```' | grep -v '^$'"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert extracted == test_command


def test_top_level_layout():
    for name in ("notebooks", "minildm", "data", "tests", "environment.yml", "README.md",
                 "pyproject.toml", ".ci/run", "LICENSE"):
        assert (ROOT / name).exists(), name


def test_notebooks_are_stored_without_outputs():
    import json

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        notebook = json.loads(path.read_text())
        for cell in notebook["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, path.name
        assert "widgets" not in notebook["metadata"], path.name


def test_reference_checkpoints_are_small_and_safetensors_only():
    total = 0
    for path in (ROOT / "data" / "checkpoints").rglob("*"):
        if path.is_file():
            assert path.suffix in (".safetensors", ".json"), f"{path}: safetensors and JSON only"
            total += path.stat().st_size
    # about 60 MB for stages 0-3; the experts stage ships five UNets in float32 (66 MB: the three
    # experts, the equal-cost baseline and the several-embeddings model); the ADD student 14 MB
    assert total < 160 * 2**20
