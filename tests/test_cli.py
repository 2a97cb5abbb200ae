import subprocess
import sys

import sapo
from sapo.cli import main


def test_help_and_version(capsys):
    assert main([]) == 0
    assert "SAPO" in capsys.readouterr().out
    try:
        main(["--version"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert sapo.__version__ in capsys.readouterr().out


def test_losses_lists_every_registered_name():
    out = subprocess.run([sys.executable, "-m", "sapo", "losses"], capture_output=True, text=True, check=True).stdout
    for name in sapo.available_policy_losses() + sapo.available_aggregations():
        assert name in out
