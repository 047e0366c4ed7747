"""Issue 9, the padded vocabulary: rows added inside the model only, never predicted, never in a file.

A model built with ``vocab_multiple`` m has ceil(V / m) * m embedding and head
rows. Against the same model unpadded (m = 1, same seed) every number a user
sees must be the same to float tolerance: logits, loss, gradients of the real
rows; the padded rows get no gradient and stay zero under AdamW; every file
holds exactly V rows and loads back into a padded model bit for bit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers
import yaml

from albor.apr import read_apr, write_apr
from albor.config import PretrainConfig
from albor.distributed.checkpoint import apr_metadata
from albor.distributed.step import batch_loss
from albor.errors import ConfigError
from albor.export_hf import main as export_main
from albor.init_from import read_model_file
from albor.loss import chunked_token_loss, token_loss
from albor.model import (
    AlborLlama,
    flops_per_token,
    hf_config_dict,
    load_hf_state_dict,
    model_preset,
    padded_vocab_size,
    to_hf_state_dict,
)
from albor.pretrain import main as pretrain_main
from albor.resume_plan import check_compatible, scan_checkpoints
from tests.conftest import DEV_RUN_ARGS
from tests.dev_engine import dev_mode_group
from tests.test_resume_plan import RUN, checkpoint

VOCAB = 97  # prime: padded to 128 at 64, to 100 at 50
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
#: The builtin dataset's tokenizer has 4096 tokens, already a multiple of 64: the real run pads to 100.
RUN_MULTIPLE = 100


def build(multiple: int, *, vocab: int = VOCAB, tie: bool = True) -> AlborLlama:
    torch.manual_seed(0)
    return AlborLlama(model_preset("tiny", vocab_size=vocab).replace(tie_embeddings=tie), vocab_multiple=multiple)


class Engine:
    """What batch_loss needs of a DeepSpeed engine: a call and ``.module``."""

    def __init__(self, model: AlborLlama) -> None:
        self.module = model

    def __call__(self, x, **kw):
        return self.module(x, **kw)


def loss_and_grads(model: AlborLlama, ids: torch.Tensor, chunk: int):
    model.zero_grad(set_to_none=True)
    loss = batch_loss(Engine(model), ids[:, :-1], ids[:, 1:], chunk)  # the step's and validation's own loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# ---- the model ------------------------------------------------------------------------------------


def test_padded_size_is_the_next_multiple():
    assert padded_vocab_size(50257, 64) == 50304  # GPT-2's, as nanoGPT pads it
    assert [padded_vocab_size(v, m) for v, m in ((50257, 1), (4096, 64), (97, 50), (1, 8))] == [50257, 4096, 100, 8]
    for bad in (0, -64, True, 1.5):
        with pytest.raises(ConfigError, match="vocab_multiple"):
            padded_vocab_size(97, bad)


@pytest.mark.parametrize("tie", [True, False])
def test_real_weights_are_the_unpadded_models_and_the_padded_rows_zero(tie):
    padded, plain = build(64, tie=tie), build(1, tie=tie)
    assert padded.padded_vocab_size == 128 and padded.model.embed_tokens.weight.shape == (128, 128)
    assert padded.lm_head.weight.shape == (128, 128) and (padded.lm_head.weight is padded.model.embed_tokens.weight) == tie
    mine, theirs = padded.state_dict(), plain.state_dict()
    for name, want in theirs.items():  # same draws, whatever the padding: same real weights, same later layers
        assert torch.equal(mine[name][: want.shape[0]], want), name
    for name in (EMBED, HEAD):
        assert torch.equal(mine[name][VOCAB:], torch.zeros(128 - VOCAB, 128)), name


def test_forward_returns_the_real_vocabulary_only():
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    logits = build(64)(ids)
    assert logits.shape == (2, 9, VOCAB)
    torch.testing.assert_close(logits, build(1)(ids), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk", [0, 7])  # 0: lm_head's logits through token_loss; 7: the chunked loss
def test_loss_and_gradients_equal_the_unpadded_models(chunk, tie):
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(5))
    ref_loss, ref = loss_and_grads(build(1, tie=tie), ids, chunk)
    loss, got = loss_and_grads(build(64, tie=tie), ids, chunk)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert got.keys() == ref.keys()
    for name, want in ref.items():
        assert want.abs().max() > 0, name  # a zero gradient would pass trivially
        torch.testing.assert_close(got[name][: want.shape[0]], want, rtol=1e-5, atol=1e-7, msg=name)
    for name in (EMBED, HEAD) if not tie else (EMBED,):
        assert torch.equal(got[name][VOCAB:], torch.zeros(128 - VOCAB, 128)), name  # exactly none


def test_the_padded_columns_are_never_in_the_softmax():
    """Huge padded rows (logits far above the real ones) change nothing, in either loss, bf16 included."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 15, 16, generator=g)
    w = torch.randn(VOCAB + 31, 16, generator=g) * 0.2
    w[VOCAB:] = 1e4  # would dominate (and overflow the softmax) if any padded column took part
    t = torch.randint(0, VOCAB, (2, 15), generator=g)
    real = torch.nn.functional.cross_entropy((h @ w[:VOCAB].t()).reshape(-1, VOCAB), t.reshape(-1))
    for dtype in (torch.float32, torch.bfloat16):
        hd = h.to(dtype).clone().requires_grad_()
        wd = w.to(dtype).clone().requires_grad_()
        loss = chunked_token_loss(hd, wd, t, 4, vocab_size=VOCAB)
        loss.backward()
        assert torch.isfinite(wd.grad).all() and torch.equal(wd.grad[VOCAB:], torch.zeros_like(wd.grad[VOCAB:]))
        expected = token_loss((hd.detach() @ wd.detach()[:VOCAB].t()), t)  # the compute dtype's own logits
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
        if dtype == torch.float32:
            torch.testing.assert_close(loss, real, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="vocab_size must be in"):
        chunked_token_loss(h, w, t, 4, vocab_size=VOCAB + 32)


def test_padded_rows_stay_zero_under_adamw_with_weight_decay():
    model = build(64, tie=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    ids = torch.randint(0, VOCAB, (3, 2, 17), generator=torch.Generator().manual_seed(6))
    for batch, chunk in zip(ids, (0, 7, 0)):
        loss_and_grads(model, batch, chunk)
        opt.step()
    params, start = dict(model.named_parameters()), build(64, tie=False).state_dict()
    for name in (EMBED, HEAD):
        w = params[name].detach()
        assert torch.equal(w[VOCAB:], torch.zeros_like(w[VOCAB:])), name
        assert not torch.equal(w[:VOCAB], start[name][:VOCAB]), name  # it did train


def test_flops_and_parameters_count_the_real_vocabulary():
    """MFU's 6N counts the model as its files hold it: padding makes MFU move only through the step time."""
    cfg = model_preset("albor-370m")
    assert flops_per_token(cfg, 1024) == 6 * 322_045_952 + 12 * 24 * 16 * 64 * 1024  # N: issue 9's 322M
    with torch.device("meta"):
        padded = AlborLlama(cfg, vocab_multiple=64)
    assert padded.padded_vocab_size == 50304
    unique = sum(p.numel() for p in padded.parameters())
    assert unique == 322_045_952 + (50304 - 50257) * 1024  # the padded rows exist in memory only


# ---- Hugging Face parity with padding on ----------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_parity_with_transformers(attn):
    vocab = 1000  # padded to 1024
    cfg = model_preset("tiny", vocab_size=vocab).replace(rope_theta=500000.0)  # not transformers' default theta
    torch.manual_seed(0)
    ours = AlborLlama(cfg, vocab_multiple=64)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_dict(cfg), attn_implementation=attn))
    hf.load_state_dict(to_hf_state_dict(ours, include_tied_head=True), strict=True)  # real rows only: fits HF's
    ids = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(1))
    logits = ours(ids)
    out = hf(input_ids=ids, labels=ids)
    assert logits.shape == out.logits.shape == (2, 64, vocab)
    assert (logits - out.logits).abs().max().item() <= 1e-4
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
    assert abs(loss.item() - out.loss.item()) <= 1e-5
    loss.backward()
    out.loss.backward()
    mine, theirs = dict(ours.named_parameters()), dict(hf.named_parameters())
    for name in (EMBED, "model.layers.1.self_attn.q_proj.weight", "model.norm.weight"):
        want = theirs[name].grad
        torch.testing.assert_close(mine[name].grad[: want.shape[0]], want, rtol=1e-4, atol=1e-5, msg=name)
    assert torch.equal(mine[EMBED].grad[vocab:], torch.zeros(24, cfg.hidden_size))


# ---- files hold the real rows -------------------------------------------------------------------


def test_apr_holds_the_real_rows_and_loads_back_bit_for_bit(tmp_path):
    model = build(64)
    path = tmp_path / "m.apr"
    write_apr(path, to_hf_state_dict(model), apr_metadata(model.config, {"epoch": 0}))
    metadata, tensors = read_apr(path)
    assert metadata["vocab_size"] == VOCAB and tensors[EMBED].shape == (VOCAB, 128) and HEAD not in tensors
    torch.manual_seed(9)
    back = AlborLlama(model.config, vocab_multiple=64)
    with torch.no_grad():
        back.model.embed_tokens.weight.fill_(float("nan"))  # the load must set every row, the padded ones too
    load_hf_state_dict(back, read_model_file(path, model.config, model_name="tiny"))  # --init-from's reading
    for (name, got), want in zip(back.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
    with pytest.raises(ConfigError, match=r"shape \(128, 128\), the model expects \(97, 128\)"):
        load_hf_state_dict(back, model.state_dict())  # padded tensors are not a file's


# ---- a real run: the .apr, the metadata, the export, --init-from, resume ------------------------


def run_args(dataset: Path, config: Path, *, multiple: int) -> list[str]:
    return ["--dataset", str(dataset), "--config", str(config), *DEV_RUN_ARGS, "--total-steps", "4",
            "--steps-per-epoch", "2", "--vocab-multiple", str(multiple), "--loss-chunk-tokens", "100"]


@pytest.fixture(scope="module")
def padded_run(builtin_dataset, dev_run_config, albor_launch, tmp_path_factory):
    """A short dev-mode run padded 4096 -> 4100, through the chunked loss (256 tokens a batch, chunks of 100)."""
    run = albor_launch("python", run_args(builtin_dataset, dev_run_config, multiple=RUN_MULTIPLE),
                       tmp_path_factory.mktemp("padded") / "run")
    assert run.returncode == 0, run.tail()
    return run


def test_a_runs_files_hold_the_real_rows_and_record_the_multiple(padded_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    assert padded_run.status()["vocab_multiple"] == RUN_MULTIPLE
    meta = padded_run.metadata(1)
    assert (meta["vocab_multiple"], meta["run"]["vocab_multiple"], meta["vocab_size"]) == (RUN_MULTIPLE, RUN_MULTIPLE, 4096)
    apr_meta, apr = read_apr(padded_run.run_dir / "ckpt" / "epoch-001.apr")
    assert apr_meta["vocab_size"] == 4096 and apr[EMBED].shape == (4096, 128)
    # DeepSpeed's own state holds the padded shapes; the .apr is its real rows, bit for bit.
    with contextlib.redirect_stdout(None):
        zero = get_fp32_state_dict_from_zero_checkpoint(str(padded_run.run_dir / "ckpt" / "deepspeed"), tag="epoch-001")
    assert zero[EMBED].shape == (4100, 128)
    assert torch.equal(zero[EMBED][:4096], apr[EMBED])
    assert torch.equal(zero[EMBED][4096:], torch.zeros(4, 128))  # 4 AdamW steps with weight decay: still zero
    for name, t in apr.items():
        assert torch.equal(t, zero[name][: t.shape[0]]), name


def test_the_export_holds_the_real_rows_and_loads_into_a_padded_model(padded_run, tmp_path):
    out = tmp_path / "hf"
    assert export_main(["--hf", str(out), str(padded_run.run_dir)]) == 0
    written = safetensors.torch.load_file(out / "model.safetensors")
    assert written[EMBED].shape == (4096, 128)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ours = AlborLlama(model_preset("tiny", vocab_size=4096), vocab_multiple=64 * 3)  # any multiple: 4224 rows
    load_hf_state_dict(ours, written)
    assert ours.model.embed_tokens.weight.shape == (4224, 128)
    assert all(torch.equal(t, written[n]) for n, t in to_hf_state_dict(ours).items())  # bit for bit
    ids = torch.randint(0, 4096, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours.eval()(ids) - hf(input_ids=ids).logits).abs().max().item() <= 1e-4


def test_init_from_pads_the_file_back_into_the_engines_masters(padded_run, tmp_path):
    """load_fp32_masters (--init-from) into a ZeRO-2 engine padded to 64: the masters are the file's, then zeros."""
    from albor.distributed.checkpoint import fp32_master_state_dict
    from albor.distributed.compat import zero_master_groups
    from albor.distributed.engine import build_engine
    from albor.distributed.resume import load_fp32_masters

    apr = padded_run.run_dir / "ckpt" / "epoch-001.apr"
    cfg = model_preset("tiny", vocab_size=4096)
    weights = read_model_file(apr, cfg, model_name="tiny")
    with dev_mode_group(tmp_path) as (env, ds):
        torch.manual_seed(0)
        engine = build_engine(AlborLlama(cfg, vocab_multiple=3000), ds, env, lr=1e-2, weight_decay=0.5)
        assert engine.module.lm_head.weight.shape == (6000, 128)
        with torch.no_grad():
            for group in zero_master_groups(engine.optimizer):
                group.partition.fill_(float("nan"))  # every master element must come from the load
        load_fp32_masters(engine, env, weights)
        masters = fp32_master_state_dict(engine, env)
        assert masters.keys() == weights.keys()
        for name, want in weights.items():
            assert torch.equal(masters[name], want), name
        head = engine.module.lm_head.weight
        assert torch.equal(head[4096:], torch.zeros(1904, 128))
        tokens = torch.randint(0, 4096, (2, 2, 9), generator=torch.Generator().manual_seed(1))
        for batch in tokens:  # AdamW with a large decay: the padded masters stay zero, the real ones move
            engine.backward(batch_loss(engine, batch[:, :-1], batch[:, 1:], 5))
            engine.step()
        assert all(torch.isfinite(g.partition).all() for g in zero_master_groups(engine.optimizer))
        assert torch.equal(engine.module.lm_head.weight[4096:], torch.zeros(1904, 128))
        assert not torch.equal(fp32_master_state_dict(engine, env)[EMBED], weights[EMBED])


def test_a_resume_with_another_multiple_is_refused(padded_run, builtin_dataset, dev_run_config, albor_launch, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(padded_run.run_dir, run_dir, copy_function=os.link)  # hard links: cheap, and the run is shared
    args = run_args(builtin_dataset, dev_run_config, multiple=64)
    resumed = albor_launch("python", [*args, "--resume", "auto"], run_dir)
    assert resumed.returncode == 2, resumed.tail()
    error = [line for line in resumed.output.splitlines() if line.startswith("albor pretrain: error:")]
    assert len(error) == 1 and f"vocab_multiple is 64 but the checkpoint's is {RUN_MULTIPLE}: pass --vocab-multiple " \
        f"{RUN_MULTIPLE}" in error[0], resumed.tail()
    assert len(list((run_dir / "ckpt").glob("*.metadata.json"))) == 2  # nothing was touched


def test_a_checkpoint_from_before_padding_counts_as_multiple_1(tmp_path):
    """Older checkpoints have no vocab_multiple in their run record: their model was unpadded."""
    checkpoint(tmp_path, "epoch-001", step=20, epoch=1, meta={"run": {k: v for k, v in RUN.items() if k != "vocab_multiple"}})
    scan = scan_checkpoints(tmp_path)
    assert not scan.debris and scan.newest is not None  # still complete and resumable
    check_compatible(scan.newest, {**RUN, "vocab_multiple": 1}, world_size=2)
    with pytest.raises(ConfigError, match="vocab_multiple is 64 but the checkpoint's is 1: pass --vocab-multiple 1") as e:
        check_compatible(scan.newest, RUN, world_size=2)
    assert e.value.exit_code == 2


def test_the_flag_reaches_the_config(tmp_path, capsys):
    (tmp_path / "index.json").write_text("{}")
    assert PretrainConfig(dataset=tmp_path).vocab_multiple == 64
    assert pretrain_main(["--dataset", str(tmp_path), "--vocab-multiple", "1", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["vocab_multiple"] == 1
    assert pretrain_main(["--dataset", str(tmp_path), "--vocab-multiple", "0", "--dry-run"]) == 2
    assert "vocab_multiple must be an integer >= 1" in capsys.readouterr().err
