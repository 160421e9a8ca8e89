"""Mini world with the core ATP method: cached fine-tune, evaluation with kept counts, regions (tiny)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atp_repro import ATPConfig
from atp_repro.mini.evaluate import evaluate
from atp_repro.mini.figures import kept_mask, overlay, surviving_regions
from atp_repro.mini.runs import atp_finetune
from atp_repro.mini.train import TrainConfig
from tests.test_mini_training import TINY_WORLD

ATP = ATPConfig(module_layers=(0, 3, 5), grid_strides=(2, 4), n_target=6.0, ste_temperature=10.0,
                position_encoding="learned2d")
FT = TrainConfig(steps=3, batch_size=4, n_train=12, lr_lm=1e-3, lr_atp=5e-2, trainable="lm", checkpoint_every=2)


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ATP_REPRO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_atp_finetune_cached_and_evaluated(cache_dir):
    model, tok, info = atp_finetune(TINY_WORLD, ATP, FT, progress=False)
    assert info.status == "built" and info.manifest["spec"]["kind"] == "atp"
    again, _, info2 = atp_finetune(TINY_WORLD, ATP, FT, progress=False)
    assert info2.status == "hit"
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    ds = TINY_WORLD.dataset("test", tokenizer=tok)
    res = evaluate(model, ds, batch_size=4)
    assert res.kept.shape == (12, 8)
    assert (res.kept[:, 0] == 16).all()  # nothing is pruned before the first module
    assert (res.kept <= 16).all()
    regions = surviving_regions(model, ds, 0)
    assert len(regions) == 3 and all(r.shape == (4, 4) for r in regions)
    assert all(regions[i + 1].sum() <= regions[i].sum() for i in range(2))  # pruning is nested


def test_frozen_lm_trains_only_atp(cache_dir):
    model, _, _ = atp_finetune(TINY_WORLD, ATP.replace(position_encoding="original"), FT.replace(trainable="atp"),
                               progress=False)
    from atp_repro.mini.runs import upper_bound

    ub, _, _ = upper_bound(TINY_WORLD, progress=False)
    ub_sd = ub.state_dict()
    for k, v in model.state_dict().items():
        if k in ub_sd:
            assert torch.equal(v, ub_sd[k]), f"frozen LM changed {k}"


def test_mask_helpers():
    m = kept_mask(np.array([0, 5]), 4)
    assert m.sum() == 2 and m[0, 0] and m[1, 1]
    img = np.full((8, 8, 3), 200, np.uint8)
    out = overlay(img, m)
    assert out[0, 0, 0] == 200 and out[0, 2, 0] == 50


def test_stage1_start_trains_atp_through_the_upper_bounds_stage_2_without_reading_its_weights(cache_dir):
    from atp_repro.mini import runs
    from atp_repro.mini.model import build_model
    from atp_repro.mini.tokenizer import build_tokenizer

    stage2 = TINY_WORLD.train.replace(lr_atp=5e-2)
    model, tok, info = atp_finetune(TINY_WORLD, ATP, stage2, progress=False, start="stage1")
    assert info.manifest["spec"]["start"] == "stage1"
    assert len(info.manifest["losses"]) == TINY_WORLD.train.steps  # the upper bound's step count
    # Only the tower comes from pretraining: the run never trains (or loads) the upper bound ...
    assert not list(cache_dir.glob("upper_bound-*"))
    # ... its LM starts at the upper bound's initialisation and trains; the tower stays frozen.
    init = build_model(TINY_WORLD.model, build_tokenizer()).state_dict()
    vision, _ = runs.pretrained_vision(TINY_WORLD, progress=False)
    trained = model.state_dict()
    assert all(torch.equal(trained[f"model.vision_tower.{k}"], v) for k, v in vision.items())
    lm = [k for k in init if k.startswith("model.language_model.")]
    assert any(not torch.equal(trained[k], init[k]) for k in lm)
    # A run from the finished upper bound is another artifact.
    _, _, other = atp_finetune(TINY_WORLD, ATP, stage2, progress=False)
    assert other.spec_hash != info.spec_hash and "start" not in other.manifest["spec"]


def test_stage1_start_refuses_a_frozen_lm_and_unknown_starts(cache_dir):
    from atp_repro.mini.experiments import Variant

    with pytest.raises(ValueError, match="trainable='lm'"):
        atp_finetune(TINY_WORLD, ATP, FT.replace(trainable="atp"), progress=False, start="stage1")
    with pytest.raises(ValueError, match=r"start must be one of \('upper_bound', 'stage1'\)"):
        atp_finetune(TINY_WORLD, ATP, FT, progress=False, start="stage2")
    with pytest.raises(ValueError, match="frozen_lm"):
        Variant(144, True, start="stage1")
    with pytest.raises(ValueError, match="Variant.start must be one of"):
        Variant(144, start="scratch")


def test_single_questions_in_stage_2_reach_the_upper_bound_and_the_stage_2_runs_only(cache_dir, monkeypatch):
    from atp_repro.mini import runs

    world = TINY_WORLD.replace(ub_single_every=3)
    seen = {}
    real_train = runs.train

    def spy(model, dataset, cfg, **kw):
        seen.setdefault("datasets", []).append((dataset.turns, dataset.single_every))
        return real_train(model, dataset, cfg, **kw)

    monkeypatch.setattr(runs, "train", spy)
    runs.upper_bound(world, progress=False)
    atp_finetune(world, ATP, world.train.replace(lr_atp=5e-2), progress=False, start="stage1")
    atp_finetune(world, ATP, FT, progress=False)  # a fine-tune of the finished model: single questions only
    assert seen["datasets"] == [(world.ub_turns, 3), (world.ub_turns, 3), (1, 0)]
    assert runs.upper_bound_spec(world)["ub_single_every"] == 3
    # with conversations only (0) the spec has no ub_single_every key, so artifacts trained before the
    # setting existed keep their cache keys
    assert "ub_single_every" not in runs.upper_bound_spec(TINY_WORLD.replace(ub_single_every=0))
    assert runs.MiniWorldConfig().ub_single_every == 5  # the default stage-2 data mixes single questions in
    with pytest.raises(ValueError, match="ub_single_every"):
        TINY_WORLD.replace(ub_single_every=1)
