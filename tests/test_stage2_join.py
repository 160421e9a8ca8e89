"""A run stopped at step K and continued (``train(until=K)`` then ``train(start=...)``) is the uninterrupted
run; a stage-2 ATP run joins the upper bound's stage 2 at ``stage2_join_step`` from one cached prefix."""

from __future__ import annotations

import pytest
import torch

from atp_repro import ATPConfig, apply_atp, atp_parameters
from atp_repro.mini import runs
from atp_repro.mini.model import MiniModelConfig, build_model
from atp_repro.mini.pretrain import PretrainConfig
from atp_repro.mini.runs import MiniWorldConfig
from atp_repro.mini.tokenizer import build_tokenizer
from atp_repro.mini.train import TrainConfig, cosine_with_warmup, train

TINY_MODEL = MiniModelConfig(patch_size=24, vision_hidden=32, vision_layers=2, vision_ffn=64, vision_heads=2,
                             lm_hidden=32, lm_ffn=64, lm_heads=2, lm_layers=8)
CFG = TrainConfig(steps=6, batch_size=4, n_train=24, checkpoint_every=2, trainable="lm", warmup_ratio=0.2,
                  lr_lm=3e-3, lr_atp=1e-2)
WORLD = MiniWorldConfig(model=TINY_MODEL, pretrain=PretrainConfig(steps=2, batch_size=4), train=CFG, n_test=12)


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ATP_REPRO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def data():
    tok = build_tokenizer()
    return tok, WORLD.dataset("train", tokenizer=tok, turns=3)


def _model(tok):
    return build_model(TINY_MODEL, tok)


def test_stopping_at_k_and_continuing_gives_the_uninterrupted_run(data, tmp_path):
    tok, ds = data
    whole = _model(tok)
    train(whole, ds, CFG, progress=False)
    first = _model(tok)
    res = train(first, ds, CFG, checkpoint_path=tmp_path / "prefix.pt", until=3, progress=False)
    assert res.steps == 3 and len(res.losses) == 3
    state = torch.load(tmp_path / "prefix.pt", weights_only=False)
    assert state["step"] == 3
    second = _model(tok)  # fresh weights: everything must come from the state
    res = train(second, ds, CFG, start=state, progress=False)
    assert res.resumed_from == 3 and len(res.losses) == 3
    for k, v in whole.state_dict().items():
        assert torch.equal(v, second.state_dict()[k]), k


def test_new_parameters_join_with_fresh_moments_and_the_schedule_continues(data, tmp_path, monkeypatch):
    tok, ds = data
    train(_model(tok), ds, CFG, checkpoint_path=tmp_path / "prefix.pt", until=3, progress=False)
    state = torch.load(tmp_path / "prefix.pt", weights_only=False)
    joined = apply_atp(_model(tok), ATPConfig(module_layers=(0, 3, 5), grid_strides=(2,)))
    made = []

    class RecordedAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", RecordedAdamW)
    rates = {}
    train(joined, ds, CFG, start=state, atp_params=atp_parameters(joined), progress=False,
          on_step=lambda step, loss: rates.setdefault(step, [g["lr"] for g in made[0].param_groups]))
    lm, atp = made[0].param_groups
    assert lm["name"] == "lm" and atp["name"] == "atp"
    # the language model's moments continued the prefix's (3 + 3 steps); the new modules' started at 0
    assert float(made[0].state[lm["params"][0]]["step"]) == 6
    assert float(made[0].state[atp["params"][0]]["step"]) == 3
    # after step 4 both groups are at the schedule's rate for step 4, each on its own base rate
    factor = cosine_with_warmup(4, CFG.steps, CFG.warmup_steps)
    assert rates[4] == pytest.approx([CFG.lr_lm * factor, CFG.lr_atp * factor])


def test_bad_until_and_a_foreign_start_fail_naming_them(data, tmp_path):
    tok, ds = data
    for until in (0, 7):
        with pytest.raises(ValueError, match="until must be in 1..6"):
            train(_model(tok), ds, CFG, until=until, progress=False)
    train(_model(tok), ds, CFG, checkpoint_path=tmp_path / "prefix.pt", until=5, progress=False)
    state = torch.load(tmp_path / "prefix.pt", weights_only=False)
    with pytest.raises(ValueError, match="start: the other run stopped at step 5"):
        train(_model(tok), ds, CFG, start=state, until=4, progress=False)
    other = build_model(TINY_MODEL.replace(lm_layers=9), tok)
    with pytest.raises(ValueError, match="start: the other run's weights do not fit"):
        train(other, ds, CFG, start=state, progress=False)
    with pytest.raises(ValueError, match="stage2_join_step must be in 0..5"):
        WORLD.replace(stage2_join_step=6)


def test_stage2_runs_share_one_prefix_of_the_upper_bounds_training(cache_dir):
    world = WORLD.replace(stage2_join_step=2)
    atp_cfg = ATPConfig(module_layers=(0, 3, 5), grid_strides=(2,))
    train_cfg = world.train.replace(lr_atp=1e-2)
    model, _, info = runs.atp_finetune(world, atp_cfg, train_cfg, progress=False, start="stage1")
    prefix, prefix_info = runs.stage2_prefix(world, progress=False)
    assert prefix_info.status == "hit" and prefix["step"] == 2  # built once, by the run
    assert info.manifest["resumed_from"] == 2 and len(info.manifest["losses"]) == 4
    # a second seed reuses the prefix; its own steps differ (data order)
    other, _, other_info = runs.atp_finetune(world, atp_cfg, train_cfg.replace(seed=1), progress=False,
                                             start="stage1")
    assert other_info.folder != info.folder
    assert runs.stage2_prefix(world, progress=False)[1].status == "hit"
    # the prefix is the upper bound's own training up to the join step
    tok = build_tokenizer()
    reference, _ = runs.stage1_model(world, tok, progress=False)
    train(reference, world.dataset("train", tokenizer=tok, turns=world.ub_turns), world.train, until=2,
          progress=False)
    for k, v in reference.state_dict().items():
        assert torch.equal(v, prefix["model"][k]), k
    assert info.manifest["spec"]["join_step"] == 2
