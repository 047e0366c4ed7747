"""The pretrain command line: --dry-run, mode presets, and every invalid-config case."""

import json
import subprocess
import sys

import pytest
import yaml

from albor.errors import ExitCode
from albor.pretrain import main
from albor.resume_plan import RUN_KEYS

FLAGS = [
    "--config", "--dataset", "--tokenizer", "--output-dir", "--mode", "--total-steps", "--steps-per-epoch",
    "--batch-size", "--seq-length", "--seed", "--lr-max", "--lr-min", "--warmup-steps", "--dry-run",
    "--resume", "--init-from", "--preempt-grace-s",
]


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "index.json").write_text("{}")  # the config checks that it is there; opening it comes later
    return d


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def resolved(capsys, *argv):
    code, out, err = run(capsys, *argv, "--dry-run")
    assert code == 0, err
    return yaml.safe_load(out)


def test_help_lists_the_flags():
    out = subprocess.run([sys.executable, "-m", "albor.pretrain", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in FLAGS:
        assert flag in out


def test_dry_run_from_scratch_preset(capsys, data, tmp_path):
    cfg = resolved(capsys, "--mode", "from-scratch", "--dataset", str(data), "--output-dir", str(tmp_path / "run"))
    assert (cfg["lr_max"], cfg["warmup_steps"], cfg["target_val_loss"], cfg["regime"]) == (3e-4, 1000, 3.0, "from-scratch")
    assert not (tmp_path / "run").exists()  # a dry run builds nothing


def test_dry_run_finetune_preset_and_defaults(capsys, data):
    cfg = resolved(capsys, "--mode", "finetune", "--dataset", str(data))
    assert (cfg["lr_max"], cfg["warmup_steps"], cfg["target_val_loss"], cfg["regime"]) == (5e-5, 100, 2.2, "finetune")
    assert (cfg["lr_min"], cfg["total_steps"], cfg["batch_size"], cfg["seq_length"]) == (1e-6, 1000, 16, 1024)
    assert (cfg["steps_per_epoch"], cfg["seed"], cfg["grad_clip"], cfg["weight_decay"]) == (100, 42, 1.0, 0.01)


def test_explicit_flags_win_over_mode(capsys, data):
    cfg = resolved(capsys, "--mode", "from-scratch", "--dataset", str(data), "--lr-max", "1e-3", "--warmup-steps", "5")
    assert (cfg["lr_max"], cfg["warmup_steps"], cfg["regime"]) == (1e-3, 5, "from-scratch")


def test_yaml_layer_between_mode_and_flags(capsys, data, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(f"dataset: {data}\nmode: from-scratch\nlr_max: 2e-4\ntotal_steps: 3000\nseq_length: 256\n")
    cfg = resolved(capsys, "--config", str(f), "--seq-length", "512")
    # YAML's '2e-4' is a string to PyYAML; it must still land as a float.
    assert (cfg["lr_max"], cfg["total_steps"], cfg["seq_length"], cfg["warmup_steps"]) == (2e-4, 3000, 512, 1000)


INVALID = [
    (["--total-steps", "0"], "total_steps must be > 0"),
    (["--batch-size", "-4"], "batch_size must be > 0"),
    (["--seq-length", "0"], "seq_length must be > 0"),
    (["--lr-max", "0"], "lr_max must be > 0"),
    (["--lr-min=-1e-5"], "lr_min must be >= 0"),
    (["--steps-per-epoch", "0"], "steps_per_epoch must be >= 1"),
    (["--warmup-steps", "2000", "--total-steps", "1000"], "warmup_steps (2000) > total_steps (1000)"),
    (["--lr-min", "1e-3", "--lr-max", "1e-4"], "lr_min (0.001) > lr_max (0.0001)"),
    (["--mode", "pretrain"], "invalid choice"),
    (["--total-steps", "ten"], "invalid int value"),
    (["--model", "gpt-5"], "model 'gpt-5' is not a known preset"),
    (["--seed", str(2**64)], "seed must be < 2**63"),
    (["--preempt-grace-s", "0"], "preempt_grace_s must be > 0 (got 0.0)"),
    (["--preempt-grace-s", "nan"], "preempt_grace_s must be > 0 (got nan)"),
    (["--init-from", "missing.apr"], "init_from missing.apr is not a file: pass a model file (.apr) to --init-from"),
    (["--resume", "epoch-003"], "resume epoch-003 does not exist: pass --resume auto, or a checkpoint of"),
    (["--resume", ""], "resume is empty: pass --resume auto"),
]


@pytest.mark.parametrize("argv,message", INVALID)
def test_invalid_config_is_one_clear_line(capsys, data, tmp_path, argv, message):
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, "--dataset", str(data), "--output-dir", str(run_dir), *argv)
    assert code == ExitCode.USAGE
    assert message in err and err.count("\n") == 1 and err.startswith("albor pretrain: error:")
    assert out == "" and not run_dir.exists()


def test_all_problems_reported_together(capsys, tmp_path):
    code, _, err = run(capsys, "--total-steps", "0", "--lr-min", "1", "--lr-max", "0.1", "--steps-per-epoch", "0")
    assert code == ExitCode.USAGE
    for part in ("total_steps must be > 0", "lr_min (1.0) > lr_max (0.1)", "steps_per_epoch must be >= 1", "dataset is required"):
        assert part in err


def test_unknown_yaml_keys(capsys, data, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(f"dataset: {data}\nlearning_rate: 1e-3\nbatchsize: 4\n")
    code, _, err = run(capsys, "--config", str(f))
    assert code == ExitCode.USAGE and "unknown config key(s) batchsize, learning_rate" in err


def test_unknown_mode_in_yaml(capsys, data, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(f"dataset: {data}\nmode: pretrain\n")
    code, _, err = run(capsys, "--config", str(f))
    assert code == ExitCode.USAGE and "unknown mode 'pretrain'" in err


@pytest.mark.parametrize("text,message", [("lr_max: [1\n", "not valid YAML at line"), ("- 1\n- 2\n", "must be a mapping"), ("seed: abc\n", "seed: 'abc' is not a valid int")])
def test_bad_yaml_files(capsys, data, tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    code, _, err = run(capsys, "--config", str(f), "--dataset", str(data))
    assert code == ExitCode.USAGE and message in err


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run(capsys, "--config", str(tmp_path / "nope.yaml"))
    assert code == ExitCode.USAGE and "cannot read config" in err


def test_missing_dataset(capsys, tmp_path):
    code, _, err = run(capsys, "--dataset", str(tmp_path / "nope"))
    assert code == ExitCode.USAGE and "does not exist" in err and "prepare-data" in err


def test_existing_run_dir_is_not_overwritten(capsys, data, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    code, _, err = run(capsys, "--dataset", str(data), "--output-dir", str(run_dir), "--dry-run")
    assert code == ExitCode.USAGE and "already holds a run" in err and "or pass --resume auto to continue it" in err
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 0}\n'


def test_resume_auto_continues_a_run_dir_and_the_dry_run_says_from_where(capsys, data, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    code, out, err = run(capsys, "--dataset", str(data), "--output-dir", str(run_dir), "--resume", "auto", "--dry-run")
    assert code == 0, err
    assert yaml.safe_load(out)["resume"] == "auto" and "# start: a new run (no checkpoint to resume)" in out
    ds = run_dir / "ckpt" / "deepspeed" / "epoch-000"
    ds.mkdir(parents=True)
    (ds / "albor-rank-0.json").write_text("{}")
    (run_dir / "ckpt" / "epoch-000.metadata.json").write_text(json.dumps({
        "kind": "epoch", "tag": "epoch-000", "step": 5, "epoch": 0, "world_size": 1, "resume": {"next_step": 5},
        "run": dict.fromkeys(RUN_KEYS, 0),
    }))
    (run_dir / "ckpt" / "epoch-001.apr").write_text("half")
    for how in ("auto", "epoch-000"):
        code, out, err = run(capsys, "--dataset", str(data), "--output-dir", str(run_dir), "--resume", how, "--dry-run")
        assert code == 0, err
        assert "# start: resume from epoch-000 (epoch checkpoint at step 5, epoch 0, world size 1); " \
               "1 half-written item(s) in ckpt/ would be removed first" in out
    assert (run_dir / "ckpt" / "epoch-001.apr").exists()  # a dry run removes nothing
    code, out, err = run(capsys, "--dataset", str(data), "--output-dir", str(run_dir), "--resume", "epoch-001", "--dry-run")
    assert code == ExitCode.USAGE and out == "" and err.count("\n") == 1
    assert "--resume epoch-001: is epoch-001, not a complete checkpoint" in err and "epoch-000 (step 5)" in err


def test_init_from_is_a_new_run_and_only_resume_auto_goes_with_it(capsys, data, tmp_path):
    model = tmp_path / "m.apr"
    model.write_bytes(b"APR")
    out_dir = str(tmp_path / "run")
    cfg = resolved(capsys, "--dataset", str(data), "--output-dir", out_dir, "--init-from", str(model), "--preempt-grace-s", "25")
    assert (cfg["init_from"], cfg["resume"], cfg["preempt_grace_s"]) == (str(model), None, 25.0)
    _, out, _ = run(capsys, "--dataset", str(data), "--init-from", str(model), "--dry-run")
    assert f"# start: a new run from the model in {model}" in out
    # --resume auto: continue a checkpoint if there is one, else start from the model file (a requeued job).
    _, out, _ = run(capsys, "--dataset", str(data), "--output-dir", out_dir, "--init-from", str(model),
                    "--resume", "auto", "--dry-run")
    assert f"# start: a new run from the model in {model} (no checkpoint to resume)" in out
    code, out, err = run(capsys, "--dataset", str(data), "--output-dir", out_dir, "--init-from", str(model),
                         "--resume", "epoch-000")
    assert code == ExitCode.USAGE and out == "" and err.count("\n") == 1
    assert "--resume epoch-000 and --init-from are exclusive" in err


def test_where_the_weights_come_from_resume_auto_keeps_the_config_files_init_from(capsys, data, tmp_path):
    model = tmp_path / "m.apr"
    model.write_bytes(b"APR")
    f = tmp_path / "c.yaml"
    f.write_text(f"dataset: {data}\ninit_from: {model}\n")  # as a run's own config.yaml records it
    # --resume auto (Slurm's requeue adds it): the checkpoint if there is one, else this model file.
    cfg = resolved(capsys, "--config", str(f), "--resume", "auto")
    assert (cfg["resume"], cfg["init_from"]) == ("auto", str(model))
    f.write_text(f"dataset: {data}\nresume: auto\n")
    cfg = resolved(capsys, "--config", str(f), "--init-from", str(model))  # --init-from: a new run
    assert (cfg["resume"], cfg["init_from"]) == (None, str(model))
    f.write_text(f"dataset: {data}\nresume: epoch-003\ninit_from: {model}\n")
    code, _, err = run(capsys, "--config", str(f), "--dry-run")
    assert code == ExitCode.USAGE and "--resume epoch-003 and --init-from are exclusive" in err


def test_the_invocation_is_kept_for_the_resume_command(capsys, data, tmp_path):
    from albor.pretrain import invoked_argv

    run(capsys, "--dataset", str(data), "--output-dir", str(tmp_path / "r"), "--lr-max", "3e-4", "--local_rank=1", "--dry-run")
    assert invoked_argv() == ["--dataset", str(data), "--output-dir", str(tmp_path / "r"), "--lr-max", "0.0003"]


def test_subprocess_exit_code_and_single_line(tmp_path, data):
    p = subprocess.run(
        [sys.executable, "-m", "albor.pretrain", "--dataset", str(data), "--warmup-steps", "5000", "--dry-run"],
        capture_output=True, text=True,
    )
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().count("\n") == 0 and "warmup_steps (5000) > total_steps (1000)" in p.stderr


def test_console_script_dispatch(capsys, data):
    from albor.cli import main as albor_main

    assert albor_main(["pretrain", "--dataset", str(data), "--dry-run", "--mode", "finetune"]) == 0
    assert "regime: finetune" in capsys.readouterr().out
    assert albor_main(["bogus"]) == 2


def test_raw_corpus_needs_a_tokenizer(capsys, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text("print(1)\n")
    code, _, err = run(capsys, "--dataset", str(corpus), "--output-dir", str(tmp_path / "run"), "--dry-run")
    assert code == ExitCode.USAGE and "is a raw corpus" in err and "--tokenizer" in err
    assert not (tmp_path / "run").exists()


def test_output_dir_that_is_a_file(capsys, data, tmp_path):
    (tmp_path / "run").write_text("x")
    code, _, err = run(capsys, "--dataset", str(data), "--output-dir", str(tmp_path / "run"), "--dry-run")
    assert code == ExitCode.USAGE and "is a file" in err and (tmp_path / "run").read_text() == "x"


def test_dry_run_checks_what_a_real_run_checks_before_its_process_group(capsys, data, tmp_path, monkeypatch):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 3}, "fp16": {"enabled": true}}')
    code, out, err = run(capsys, "--dataset", str(data), "--ds-config", str(ds), "--dry-run")
    assert code == ExitCode.USAGE and "stage 3" in err and "fp16" in err and out == ""
    code, _, err = run(capsys, "--dataset", str(data), "--model", "tiny", "--seq-length", "5000", "--dry-run")
    assert code == ExitCode.USAGE and "max positions 1024" in err
    monkeypatch.setenv("ALBOR_FAULT", "nan:0")
    code, _, err = run(capsys, "--dataset", str(data), "--dry-run")
    assert code == ExitCode.USAGE and "ALBOR_FAULT" in err


def test_dry_run_names_the_deepspeed_config_it_would_use(capsys, data):
    cfg = resolved(capsys, "--dataset", str(data))  # a YAML comment line does not change the mapping
    assert cfg["ds_config"] is None
    code, out, _ = run(capsys, "--dataset", str(data), "--dry-run")
    assert "# DeepSpeed config: " in out and "zero2-cpu-fp32.json" in out


@pytest.mark.parametrize("command", ["pretrain", "prepare-data", "report", "export", "status"])
def test_each_albor_command_reaches_its_own_parser(command, capsys):
    from albor.cli import main as albor_main

    try:  # argparse's --help exits; some commands turn that into their return value
        code = albor_main([command, "--help"])
    except SystemExit as e:
        code = e.code
    assert code in (0, None)
    assert f"albor {command}" in capsys.readouterr().out


def test_an_unknown_albor_command_names_every_command(capsys):
    from albor.cli import main as albor_main

    assert albor_main(["reprot"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'reprot'" in err
    assert all(name in err for name in ("pretrain", "prepare-data", "report", "export", "status"))


def test_run_command_turns_what_the_user_can_fix_into_one_line(capsys):
    from albor.errors import DataError, ExitCode, run_command

    def bad_data() -> int:
        raise DataError("the shard is\n  short: prepare it again")

    def full_disk() -> int:
        raise OSError(28, "No space left on device", "/runs/a/ckpt")

    def help_() -> int:
        raise SystemExit(0)

    assert run_command("albor x", bad_data) == ExitCode.DATA
    assert capsys.readouterr().err == "albor x: error: the shard is short: prepare it again\n"
    assert run_command("albor x", full_disk) == ExitCode.DATA
    err = capsys.readouterr().err
    assert err.startswith("albor x: error: /runs/a/ckpt: No space left on device;") and err.count("\n") == 1
    assert run_command("albor x", help_) == 0
    with pytest.raises(ZeroDivisionError):  # a bug is not the user's to fix: its traceback stays
        run_command("albor x", lambda: 1 // 0)
