"""Packaging: the lazy `slq-hf` parser, what a wheel ships, and the CI scripts that test installs and versions."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
from pathlib import Path

import pytest

from slq_hf import cli

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def full_parser_summaries() -> dict[str, str]:
    """name -> help as the command modules register it (every module imported: the simple, eager path)."""
    parser = cli.build_parser()
    subparsers = parser._subparsers._group_actions[0]
    return {action.dest: action.help for action in subparsers._choices_actions}


def test_listing_equals_the_full_parsers():
    """The summaries read from source without importing equal what each module's add_parser registers."""
    eager = full_parser_summaries()
    assert list(eager) == list(cli.COMMANDS)
    for name in cli.COMMANDS:
        assert cli.command_summary(name) == eager[name], name
        assert eager[name], f"command {name} registers no help= text"


def test_lazy_listing_shows_every_command():
    text = cli.build_parser([]).format_help()
    for name in cli.COMMANDS:
        assert name in text
        assert cli.command_summary(name).split()[0] in text


PROBE = """
import sys
from slq_hf.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print("MODULES", " ".join(sorted(m for m in sys.modules if m.startswith("slq_hf.commands."))))
print("TORCH", "torch" in sys.modules)
"""


def probe(argv: list[str]) -> tuple[str, set[str], bool]:
    done = run_python(PROBE.format(argv=argv))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    modules = set(lines[-2].split()[1:])
    return "\n".join(lines[:-2]), modules, lines[-1] == "TORCH True"


def test_top_level_help_imports_no_command_module():
    text, modules, _ = probe(["--help"])
    assert "usage: slq-hf" in text and "export" in text
    assert not modules, modules


@pytest.mark.parametrize("name", ["export", "train"])
def test_command_help_imports_only_its_module(name):
    text, modules, _ = probe([name, "--help"])
    assert f"usage: slq-hf {name}" in text
    assert cli.COMMANDS[name] in modules
    assert not modules & (set(cli.COMMANDS.values()) - {cli.COMMANDS[name]}), modules


def test_top_level_help_imports_no_torch():
    _, _, torch_loaded = probe(["--help"])
    assert not torch_loaded


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: slq-hf" in capsys.readouterr().out


def test_unknown_command_names_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["trian"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'trian'" in err and "train" in err


def test_options_before_the_command_are_not_taken_for_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["-h", "export"])
    assert exit_info.value.code == 0
    assert "usage: slq-hf [-h] COMMAND" in capsys.readouterr().out


def test_missing_command_module_names_the_command(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "ghost", "slq_hf.commands.no_such_module")
    cli.command_summary.cache_clear()
    try:
        with pytest.raises(ModuleNotFoundError, match="'ghost'.*slq_hf.commands.no_such_module"):
            cli.build_parser([])
    finally:
        cli.command_summary.cache_clear()


def test_docstring_summary_when_no_literal_help(tmp_path, monkeypatch):
    """A command whose add_parser has no literal help= string is listed with its docstring's first line."""
    package = tmp_path / "slq_extra_cmds"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "hello.py").write_text('"""`slq-hf hello`: say hello."""\nHELP = "x"\n\n'
                                      "def add_parser(subparsers):\n"
                                      '    return subparsers.add_parser("hello", help=HELP)\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "hello", "slq_extra_cmds.hello")
    cli.command_summary.cache_clear()
    try:
        assert cli.command_summary("hello") == "say hello."
    finally:
        cli.command_summary.cache_clear()


def package_data_patterns() -> list[str]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config["tool"]["setuptools"]["package-data"]["*"]


def test_every_non_python_package_file_is_package_data():
    """A wheel holds only .py files plus package-data: a data file the package reads must match a pattern."""
    tracked = subprocess.run(["git", "ls-files", "slq_hf"], capture_output=True, text=True, cwd=ROOT)
    if tracked.returncode != 0:
        pytest.skip(f"not a git checkout: {tracked.stderr.strip()}")
    patterns = package_data_patterns()
    data_files = [Path(p) for p in tracked.stdout.split() if not p.endswith(".py")]
    missing = [str(p) for p in data_files if not any(fnmatch.fnmatch(p.name, pat) for pat in patterns)]
    assert not missing, f"add a [tool.setuptools.package-data] pattern for {missing}"


def test_ci_scripts_take_the_torch_pins_from_the_makefile():
    """One place for the torch pins: the CI venvs install exactly the Makefile's TORCH line."""
    makefile = (ROOT / "Makefile").read_text()
    pins = next(line.split(":=", 1)[1].split() for line in makefile.splitlines() if line.startswith("TORCH"))
    assert pins and all("==" in pin for pin in pins)
    for script in (ROOT / ".ci").glob("*.sh"):
        text = script.read_text()
        assert "torch==" not in text, f"{script.name} pins torch itself instead of reading the Makefile"


WARNING_CASES = '''
import logging
import warnings

import pytest


def test_future_deprecation():
    warnings.warn("`past_key_values` is deprecated and will be removed in version 9.0", FutureWarning)


def test_logged_deprecation():
    logging.getLogger("transformers.utils.generic").warning("`x` is deprecated. Use `y` instead.")


@pytest.mark.allow_deprecation_log("another library's notice")
def test_logged_deprecation_allowed():
    logging.getLogger("transformers.utils.generic").warning("`x` is deprecated. Use `y` instead.")


def test_other_future_warning():
    warnings.warn("results may differ on GPU", FutureWarning)


def test_third_party_deprecation():
    warnings.warn_explicit("old API is deprecated", DeprecationWarning, "lib.py", 1, module="somelib")


def test_our_deprecation():
    warnings.warn_explicit("old API is deprecated", DeprecationWarning, "x.py", 1, module="slq_hf.modeling.x")


def test_other_log():
    logging.getLogger("transformers").warning("Loading weights")


def test_environment_notice():
    logging.getLogger("transformers.image_utils").warning("Image decoding with `torchvision` is deprecated")
'''


def test_suite_fails_on_deprecations_on_our_paths(pytester):
    """pyproject's filterwarnings + conftest's log check: which warnings fail a test and which do not."""
    pytester.makepyprojecttoml((ROOT / "pyproject.toml").read_text())
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makepyfile(test_cases=WARNING_CASES)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    outcomes = {name: status for status, name in
                (line.split(" ", 1) for line in result.outlines if line.startswith(("PASSED", "FAILED")))}
    outcomes = {name.split("::")[-1].split(" ")[0]: status for name, status in outcomes.items()}
    assert outcomes == {
        "test_future_deprecation": "FAILED", "test_logged_deprecation": "FAILED",
        "test_logged_deprecation_allowed": "PASSED", "test_other_future_warning": "PASSED",
        "test_third_party_deprecation": "PASSED", "test_our_deprecation": "FAILED", "test_other_log": "PASSED",
        "test_environment_notice": "PASSED",
    }, result.outlines


def test_cli_quiets_the_bitsandbytes_kernel_notice():
    """bitsandbytes warns at import on CPUs where it looks for an optional kernel; `slq-hf` runs stay quiet."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (quantization extra)")
    plain = run_python("import bitsandbytes")
    if "gemm_4bit_forward" not in plain.stderr:
        pytest.skip("this machine's bitsandbytes prints no kernel notice at import (nothing to quiet)")
    through_cli = run_python("from slq_hf.cli import main\n"
                             "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
                             "import bitsandbytes")
    assert through_cli.returncode == 0, through_cli.stderr
    assert "gemm_4bit_forward" not in through_cli.stderr


@pytest.mark.parametrize("imports", [
    "import slq_hf, transformers", "import transformers, slq_hf", "from slq_hf import SLQModel",
    "import slq_hf.modeling.modeling_slq", "from slq_hf.modeling.configuration_slq import SLQConfig",
    "import slq_hf.cli; import transformers",
])
def test_slq_registers_with_auto_classes_in_every_import_order(imports):
    # `import slq_hf` no longer imports transformers; the "slq" model type must still be known to AutoConfig and
    # AutoModel by the time either is usable, however the user's imports are ordered (slq_hf.modeling imports
    # transformers itself, which must not re-enter the half-imported package).
    code = (f"{imports}\n"
            "from transformers import AutoConfig, AutoModel\n"
            "config = AutoConfig.for_model('slq')\n"
            "assert type(config).__name__ == 'SLQConfig', type(config)\n"
            "assert AutoModel._model_mapping[type(config)].__name__ == 'SLQModel'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
