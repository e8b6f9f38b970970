"""The install side: known-broken library sets fail in one line, and `patchforge --help` needs no torch."""
import subprocess
import sys

import pytest

from patchforge import cli, compat
from patchforge.errors import PatchforgeError


def _fake_versions(monkeypatch, versions):
    real = compat.metadata.version

    def version(name):
        return versions[name] if name in versions else real(name)

    monkeypatch.setattr(compat.metadata, "version", version)


def test_broken_combination_is_one_line_naming_versions_and_fix(monkeypatch, capsys):
    _fake_versions(monkeypatch, {"transformers": "5.24.0", "peft": "0.21.2"})
    with pytest.raises(PatchforgeError) as err:
        compat.check_installed_stack()
    message = str(err.value)
    assert "\n" not in message
    assert "transformers 5.24.0" in message and "peft 0.21.2" in message and "pip install" in message
    # the CLI reports it before any verb runs, as one line, exit 2
    assert cli.main(["merge", "nothing.safetensors", "-o", "out.safetensors"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("versions", [
    {"transformers": "5.23.0", "peft": "0.21.2"},
    {"transformers": "5.24.0", "peft": "0.22.0"},
    {"transformers": "5.24.0.dev0", "peft": "0.22.0rc1"},
    {"transformers": "4.57.1", "peft": "0.15.0"},
])
def test_good_combinations_pass(monkeypatch, versions):
    _fake_versions(monkeypatch, versions)
    assert compat.incompatibilities() == []


def test_help_and_argument_errors_come_before_heavy_imports():
    code = ("import sys\nfrom patchforge import cli\n"
            "for argv in (['--help'], ['train', '--steps', '0'], ['generate', 'x', '--weight', 'nan']):\n"
            "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
            "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout
    assert "--steps: 0 must be at least 1" in out.stderr and "'nan' is not a finite number" in out.stderr


@pytest.mark.parametrize("argv", [["train", "--batch", "0"], ["train", "--rank", "-1"], ["train", "--lr", "nan"],
                                  ["train", "--lr", "0"], ["generate", "x", "--guidance", "inf"],
                                  ["merge", "a", "-o", "b", "--weights", "nan"]])
def test_absurd_numbers_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert "error: argument" in capsys.readouterr().err
