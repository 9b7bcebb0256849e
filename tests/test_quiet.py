"""What cprec keeps off the user's terminal (`cprec.quiet`): library warnings, switches read by
the libraries, and a library's own prints captured at the call that makes them."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import pytest

from cprec import quiet


def test_library_warnings_the_user_cannot_act_on_are_filtered():
    """DeepSpeed ZeRO-3 calls torch's deprecated collectives every step: filtered at start-up."""

    import torch
    import torch.distributed as torch_dist

    def caught(filtered: bool) -> list[str]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            if filtered:
                quiet.filter_library_warnings()
            warnings.warn("a FutureWarning of cprec's own still shows", FutureWarning, stacklevel=1)
            for collective in (torch_dist.reduce_scatter_tensor, torch_dist.all_gather_into_tensor):
                try:  # the deprecation warning comes before the missing process group's error
                    collective(torch.zeros(2), torch.zeros(2))
                except ValueError:
                    pass
        return [f"{w.category.__name__}: {w.message}" for w in seen]

    assert len(caught(filtered=False)) == 3
    assert caught(filtered=True) == ["FutureWarning: a FutureWarning of cprec's own still shows"]


def test_switches_are_set_at_start_up_unless_the_user_set_them(monkeypatch):
    for name, _, _ in quiet.LIBRARY_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "INFO")  # the user's own choice wins
    with warnings.catch_warnings():  # the filters it adds stay inside this test
        quiet.at_start_up()
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "INFO"
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"


def test_the_switches_reach_the_libraries():
    """A fresh process after start-up: transformers' bars and notes, MLflow's INFO lines are off."""
    code = (
        "from cprec import quiet; quiet.at_start_up()\n"
        "import logging, mlflow, transformers\n"
        "from transformers.utils import logging as tl\n"
        "print(tl.is_progress_bar_enabled(), tl.get_verbosity() == tl.ERROR,"
        " logging.getLogger('mlflow').getEffectiveLevel() == logging.WARNING)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in {n for n, _, _ in quiet.LIBRARY_SWITCHES}}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "True", "True"], out.stderr


def test_library_prints_go_to_the_log_at_debug(capsys, caplog):
    log = logging.getLogger("cprec.test")
    with caplog.at_level(logging.DEBUG, logger="cprec.test"):
        with quiet.library_prints(log, "lib"):
            print("Processing zero checkpoint 'x'")
            sys.stderr.write("bar:  50%\rbar: 100%\n")
            log.info("cprec's own line")
    assert capsys.readouterr() == ("", "")  # nothing reached the terminal
    got = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert got == [
        (logging.INFO, "cprec's own line"),
        (logging.DEBUG, "lib: Processing zero checkpoint 'x'"),
        (logging.DEBUG, "lib: bar: 100%"),  # a bar's last state only
    ]


def test_library_prints_of_a_failing_call_are_warnings(caplog):
    log = logging.getLogger("cprec.test")
    with caplog.at_level(logging.DEBUG, logger="cprec.test"), pytest.raises(RuntimeError, match="boom"):
        with quiet.library_prints(log, "lib"):
            print("what led to it")
            raise RuntimeError("boom")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.WARNING, "lib: what led to it")]
