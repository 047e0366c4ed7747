"""launcher/gpu_check.sh, the prepared GPU check: its commands still parse and dry-run without a GPU.

The script only runs on a machine with a GPU, which few sessions get; a renamed
flag, preset or file would otherwise show up there, as a wasted GPU run.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launcher" / "gpu_check.sh"


def script_commands() -> list[list[str]]:
    """The script's command lines (continuations joined, ``|| fallback`` dropped), split as bash would."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    lines = (line.split(" || ")[0].strip() for line in text.splitlines())
    return [shlex.split(line) for line in lines if line and not line.startswith("#")]


def command(*prefix: str) -> list[str]:
    """The arguments of the one line that starts with ``prefix``."""
    found = [c[len(prefix):] for c in script_commands() if tuple(c[: len(prefix)]) == prefix]
    assert len(found) == 1, f"gpu_check.sh has {len(found)} lines starting with {' '.join(prefix)!r}"
    return found[0]


def test_script_is_valid_bash():
    p = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_gpu_tests_it_selects_exist():
    args = command("python", "-m", "pytest")
    files = args[args.index("gpu") + 1:]
    assert args[args.index("gpu") - 1] == "-m" and files, args
    for name in files:
        assert re.search(r"pytest\.mark\.gpu\b|mark\.gpu\b", (REPO / name).read_text()), f"no gpu-marked test in {name}"


def test_benchmark_flags_exist():
    args = command("python", "benchmarks/bench_model.py")
    source = (REPO / "benchmarks" / "bench_model.py").read_text()
    declared = set(re.findall(r'add_argument\("(--[a-z-]+)"', source))
    used = {a for a in args if a.startswith("--")}
    assert used and used <= declared, f"gpu_check.sh passes {sorted(used - declared)} to bench_model.py"
    from albor.model import PRESETS

    assert args[args.index("--preset") + 1] in PRESETS


def test_prepare_then_pretrain_dry_run(tmp_path, capsys):
    """The script's own prepare-data and pretrain arguments, on a capped corpus, up to --dry-run."""
    from albor.cli import main as albor_main
    from albor.pretrain import main as pretrain_main

    data = tmp_path / "stdlib"
    prepare = [str(data) if a == "$DATA" else a for a in command("albor", "prepare-data")]
    assert albor_main(["prepare-data", *prepare, "--max-bytes", "200000"]) == 0  # the cap keeps it to seconds
    args = command("python", "-m", "albor.pretrain")
    args = [str(data) if a == "$DATA" else str(tmp_path / "run") if a == "$(mktemp -d)/run" else a for a in args]
    capsys.readouterr()
    assert pretrain_main([*args, "--dry-run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "model: albor-370m" in out and "seq_length: 1024" in out
