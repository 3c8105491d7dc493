"""No flag or override ptm accepts can run code: Hydra's pickle rerun, callbacks, logging factories, search paths."""

from __future__ import annotations

import os
import pickle

import pytest

from ptmcli.cli import main
from tests.conftest import fails_with


class _Touch:
    """Unpickling this runs `touch PATH`: the payload a crafted rerun file would carry."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_experimental_rerun_never_unpickles(cache_env, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "config.pickle"
    evil.write_bytes(pickle.dumps(_Touch(marker)))
    message = fails_with(
        ["pretrain", "--experimental-rerun", str(evil)], cache_env, "'--experimental-rerun' is refused"
    )
    assert "hydra.run.dir" in message  # says what is accepted instead
    assert not marker.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["+hydra.callbacks.x._target_=builtins.exec", "+hydra.callbacks.x._args_=[\"open('{marker}','w')\"]"],
        ["++hydra.callbacks.x._target_=builtins.exec"],
        ["hydra.job_logging.handlers.x.()=builtins.exec"],
        ["+hydra.job_logging.root.level=INFO"],
        ["hydra.searchpath=[file://{tmp}]", "hydra/job_logging=evil"],
        ["--config-dir", "{tmp}"],
        ["-cd", "{tmp}"],
        ["--config-path", "{tmp}"],
        ["--config-name", "evil"],
        ["~hydra.run.dir"],
        ["+hydra/launcher=evil"],
        ["--cfg", "evil"],
        ["--frobnicate"],
    ],
)
def test_hydra_flags_and_keys_outside_the_allow_list_are_refused(args, tmp_path, capsys):
    marker = tmp_path / "pwned"
    (tmp_path / "hydra" / "job_logging").mkdir(parents=True)
    (tmp_path / "hydra" / "job_logging" / "evil.yaml").write_text("version: 1\nroot:\n  handlers: []\n")
    args = [a.format(marker=marker, tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", *args, f"hydra.run.dir={tmp_path / 'run'}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "refused" in err or "use --cfg" in err, err
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_allowed_hydra_choices_still_compose(cache_env):
    from tests.conftest import run_ptm

    out = run_ptm(["pretrain", "hydra/launcher=basic", "hydra/sweeper=basic", "--cfg", "hydra"], cache_env).stdout
    assert "BasicLauncher" in out and "BasicSweeper" in out
