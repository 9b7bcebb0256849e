import os
import subprocess
import sys

from cprec.cli import COMMANDS, build_parser


def test_help_lists_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "cprec.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("prepare", "train", "eval", "export", "study", "demo"):
        assert name in out
    assert set(COMMANDS) == {"prepare", "train", "eval", "embed", "export", "study", "demo"}


def test_subcommand_help():
    for name in COMMANDS:
        out = subprocess.run(
            [sys.executable, "-m", "cprec.cli", name, "--help"], capture_output=True, text=True, check=True
        ).stdout
        assert "usage: cprec " + name in out


def test_config_error_is_one_clear_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 0.1\n")
    r = subprocess.run(
        [sys.executable, "-m", "cprec.cli", "prepare", str(cfg), "trian.lr=3"], capture_output=True, text=True
    )
    assert r.returncode == 2
    assert "unknown config key 'trian'" in r.stderr and "Traceback" not in r.stderr


def test_parser_overrides():
    args = build_parser().parse_args(["train", "c.yaml", "train.lr=1", "train.seed=2"])
    assert args.overrides == ["train.lr=1", "train.seed=2"]


def test_check_validates_the_config_and_runs_nothing(tmp_path):
    from cprec.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"train:\n  output_dir: {tmp_path / 'run'}\n")
    assert main(["train", "--check", str(cfg), "train.lr=1e-4"]) == 0
    assert not (tmp_path / "run").exists()  # nothing was started
    assert main(["train", "--check", str(cfg), "train.lrr=1"]) == 2


def test_config_error_is_printed_by_rank_0_only(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 0.1\n")
    for rank, printed in (("0", 1), ("1", 0)):
        r = subprocess.run(
            [sys.executable, "-m", "cprec.cli", "train", str(cfg), "train.lrr=3"],
            capture_output=True,
            text=True,
            env={**os.environ, "RANK": rank, "WORLD_SIZE": "2"},
        )
        assert r.returncode == 2
        assert r.stderr.count("unknown config key 'train.lrr'") == printed, r.stderr
