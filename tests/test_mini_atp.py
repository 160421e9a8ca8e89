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
