"""``albor export --hf``: what transformers loads gives albor's logits, ids and greedy tokens; bad input leaves nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

# A declared test dependency (pyproject's [test] extra): a broken install must fail here, not skip.
import transformers

from albor.apr import read_apr, write_apr
from albor.data.resolve import resolve_dataset
from albor.data.tokenizer import load_tokenizer
from albor.distributed.checkpoint import apr_metadata
from albor.errors import ConfigError
from albor.export.model_file import choose_epoch
from albor.export_hf import main
from albor.model import AlborLlama, load_hf_state_dict, model_preset, to_hf_state_dict
from albor.resume_plan import RUN_KEYS

HF_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"}
SNIPPET = (
    "def fib(n: int) -> int:\n"
    '    """The n-th Fibonacci number."""\n'
    "    a, b = 0, 1\n"
    "    for _ in range(n):\n"
    "        a, b = b, a + b\n"
    "    return a\n"
)
PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "
NEW_TOKENS = 8


def run_export(capsys, *argv: object) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``albor export`` in this process."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("albor export: error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])


def assert_nothing_left(parent: Path, name: str) -> None:
    """No OUT_DIR, and none of the export's temporary siblings."""
    assert not (parent / name).exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def load_hf(out: Path):
    """The exported model and tokenizer, as a user loads them (no hub access: local files only)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    return model, tok


def albor_model(apr: Path, cfg) -> AlborLlama:
    """albor's own model of ``cfg`` (built by the test, independently of the export's mapping), from the .apr."""
    _, tensors = read_apr(apr)
    model = AlborLlama(cfg)
    load_hf_state_dict(model, tensors)
    return model.eval()


def run_epochs(run) -> list[int]:
    """The epochs the run wrote a model file for, in order."""
    return sorted(int(p.name.removeprefix("epoch-").removesuffix(".apr")) for p in (run.run_dir / "ckpt").glob("epoch-*.apr"))


def run_model(run, epoch: int) -> AlborLlama:
    """The run's model at ``epoch``: the preset its metadata records, with its tokenizer's vocabulary."""
    apr = run.run_dir / "ckpt" / f"epoch-{epoch:03d}.apr"
    cfg = model_preset(run.metadata(epoch)["model"], vocab_size=read_apr(apr)[0]["vocab_size"])
    return albor_model(apr, cfg)


def albor_greedy(model: AlborLlama, ids: list[int], n: int, eos: int) -> list[int]:
    """A plain argmax loop over the whole sequence (no cache), stopping at eos as generate does."""
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            nxt = model(x)[0, -1].argmax().view(1, 1)
            x = torch.cat([x, nxt], dim=1)
            if nxt.item() == eos:
                break
    return x[0, len(ids):].tolist()


def assert_same_model(hf, ours: AlborLlama, ids: list[int]) -> None:
    with torch.no_grad():
        ref = ours(torch.tensor([ids]))  # (1, T, V)
        got = hf(input_ids=torch.tensor([ids])).logits
    scale = max(1.0, ref.abs().max().item())
    assert (got - ref).abs().max().item() <= 1e-4 * scale


def best_epoch(run) -> int:
    return min(run_epochs(run), key=lambda e: (run.metadata(e)["val_loss"], e))


def copy_run(run_dir: Path, dest: Path) -> Path:
    """A run directory with the run's config.yaml and epoch files (the shared run must not change)."""
    (dest / "ckpt").mkdir(parents=True)
    shutil.copy(run_dir / "config.yaml", dest / "config.yaml")
    for p in (run_dir / "ckpt").glob("epoch-*"):
        shutil.copy(p, dest / "ckpt" / p.name)
    return dest


@pytest.fixture(scope="module")
def exported_run(finished_dev_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "hf"
    assert main(["--hf", str(out), str(finished_dev_run.run_dir)]) == 0
    return out


# ---- a run, exported ------------------------------------------------------------------------------


def test_export_of_a_run_is_its_best_epoch_with_albors_logits(exported_run, finished_dev_run, builtin_dataset):
    assert {p.name for p in exported_run.iterdir()} == HF_FILES
    apr = finished_dev_run.run_dir / "ckpt" / f"epoch-{best_epoch(finished_dev_run):03d}.apr"
    _, tensors = read_apr(apr)
    written = safetensors.torch.load_file(exported_run / "model.safetensors")
    assert set(written) == set(tensors) and "lm_head.weight" not in written  # tied: left out, as save_pretrained does
    for name, t in tensors.items():
        assert written[name].dtype == torch.float32 and torch.equal(written[name], t), name

    hf, _ = load_hf(exported_run)
    assert hf.dtype == torch.float32 and hf.lm_head.weight is hf.model.embed_tokens.weight
    albor_tok = load_tokenizer(builtin_dataset / "tokenizer")
    assert hf.config.eos_token_id == hf.config.bos_token_id == albor_tok.eos_id
    assert hf.generation_config.eos_token_id == albor_tok.eos_id
    assert_same_model(hf, run_model(finished_dev_run, best_epoch(finished_dev_run)), albor_tok.encode_batch([SNIPPET])[0])


def test_exported_tokenizer_gives_albors_ids(exported_run, builtin_dataset):
    _, tok = load_hf(exported_run)
    albor_tok = load_tokenizer(builtin_dataset / "tokenizer")
    ids = albor_tok.encode_batch([SNIPPET])[0]
    enc = tok(SNIPPET)
    assert enc["input_ids"] == ids and set(enc) == {"input_ids", "attention_mask"}  # no bos added, no token_type_ids
    assert tok.decode(ids) == SNIPPET
    assert tok.eos_token_id == albor_tok.eos_id
    assert tok.decode(ids + [albor_tok.eos_id], skip_special_tokens=True) == SNIPPET
    # albor never reads "<|endoftext|>" in a text as the document separator; neither does the export.
    text = "x = '<|endoftext|>'\n"
    assert tok(text)["input_ids"] == albor_tok.encode_batch([text])[0]
    assert albor_tok.eos_id not in tok(text)["input_ids"]


def test_greedy_decoding_gives_albors_tokens(exported_run, finished_dev_run):
    hf, tok = load_hf(exported_run)
    ours = run_model(finished_dev_run, best_epoch(finished_dev_run))
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False)
    got = out[0, enc["input_ids"].shape[1]:].tolist()
    assert got == albor_greedy(ours, enc["input_ids"][0].tolist(), NEW_TOKENS, tok.eos_token_id)


def test_epoch_flag_exports_that_epoch(finished_dev_run, tmp_path, capsys):
    other = next(e for e in run_epochs(finished_dev_run) if e != best_epoch(finished_dev_run))
    code, out, err = run_export(capsys, "--hf", tmp_path / "hf", "--epoch", other, finished_dev_run.run_dir)
    assert code == 0, err
    assert f"epoch {other} of run" in out
    _, tensors = read_apr(finished_dev_run.run_dir / "ckpt" / f"epoch-{other:03d}.apr")
    written = safetensors.torch.load_file(tmp_path / "hf" / "model.safetensors")
    assert all(torch.equal(written[name], t) for name, t in tensors.items())


def epoch_marker(epoch: int, val_loss: float) -> dict:
    """The metadata marker of a complete epoch checkpoint, as albor.resume_plan reads it."""
    step = 4 * (epoch + 1)
    return {"kind": "epoch", "tag": f"epoch-{epoch:03d}", "step": step, "epoch": epoch, "world_size": 1,
            "run": dict.fromkeys(RUN_KEYS, 0), "resume": {"next_step": step}, "val_loss": val_loss}


def test_best_epoch_is_the_lowest_val_loss_with_a_model_file(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    # epoch 3 is lowest but its .apr is gone; 1 and 2 tie: the earlier one is the best, as in the loop.
    for epoch, val_loss, has_apr in ((0, 3.0, True), (1, 2.0, True), (2, 2.0, True), (3, 1.0, False)):
        (ckpt / f"epoch-{epoch:03d}.metadata.json").write_text(json.dumps(epoch_marker(epoch, val_loss)))
        if has_apr:
            (ckpt / f"epoch-{epoch:03d}.apr").write_bytes(b"")  # choosing reads no model file
    assert choose_epoch(tmp_path, None).epoch == 1
    assert choose_epoch(tmp_path, 2).epoch == 2
    with pytest.raises(ConfigError, match=r"--epoch 3: .*one of the epochs it has: 0, 1, 2$"):
        choose_epoch(tmp_path, 3)


# ---- a bare .apr ----------------------------------------------------------------------------------


def random_config(builtin_dataset: Path):
    """The tiny shape with a rope theta and eps that are not transformers' defaults."""
    vocab = load_tokenizer(builtin_dataset / "tokenizer").vocab_size
    return model_preset("tiny", vocab_size=vocab).replace(rope_theta=500000.0, rms_norm_eps=1e-6)


def random_model(cfg) -> AlborLlama:
    """A random model of ``cfg`` whose greedy tokens tell positions apart."""
    torch.manual_seed(0)
    model = AlborLlama(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # norm weights of 1 would hide a misplaced scale
            elif "embed" not in name:
                # Layers that outweigh the residual stream: with tied embeddings a random model otherwise
                # repeats its last token, and greedy decoding would not tell positions apart.
                p.mul_(5.0)
    return model


@pytest.fixture
def random_apr(tmp_path, builtin_dataset) -> Path:
    cfg = random_config(builtin_dataset)
    path = tmp_path / "model.apr"
    write_apr(path, to_hf_state_dict(random_model(cfg)), apr_metadata(cfg, {"epoch": 5}))
    return path


def test_bare_apr_with_tokenizer_keeps_its_architecture(random_apr, builtin_dataset, tmp_path, capsys):
    code, _, err = run_export(capsys, "--hf", tmp_path / "hf", "--tokenizer", builtin_dataset / "tokenizer", random_apr)
    assert code == 0, err
    hf, tok = load_hf(tmp_path / "hf")
    ours = albor_model(random_apr, random_config(builtin_dataset))
    ids = tok(SNIPPET)["input_ids"]
    assert_same_model(hf, ours, ids)
    with torch.no_grad():
        got = hf.generate(torch.tensor([ids[:20]]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, 20:].tolist()
    want = albor_greedy(ours, ids[:20], NEW_TOKENS, tok.eos_token_id)
    assert got == want and len(set(want)) > 1  # varied tokens: positions and the cache are really exercised


def test_an_apr_holding_the_tied_head_exports_without_it(builtin_dataset, tmp_path, capsys):
    cfg = random_config(builtin_dataset)
    model = random_model(cfg)
    with_head = to_hf_state_dict(model, include_tied_head=True)
    assert "lm_head.weight" in with_head
    write_apr(tmp_path / "model.apr", with_head, apr_metadata(cfg, {"epoch": 0}))
    code, _, err = run_export(capsys, "--hf", tmp_path / "hf", "--tokenizer", builtin_dataset / "tokenizer",
                              tmp_path / "model.apr")
    assert code == 0, err
    written = safetensors.torch.load_file(tmp_path / "hf" / "model.safetensors")
    assert set(written) == set(with_head) - {"lm_head.weight"}
    hf, tok = load_hf(tmp_path / "hf")
    assert hf.lm_head.weight is hf.model.embed_tokens.weight  # tied again on load, as save_pretrained expects
    assert_same_model(hf, model.eval(), tok(SNIPPET)["input_ids"])


def test_bare_apr_without_tokenizer_is_refused(random_apr, tmp_path, capsys):
    code, _, err = run_export(capsys, "--hf", tmp_path / "hf", random_apr)
    assert code == 2
    assert_one_error_line(err, "--tokenizer")
    assert_nothing_left(tmp_path, "hf")


def test_bare_apr_with_epoch_is_refused(random_apr, builtin_dataset, tmp_path, capsys):
    code, _, err = run_export(capsys, "--hf", tmp_path / "hf", "--epoch", 0, "--tokenizer", builtin_dataset / "tokenizer",
                              random_apr)
    assert code == 2
    assert_one_error_line(err, "drop --epoch")


def test_damaged_apr_is_refused_before_anything_is_written(random_apr, builtin_dataset, tmp_path, capsys):
    data = bytearray(random_apr.read_bytes())
    data[-100] ^= 0xFF  # a flipped byte in the tensor data: the footer CRC no longer matches
    random_apr.write_bytes(bytes(data))
    code, _, err = run_export(capsys, "--hf", tmp_path / "out" / "hf", "--tokenizer", builtin_dataset / "tokenizer",
                              random_apr)
    assert code == 3
    assert_one_error_line(err, "CRC32", str(random_apr))
    assert not (tmp_path / "out").exists()


def break_nothing(tensors: dict, meta: dict) -> None:
    return None


def drop_a_tensor(tensors: dict, meta: dict) -> None:
    del tensors["model.layers.1.mlp.up_proj.weight"]


def put_a_nan(tensors: dict, meta: dict) -> None:
    tensors["model.norm.weight"][3] = float("nan")


def another_architecture(tensors: dict, meta: dict) -> None:
    meta["architecture"] = "gpt2"


def drop_rope_theta(tensors: dict, meta: dict) -> None:
    del meta["rope_theta"]


def impossible_heads(tensors: dict, meta: dict) -> None:
    meta["num_kv_heads"] = 3  # does not divide 4 query heads


@pytest.mark.parametrize("damage, words", [
    (break_nothing, None),
    (drop_a_tensor, ["do not fit", "missing 1: model.layers.1.mlp.up_proj.weight"]),
    (put_a_nan, ["model.norm.weight holds NaN or Inf"]),
    (another_architecture, ["'gpt2', not 'llama'"]),
    (drop_rope_theta, ["lacks rope_theta"]),
    (impossible_heads, ["num_kv_heads=3"]),
])
def test_a_model_file_albor_did_not_write_is_refused(damage, words, builtin_dataset, tmp_path, capsys):
    cfg = model_preset("tiny", vocab_size=load_tokenizer(builtin_dataset / "tokenizer").vocab_size)
    tensors, meta = to_hf_state_dict(AlborLlama(cfg)), apr_metadata(cfg, {"epoch": 0})
    damage(tensors, meta)  # a readable, well-formed .apr: only what it holds is wrong
    write_apr(tmp_path / "model.apr", tensors, meta)
    code, _, err = run_export(capsys, "--hf", tmp_path / "hf", "--tokenizer", builtin_dataset / "tokenizer",
                              tmp_path / "model.apr")
    if words is None:  # the undamaged file exports: the damage alone is refused
        assert code == 0, err
        return
    assert code == 3
    assert_one_error_line(err, *words)
    assert_nothing_left(tmp_path, "hf")


def test_tokenizer_larger_than_the_model_is_refused(tmp_path, builtin_dataset, capsys):
    cfg = model_preset("tiny", vocab_size=300)
    write_apr(tmp_path / "small.apr", to_hf_state_dict(AlborLlama(cfg)), apr_metadata(cfg, {"epoch": 0}))
    code, _, err = run_export(capsys, "--hf", tmp_path / "hf", "--tokenizer", builtin_dataset / "tokenizer",
                              tmp_path / "small.apr")
    assert code == 3
    assert_one_error_line(err, "embeds only 300")
    assert_nothing_left(tmp_path, "hf")


# ---- a run's input that does not fit ------------------------------------------------------------------


def test_missing_epoch_is_refused_naming_the_epochs(finished_dev_run, tmp_path, capsys):
    epochs = run_epochs(finished_dev_run)
    missing = max(epochs) + 1
    code, _, err = run_export(capsys, "--hf", tmp_path / "hf", "--epoch", missing, finished_dev_run.run_dir)
    assert code == 2
    assert_one_error_line(err, f"--epoch {missing}", f"one of the epochs it has: {', '.join(map(str, epochs))}")
    assert_nothing_left(tmp_path, "hf")


def test_damaged_apr_in_a_run_is_refused(finished_dev_run, tmp_path, capsys):
    run = copy_run(finished_dev_run.run_dir, tmp_path / "run")
    apr = run / "ckpt" / f"epoch-{best_epoch(finished_dev_run):03d}.apr"
    data = bytearray(apr.read_bytes())
    data[10] ^= 0xFF  # inside the header: its CRC no longer matches
    apr.write_bytes(bytes(data))
    code, _, err = run_export(capsys, "--hf", tmp_path / "hf", run)
    assert code == 3
    assert_one_error_line(err, "header CRC32", apr.name)
    assert_nothing_left(tmp_path, "hf")


def one_merge_fewer(tokenizer_dir: Path) -> None:
    """Edit the tokenizer in place: another tokenizer under the same path."""
    merges = (tokenizer_dir / "merges.txt").read_text().splitlines(keepends=True)
    (tokenizer_dir / "merges.txt").write_text("".join(merges[:-1]))


def test_another_tokenizer_than_the_runs_is_refused(finished_dev_run, builtin_dataset, tmp_path, capsys):
    other = tmp_path / "tok"
    shutil.copytree(builtin_dataset / "tokenizer", other)
    one_merge_fewer(other)
    code, _, err = run_export(capsys, "--hf", tmp_path / "hf", "--tokenizer", other, finished_dev_run.run_dir)
    assert code == 3
    assert_one_error_line(err, f"--tokenizer {other}", "is not the tokenizer run")
    assert_nothing_left(tmp_path, "hf")


def test_a_run_whose_datasets_tokenizer_changed_is_refused(finished_dev_run, builtin_dataset, tmp_path, capsys):
    run = copy_run(finished_dev_run.run_dir, tmp_path / "run")
    data = tmp_path / "data"  # the run's dataset as it is (its index is all the export reads), with its tokenizer
    shutil.copytree(builtin_dataset / "tokenizer", data / "tokenizer")
    shutil.copy(builtin_dataset / "index.json", data / "index.json")
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace(str(builtin_dataset), str(data)))
    code, _, err = run_export(capsys, "--hf", tmp_path / "hf", run)
    assert code == 0, err  # the copy alone changes nothing

    one_merge_fewer(data / "tokenizer")
    code, _, err = run_export(capsys, "--hf", tmp_path / "hf2", run)
    assert code == 3
    assert_one_error_line(err, f"tokenizer {data / 'tokenizer'}", "is not the tokenizer run", "its files changed since")
    assert_nothing_left(tmp_path, "hf2")


def test_a_run_on_a_raw_file_checks_the_tokenizer_its_data_cache_records(builtin_dataset, tmp_path, capsys):
    """``--dataset corpus.jsonl``: the run's index is RUN_DIR/data-cache/index.json, as in training."""
    tok = tmp_path / "tok"
    shutil.copytree(builtin_dataset / "tokenizer", tok)
    corpus = tmp_path / "corpus.jsonl"  # one file, many documents (a .txt file is one)
    corpus.write_text("".join(json.dumps({"text": SNIPPET.replace("fib", f"fib{i}")}) + "\n" for i in range(40)))
    run = tmp_path / "run"
    # A run made by hand: what `albor pretrain --dataset corpus.txt --tokenizer tok` leaves that the export reads.
    index_path = resolve_dataset(corpus, tok, run, log=lambda line: None)  # the run's own tokenizing, for real
    assert index_path == run / "data-cache" / "index.json"
    index = json.loads(index_path.read_text())
    (run / "config.yaml").write_text(f"dataset: {corpus}\ntokenizer: {tok}\nmodel: tiny\n")
    (run / "ckpt").mkdir()
    marker = epoch_marker(0, 2.0)
    marker["run"]["dataset_fingerprint"] = marker["dataset_fingerprint"] = index["fingerprint"]
    (run / "ckpt" / "epoch-000.metadata.json").write_text(json.dumps(marker))
    cfg = model_preset("tiny", vocab_size=index["vocab_size"])
    write_apr(run / "ckpt" / "epoch-000.apr", to_hf_state_dict(AlborLlama(cfg)), apr_metadata(cfg, {"epoch": 0}))
    code, out, err = run_export(capsys, "--hf", tmp_path / "hf", run)
    assert code == 0, err
    assert f"tokenizer {tok})" in out

    one_merge_fewer(tok)
    code, _, err = run_export(capsys, "--hf", tmp_path / "hf2", run)
    assert code == 3
    assert_one_error_line(err, f"tokenizer {tok}", f"recorded in {index_path}", "its files changed since")
    assert_nothing_left(tmp_path, "hf2")


@pytest.mark.parametrize("dataset", ["gone", "remade"])
def test_a_run_whose_dataset_changed_needs_tokenizer(dataset, finished_dev_run, builtin_dataset, tmp_path, capsys):
    run = copy_run(finished_dev_run.run_dir, tmp_path / "run")
    moved = tmp_path / "data"
    if dataset == "remade":  # prepare-data run again at the same path: other shards, so another fingerprint
        shutil.copytree(builtin_dataset / "tokenizer", moved / "tokenizer")
        index = json.loads((builtin_dataset / "index.json").read_text())
        (moved / "index.json").write_text(json.dumps({**index, "fingerprint": "0" * 64}))
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace(str(builtin_dataset), str(moved)))
    code, _, err = run_export(capsys, "--hf", tmp_path / "hf", run)
    assert code == 2
    why = "is not there" if dataset == "gone" else "is no longer the one the run trained on"
    assert_one_error_line(err, "cannot find the tokenizer", why, "--tokenizer DIR")
    assert_nothing_left(tmp_path, "hf")
    code, _, err = run_export(capsys, "--hf", tmp_path / "hf", "--tokenizer", builtin_dataset / "tokenizer", run)
    assert code == 0, err


# ---- OUT_DIR ----------------------------------------------------------------------------------------


def test_non_empty_out_dir_needs_force(finished_dev_run, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_export(capsys, "--hf", out, finished_dev_run.run_dir)
    assert code == 2
    assert_one_error_line(err, "not empty", "--force")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    code, _, err = run_export(capsys, "--hf", out, "--force", finished_dev_run.run_dir)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == HF_FILES  # replaced as a whole
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf.")]


def test_force_never_replaces_the_run_it_exports(finished_dev_run, tmp_path, capsys):
    run = copy_run(finished_dev_run.run_dir, tmp_path / "run")
    before = sorted(p.name for p in run.rglob("*"))
    code, _, err = run_export(capsys, "--hf", tmp_path, "--force", run)
    assert code == 2
    assert_one_error_line(err, "lies inside --hf")
    assert sorted(p.name for p in run.rglob("*")) == before


def test_a_failed_write_leaves_nothing_half_written(finished_dev_run, tmp_path, capsys, monkeypatch):
    import albor.export.hf_files as hf_files

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # config.json is written before it, this one half
        raise OSError(28, "No space left on device", filename)

    monkeypatch.setattr(hf_files, "save_file", disk_full)
    code, _, err = run_export(capsys, "--hf", tmp_path / "new" / "hf", finished_dev_run.run_dir)
    assert code == 3
    assert_one_error_line(err, "No space left on device")
    assert not (tmp_path / "new").exists()  # the parent it made for OUT_DIR goes too

    # An export replaced with --force stays whole when its replacement fails.
    monkeypatch.undo()
    assert main(["--hf", str(tmp_path / "hf"), str(finished_dev_run.run_dir)]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    monkeypatch.setattr(hf_files, "save_file", disk_full)
    code, _, err = run_export(capsys, "--hf", tmp_path / "hf", "--force", finished_dev_run.run_dir)
    assert code == 3
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf.")]
