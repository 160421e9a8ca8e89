"""Mini world: training loop, resumable checkpoints, artifact cache, evaluation (tiny configs)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from atp_repro.mini import cache
from atp_repro.mini.evaluate import (
    accuracy_by_family,
    accuracy_by_objects,
    avg_rate,
    blind_chance,
    evaluate,
    pope_metrics,
    spearman,
    token_summary,
)
from atp_repro.mini.model import MiniModelConfig
from atp_repro.mini.pretrain import PretrainConfig
from atp_repro.mini.runs import MiniWorldConfig, upper_bound
from atp_repro.mini.train import TrainConfig, batch_indices, cosine_with_warmup

TINY_MODEL = MiniModelConfig(patch_size=24, vision_hidden=32, vision_layers=2, vision_ffn=64, vision_heads=2,
                             lm_hidden=32, lm_ffn=64, lm_heads=2, lm_layers=8)
TINY_WORLD = MiniWorldConfig(model=TINY_MODEL, pretrain=PretrainConfig(steps=2, batch_size=4),
                             train=TrainConfig(steps=6, batch_size=4, n_train=24, checkpoint_every=2, trainable="lm"),
                             n_test=12)


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ATP_REPRO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_schedule_and_batches():
    assert cosine_with_warmup(0, 100, 4) == pytest.approx(0.25)
    assert cosine_with_warmup(4, 100, 4) == pytest.approx(1.0)
    assert cosine_with_warmup(100, 100, 4) == pytest.approx(0.0)
    assert batch_indices(3, 4, 10, 0) == batch_indices(3, 4, 10, 0)
    epoch0 = sum((batch_indices(s, 5, 10, 0) for s in range(2)), [])
    assert sorted(epoch0) == list(range(10))


def test_train_config_errors_name_the_parameter():
    with pytest.raises(ValueError, match="trainable"):
        TrainConfig(trainable="vision")
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="warmup_ratio"):
        TrainConfig(warmup_ratio=1.5)


def test_upper_bound_is_cached_and_deterministic(cache_dir):
    m1, _, info1 = upper_bound(TINY_WORLD, progress=False)
    assert info1.status == "built" and (info1.folder / "tokenizer").is_dir()
    assert not (info1.folder / "partial").exists()
    m2, _, info2 = upper_bound(TINY_WORLD, progress=False)
    assert info2.status == "hit" and info2.folder == info1.folder
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])
    # another config -> another artifact; same config elsewhere -> bit-identical weights
    other = TINY_WORLD.replace(train=TINY_WORLD.train.replace(seed=1))
    assert upper_bound(other, progress=False)[2].folder != info1.folder
    os.environ["ATP_REPRO_CACHE"] = str(cache_dir.parent / "cache2")
    m3, _, _ = upper_bound(TINY_WORLD, progress=False)
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m3.state_dict()[k]), k


def test_corrupted_artifact_is_detected_and_rebuilt(cache_dir):
    _, _, info = upper_bound(TINY_WORLD, progress=False)
    weights = info.folder / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    spec = info.manifest["spec"]
    with pytest.raises(cache.ArtifactError, match="checksum"):
        cache.verify_artifact(info.folder, spec)
    with pytest.warns(UserWarning, match="corrupted"):
        _, _, info2 = upper_bound(TINY_WORLD, progress=False)
    assert info2.status == "rebuilt"
    cache.verify_artifact(info2.folder, spec)


def test_mismatched_manifest_is_reported(cache_dir):
    _, _, info = upper_bound(TINY_WORLD, progress=False)
    manifest = json.loads((info.folder / "manifest.json").read_text())
    manifest["spec"]["train"]["lr_lm"] = 123.0
    (info.folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(cache.ArtifactError, match="does not match"):
        cache.verify_artifact(info.folder, info.manifest["spec"])
    with pytest.raises(cache.ArtifactError):
        cache.load_or_build("upper_bound", info.manifest["spec"], lambda f: None, rebuild_corrupt=False)


def test_interrupted_training_resumes_to_identical_weights(cache_dir, monkeypatch):
    from atp_repro.mini import runs
    from atp_repro.mini import train as train_mod

    reference, _, _ = upper_bound(TINY_WORLD, progress=False)
    ref = _state(reference)
    monkeypatch.setenv("ATP_REPRO_CACHE", str(cache_dir.parent / "cache_resume"))

    real_train = train_mod.train

    def interrupted(*a, **kw):
        def stop(step, loss):
            if step == 3:
                raise KeyboardInterrupt

        return real_train(*a, on_step=stop, **kw)

    monkeypatch.setattr(runs, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        upper_bound(TINY_WORLD, progress=False)
    folder = cache.artifact_dir("upper_bound", runs.upper_bound_spec(TINY_WORLD))
    assert (folder / "partial" / "checkpoint.pt").exists() and not (folder / "manifest.json").exists()
    monkeypatch.setattr(runs, "train", real_train)
    resumed, _, info = upper_bound(TINY_WORLD, progress=False)
    assert info.manifest["resumed_from"] == 2  # last checkpoint before the interruption
    for k, v in ref.items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_data_fingerprint_follows_generated_data_not_configs(monkeypatch):
    """A change to question wording keeps every config field, so only the data fingerprint sees it."""
    from atp_repro.mini import questions, runs

    before = runs.upper_bound_spec(TINY_WORLD)
    tower = runs.vision_spec(TINY_WORLD)
    assert runs.upper_bound_spec(TINY_WORLD) == before  # deterministic
    reworded = questions.GENERATORS["scene"]

    def scene_question(scene, rng):
        q = reworded(scene, rng)
        return questions.Question(q.family, q.subtype, q.question.replace("what", "which"), q.answer)

    monkeypatch.setitem(questions.GENERATORS, "scene", scene_question)
    after = runs.upper_bound_spec(TINY_WORLD)
    assert after["data"] != before["data"]
    assert cache.spec_hash(after) != cache.spec_hash(before)
    assert runs.vision_spec(TINY_WORLD) == tower  # the tower never sees a question: it is reused


def test_pretraining_fingerprint_follows_the_towers_targets(monkeypatch):
    from atp_repro.mini import runs

    before = runs.vision_spec(TINY_WORLD)
    real = runs.scene_targets

    def no_centre_targets(index, grid, scene_cfg, world_seed=0):
        pixels, targets = real(index, grid, scene_cfg, world_seed)
        return pixels, {**targets, "centre": torch.zeros_like(targets["centre"])}

    monkeypatch.setattr(runs, "scene_targets", no_centre_targets)
    after = runs.vision_spec(TINY_WORLD)
    assert after["data"] != before["data"]
    assert runs.upper_bound_spec(TINY_WORLD)["vision"] == cache.spec_hash(after)  # a new tower, a new U.B.


def test_atp_finetune_does_not_depend_on_the_global_rng(cache_dir):
    """A fine-tune is the same whatever ran before it in the process (cold vs warm cache)."""
    from atp_repro import ATPConfig
    from atp_repro.mini import runs

    atp_cfg = ATPConfig(module_layers=(0, 3, 5), grid_strides=(2,))
    train_cfg = TrainConfig(steps=2, batch_size=2, n_train=4, lr_atp=1e-2)
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model, _, info = runs.atp_finetune(TINY_WORLD, atp_cfg, train_cfg, progress=False)
        states.append(model.state_dict())
        shutil.rmtree(info.folder)
    for k, v in states[0].items():
        assert torch.equal(v, states[1][k]), k


def test_corrupted_partial_checkpoint_restarts(cache_dir, monkeypatch):
    from atp_repro.mini import runs
    from atp_repro.mini import train as train_mod

    real_train = train_mod.train

    def interrupted(*a, **kw):
        def stop(step, loss):
            if step == 4:
                raise KeyboardInterrupt

        return real_train(*a, on_step=stop, **kw)

    monkeypatch.setattr(runs, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        upper_bound(TINY_WORLD, progress=False)
    ckpt = cache.artifact_dir("upper_bound", runs.upper_bound_spec(TINY_WORLD)) / "partial" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:-100])
    monkeypatch.setattr(runs, "train", real_train)
    with pytest.warns(UserWarning, match="checksum"):
        _, _, info = upper_bound(TINY_WORLD, progress=False)
    assert info.manifest["resumed_from"] == 0


@pytest.mark.slow
def test_sigkill_midway_then_rerun_resumes(tmp_path):
    """A real kill -9 of a training process, then a second process finishes from the checkpoint."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        os.environ["ATP_REPRO_CACHE"] = {str(tmp_path / "cache")!r}
        from tests.test_mini_training import TINY_WORLD
        from atp_repro.mini.runs import upper_bound
        w = TINY_WORLD.replace(train=TINY_WORLD.train.replace(steps=400, checkpoint_every=5))
        _, _, info = upper_bound(w, progress=False)
        print("RESUMED_FROM", info.manifest["resumed_from"])
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "cache").glob("*/partial/checkpoint.meta")):
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list((tmp_path / "cache").glob("*/partial/checkpoint.pt"))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
    assert int(out.split("RESUMED_FROM")[1].split()[0]) > 0


def test_evaluate_upper_bound_records(cache_dir):
    model, tok, _ = upper_bound(TINY_WORLD, progress=False)
    ds = TINY_WORLD.dataset("test", tokenizer=tok)
    res = evaluate(model, ds, batch_size=5)
    assert len(res.records) == 12 and res.kept.shape == (12, 8)
    assert (res.kept == 16).all() and res.tokens()["fraction_of_grid"] == 1.0
    again = evaluate(model, ds, batch_size=3)
    pd.testing.assert_frame_equal(res.records, again.records)  # batch size does not change answers
    table = res.by_family()
    assert list(table.columns) == ["n", "accuracy", "chance"] and table["n"].sum() == 12


def test_metrics():
    rec = pd.DataFrame({"family": ["a"] * 4 + ["b"] * 2, "question": ["q", "q", "q", "r", "s", "s"],
                        "answer": ["x", "x", "y", "z", "1", "2"], "correct": [1, 1, 0, 1, 1, 0]})
    ch = blind_chance(rec)
    assert ch["a"] == pytest.approx(0.75) and ch["b"] == pytest.approx(0.5)
    assert avg_rate(pd.Series({"a": 0.5, "b": 1.0}), pd.Series({"a": 1.0, "b": 1.0})) == pytest.approx(0.75)
    t = token_summary(np.full((3, 8), 36), 12)
    assert t["fraction_of_grid"] == pytest.approx(0.25) and t["tokens_576_equiv"] == pytest.approx(144)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
    _ = accuracy_by_family


def test_pope_metrics_pair_positives_with_each_negative_setting():
    # 4 positives (3 answered yes), 2 random negatives (0 yes), 2 adversarial negatives (2 yes); other families ignored.
    rec = pd.DataFrame({
        "family": ["existence"] * 8 + ["text"],
        "subtype": ["positive"] * 4 + ["random"] * 2 + ["adversarial"] * 2 + ["read"],
        "prediction": ["yes", "yes", "yes", "no", "no", "no", "yes", "yes", "yes"],
    })
    m = pope_metrics(rec).set_index("setting")
    assert m.loc["random"].tolist() == pytest.approx([6, 5 / 6, 1.0, 0.75, 2 * 0.75 / 1.75, 0.5, 0.0, 0.75])
    adv = m.loc["adversarial"]
    assert adv.precision == pytest.approx(0.6) and adv.fpr == 1.0 and adv.yes_gap == pytest.approx(-0.25)
    assert m.loc["all", "n"] == 8 and m.loc["all", "yes_ratio"] == pytest.approx(5 / 8)
    # An image-blind model that always says "yes": recall = false-positive rate, no gap.
    blind = pope_metrics(rec.assign(prediction="yes")).set_index("setting")
    assert (blind.yes_gap == 0).all() and (blind.yes_ratio == 1).all()
    assert pope_metrics(rec[rec.family == "text"]).empty


def test_accuracy_by_objects_splits_each_family_by_scene_size():
    # existence: a 1-object scene (right) and two 4-object scenes (one right); spatial: a 2-object scene (wrong).
    rec = pd.DataFrame({"family": ["existence"] * 3 + ["spatial"], "n_objects": [1, 4, 5, 2],
                        "question": ["is there a red circle ?"] * 3 + ["where ?"],
                        "answer": ["yes", "no", "no", "left"], "correct": [True, True, False, False],
                        "mean_tokens": [10.0, 30.0, 50.0, 20.0]})
    t = accuracy_by_objects(rec).set_index(["family", "objects"])
    assert list(t.index) == [("existence", "1"), ("existence", "4-5"), ("spatial", "2-3")]  # empty cells left out
    assert t.loc[("existence", "4-5")].tolist() == pytest.approx([2, 0.5, 1.0, 40.0])  # blind prior: always "no"
    assert t.loc[("spatial", "2-3"), "accuracy"] == 0.0
    coarse = accuracy_by_objects(rec, buckets=((0, 3), (4, 10)))
    assert coarse["n"].tolist() == [1, 2, 1] and coarse["objects"].tolist() == ["0-3", "4-10", "0-3"]
    with pytest.raises(ValueError, match=r"do not cover n_objects \[4, 5\]"):
        accuracy_by_objects(rec, buckets=((1, 3),))
    with pytest.raises(ValueError, match="buckets must be increasing"):
        accuracy_by_objects(rec, buckets=((2, 3), (1, 1)))


def test_above_chance_needs_every_family_clear_of_its_prior():
    from atp_repro.mini.evaluate import EvalResult
    from atp_repro.mini.experiments import above_chance

    # family counting: chance 0.5 (answers 2, 3 equally common); family scene: chance 1.0 (one answer)
    rec = pd.DataFrame({"family": ["counting"] * 4 + ["scene"] * 2, "question": ["q"] * 4 + ["s"] * 2,
                        "answer": ["2", "2", "3", "3", "dots", "dots"], "correct": [1, 1, 1, 1, 1, 1]})
    holds, evidence = above_chance(EvalResult(rec, np.zeros((6, 8)), 12, 0.0), margin=0.15)
    assert not holds and "scene 1.00 vs 1.00" in evidence  # counting clears its prior, scene cannot
    holds, _ = above_chance(EvalResult(rec[rec.family == "counting"], np.zeros((4, 8)), 12, 0.0), margin=0.15)
    assert holds


def test_cache_atomic_write(tmp_path):
    p = tmp_path / "x" / "f.bin"
    cache.atomic_write_bytes(p, b"abc")
    assert p.read_bytes() == b"abc" and not [q for q in p.parent.iterdir() if q.name.endswith(".tmp")]
    assert cache.spec_hash({"a": 1, "b": 2}) == cache.spec_hash({"b": 2, "a": 1})


def test_cli_train_and_eval_are_registered():
    from atp_repro.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "--stage", "atp", "--frozen-lm", "--tokens-576", "88", "--steps", "5"])
    assert args.stage == "atp" and args.frozen_lm and args.tokens_576 == 88 and args.steps == 5
    args = parser.parse_args(["eval", "--n-test", "12", "--out", "x.csv"])
    assert args.stage == "upper-bound" and args.n_test == 12
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--stage", "lora"])


def test_rate_over_above_chance_families_ignores_families_at_their_prior():
    from atp_repro.mini.evaluate import EvalResult
    from atp_repro.mini.experiments import families_above_chance, summary_row

    # counting: chance 0.5, the upper bound gets all 4 right; scene: a single answer, chance 1.0.
    fam = ["counting"] * 4 + ["scene"] * 2
    ub = pd.DataFrame({"index": range(6), "family": fam, "question": ["q"] * 4 + ["s"] * 2, "subtype": "x",
                       "answer": ["2", "2", "3", "3", "dots", "dots"], "correct": [True] * 6, "mean_tokens": 36.0,
                       "complexity": range(6), "n_elements": range(6), "busy_fraction": 0.5})
    run = ub.assign(correct=[True, True, True, False, False, False])  # counting 0.75, scene 0.0
    ub_res, run_res = EvalResult(ub, np.zeros((6, 8)), 12, 0.0), EvalResult(run, np.full((6, 8), 36.0), 12, 0.0)
    assert families_above_chance(ub_res) == ["counting"]
    row = summary_row("r", run_res, ub_res)
    assert row["avg_rate"] == pytest.approx((0.75 + 0.0) / 2)
    assert row["avg_rate_above_chance"] == pytest.approx(0.75)


def _records(correct: list[bool], family: str = "counting") -> pd.DataFrame:
    return pd.DataFrame({"index": range(len(correct)), "family": family, "correct": correct})


def test_avg_rate_interval_is_a_point_when_the_runs_agree_and_widens_with_fewer_questions():
    from atp_repro.mini.evaluate import avg_rate_interval

    rng = np.random.default_rng(0)
    ub = rng.random(3000) < 0.8
    run = ub & (rng.random(3000) < 0.9)  # the run loses 10% of the upper bound's right answers
    assert avg_rate_interval(_records(list(ub)), _records(list(ub))) == (1.0, 1.0)  # paired: no spread
    low, high = avg_rate_interval(_records(list(run)), _records(list(ub)))
    assert low < run.sum() / ub.sum() < high and high - low < 0.03
    low_s, high_s = avg_rate_interval(_records(list(run[:300])), _records(list(ub[:300])))
    assert high_s - low_s > 2 * (high - low)  # 10x fewer questions: about sqrt(10) x wider
    assert avg_rate_interval(_records(list(run)), _records(list(ub)), seed=1) != (low, high)
    assert avg_rate_interval(_records(list(run)), _records(list(ub))) == (low, high)  # seeded


def test_avg_rate_interval_rejects_mismatched_test_sets_and_bad_levels():
    from atp_repro.mini.evaluate import avg_rate_interval

    with pytest.raises(ValueError, match="same test set"):
        avg_rate_interval(_records([True] * 4), _records([True] * 6))
    with pytest.raises(ValueError, match="level"):
        avg_rate_interval(_records([True] * 4), _records([True] * 4), level=95)


def test_keep_all_control_is_the_main_run_with_every_token_kept():
    from atp_repro.mini.experiments import VARIANTS, Setup

    setup = Setup.load()
    main, control = (setup.atp_config(VARIANTS[v]) for v in ("trainable_144", "trainable_keep_all"))
    assert main.fixed_keep is None
    assert control.fixed_keep == (setup.grid ** 2,) * len(main.module_layers)
    assert control.replace(fixed_keep=None) == main
    assert setup.train_config(VARIANTS["trainable_keep_all"]) == setup.train_config(VARIANTS["trainable_144"])


def test_grid_step_costs_time_every_stage_and_predict_from_the_config_step_counts():
    from atp_repro.mini.grid_cost import grid_step_costs
    from atp_repro.mini.pretrain import PretrainConfig
    from atp_repro.mini.runs import MiniWorldConfig
    from atp_repro.mini.train import TrainConfig

    world = MiniWorldConfig(pretrain=PretrainConfig(steps=40, batch_size=2),
                            train=TrainConfig(trainable="lm", steps=30, batch_size=2, n_train=60),
                            ub_turns=2, n_test=90)
    costs = grid_step_costs(world, grids=(6, 12), repeats=1, eval_questions=2)
    assert list(costs["grid"]) == [6, 12] and list(costs["vision_tokens"]) == [36, 144]
    for s in costs.itertuples():
        assert s.tower_step_s > 0 and s.ub_step_s > 0 and s.eval_question_s > 0
        assert s.tower_min == pytest.approx(s.tower_step_s * 40 / 60)
        assert s.ub_min == pytest.approx(s.ub_step_s * 30 / 60)
        assert s.eval_min == pytest.approx(s.eval_question_s * 90 / 60)


def test_grid_world_rejects_a_grid_that_does_not_divide_the_canvas():
    from atp_repro.mini.grid_cost import grid_world
    from atp_repro.mini.runs import MiniWorldConfig

    assert grid_world(MiniWorldConfig(), 24).model.patch_size == 4
    with pytest.raises(ValueError, match=r"grid must divide the 96 px canvas.*got 10"):
        grid_world(MiniWorldConfig(), 10)


def test_rate_difference_interval_is_paired_and_signed():
    from atp_repro.mini.evaluate import avg_rate_interval, rate_difference_interval

    rng = np.random.default_rng(1)
    ub = rng.random(3000) < 0.8
    better = ub & (rng.random(3000) < 0.95)
    worse = better & (rng.random(3000) < 0.95)  # loses 5% of the better run's right answers
    d, lo, hi = rate_difference_interval(_records(list(better)), _records(list(worse)), _records(list(ub)))
    assert 0 < lo < d < hi
    # Paired: the difference is known much better than either rate alone would suggest.
    a_lo, a_hi = avg_rate_interval(_records(list(better)), _records(list(ub)))
    assert hi - lo < 0.8 * (a_hi - a_lo) * 2 ** 0.5
    d2, lo2, hi2 = rate_difference_interval(_records(list(worse)), _records(list(better)), _records(list(ub)))
    assert d2 == pytest.approx(-d) and hi2 < 0
    assert rate_difference_interval(_records(list(ub)), _records(list(ub)), _records(list(ub))) == (0.0, 0.0, 0.0)


def test_interval_claims_hold_fail_or_are_inconclusive():
    from atp_repro.paper import Claim, claims_frame

    assert Claim.from_interval("x", 0.5, 1.0).verdict == "holds"
    assert Claim.from_interval("x", -1.0, 0.0).verdict == "does not hold"
    inconclusive = Claim.from_interval("x", -0.5, 0.5)
    assert inconclusive.verdict == "inconclusive" and inconclusive.holds is None
    assert Claim.from_interval("x", 0.96, 0.99, threshold=0.95).holds is True
    assert Claim.from_interval("x", float("nan"), 1.0).verdict == "inconclusive"
    assert list(claims_frame([inconclusive])["verdict"]) == ["inconclusive"]
    with pytest.raises(ValueError, match="inconclusive"):
        Claim("x", True, inconclusive=True)


def test_within_and_all_of_claims():
    from atp_repro.paper import Claim

    assert Claim.within("x", -1.0, 2.0, 3.0).verdict == "holds"
    assert Claim.within("x", 3.5, 5.0, 3.0).verdict == "does not hold"
    assert Claim.within("x", -5.0, -3.0, 3.0).verdict == "does not hold"
    assert Claim.within("x", 2.0, 4.0, 3.0).verdict == "inconclusive"
    yes, no, maybe = Claim("a", True), Claim("b", False), Claim.from_interval("c", -1, 1)
    assert Claim.all_of("x", [yes, yes]).verdict == "holds"
    assert Claim.all_of("x", [yes, maybe]).verdict == "inconclusive"
    assert Claim.all_of("x", [maybe, no, yes]).verdict == "does not hold"
    with pytest.raises(ValueError, match="at least one"):
        Claim.all_of("x", [])


def test_calibrated_finetune_starts_at_its_budget(cache_dir):
    from atp_repro import ATPConfig
    from atp_repro.mini import runs

    train_cfg = TrainConfig(steps=2, batch_size=2, n_train=4, lr_atp=1e-2)
    for n_target in (4.0, 8.0):  # of 16 tokens (grid 4): two budgets, two different starts
        atp_cfg = ATPConfig(module_layers=(0, 3, 5), grid_strides=(2,), n_target=n_target, init_calibration="target")
        _, _, info = runs.atp_finetune(TINY_WORLD, atp_cfg, train_cfg, progress=False)
        report = info.manifest["calibration"]
        assert abs(report["kept"][0] - report["target"][0]) <= 1.0
        assert len(info.manifest["tokens_per_step"]) == train_cfg.steps
    # The keep-all control is never calibrated: its modules keep a fixed count.
    control = ATPConfig(module_layers=(0, 3, 5), grid_strides=(2,), init_calibration="target", fixed_keep=(4, 4, 4))
    _, _, info = runs.atp_finetune(TINY_WORLD, control, train_cfg, progress=False)
    assert info.manifest["calibration"] is None


def test_table6_rows_keep_the_papers_relative_lambdas():
    from atp_repro import paper
    from atp_repro.mini.experiments import (
        SWEEP_LAMBDA_SCALE,
        TABLE6_LAMBDAS,
        VARIANTS,
        Setup,
        lambda_sweep_variant,
    )

    setup = Setup.load()
    scale_atp, scale_target = setup.lambda_scale()
    # The sweep's rows are the paper's rows, in its order (the numbers file names each row by its lambdas).
    reported = paper.load_paper_numbers("supp_table6").pivot(index="row", columns="column", values="value")
    assert [tuple(reported.loc[f"N_target=130, lambda_ATP={a:g}, lambda_target={t:g}", ["lambda_ATP", "lambda_target"]])
            for a, t in TABLE6_LAMBDAS] == list(TABLE6_LAMBDAS)
    assert len(reported) == len(TABLE6_LAMBDAS)
    rows = [setup.atp_config(lambda_sweep_variant(a, t)) for a, t in TABLE6_LAMBDAS]
    for (a, t), row in zip(TABLE6_LAMBDAS, rows, strict=True):
        assert row.lambda_atp == pytest.approx(a * SWEEP_LAMBDA_SCALE * scale_atp)
        assert row.lambda_target == pytest.approx(t * SWEEP_LAMBDA_SCALE * scale_target)
    main = setup.atp_config(VARIANTS["trainable_144"])
    # Row 2 is the paper's main setting: the main run's lambdas times the sweep's factor, nothing else changed.
    assert rows[1].lambda_atp == pytest.approx(main.lambda_atp * SWEEP_LAMBDA_SCALE)
    assert rows[1].lambda_target == pytest.approx(main.lambda_target * SWEEP_LAMBDA_SCALE)
    assert rows[1].replace(lambda_atp=main.lambda_atp, lambda_target=main.lambda_target) == main
    # Relative lambdas are the paper's: row 1 / row 2 = 10 (lambda_ATP) and 5 (lambda_target); row 3 halves lambda_ATP.
    assert rows[0].lambda_atp / rows[1].lambda_atp == pytest.approx(10.0)
    assert rows[0].lambda_target / rows[1].lambda_target == pytest.approx(5.0)
    assert rows[2].lambda_atp / rows[1].lambda_atp == pytest.approx(0.5)
    assert rows[3].lambda_target / rows[1].lambda_target == pytest.approx(0.005)
    # The factor is a real scaling (the reason is measured at 0.15; 1 would leave rows 2 and 3 on the target).
    assert 0 < SWEEP_LAMBDA_SCALE < 1
    # scale 1 runs the paper's lambdas: row 2 is then the main run itself; numpy scalars are numbers too.
    assert setup.atp_config(lambda_sweep_variant(0.1, 0.2, scale=1.0)) == main
    numpy_row = lambda_sweep_variant(np.float32(0.5), 1, scale=np.int64(1))
    assert numpy_row.atp == (("lambda_atp", 0.5), ("lambda_target", 1.0))
    for bad in ({"scale": 0.0}, {"scale": -1.0}, {"scale": float("nan")}, {"scale": True}, {"lambda_atp": -0.1},
                {"lambda_target": float("inf")}, {"lambda_atp": "0.1"}):
        args = {"lambda_atp": 0.1, "lambda_target": 0.2, **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            lambda_sweep_variant(**args)
    base_seed = setup.train_config(VARIANTS["trainable_144"]).seed
    assert setup.train_config(VARIANTS["trainable_144"], seed=2).seed == base_seed + 2
    with pytest.raises(ValueError, match="seed"):
        setup.finetune("trainable_144", seed=-1)


def test_interrupted_tower_pretraining_resumes_to_identical_weights(cache_dir, monkeypatch):
    from atp_repro.mini import pretrain as pretrain_mod
    from atp_repro.mini import runs

    world = TINY_WORLD.replace(pretrain=PretrainConfig(steps=6, batch_size=2))
    reference, _ = runs.pretrained_vision(world, progress=False)
    monkeypatch.setenv("ATP_REPRO_CACHE", str(cache_dir.parent / "cache_resume"))
    real = pretrain_mod.pretrain_vision_tower

    def interrupted(*a, **kw):
        def stop(done):
            if done == 4:
                raise KeyboardInterrupt

        return real(*a, on_step=stop, checkpoint_every=3, **{k: v for k, v in kw.items() if k != "checkpoint_every"})

    monkeypatch.setattr(runs, "pretrain_vision_tower", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runs.pretrained_vision(world, progress=False)
    folder = cache.artifact_dir("vision_pretrain", runs.vision_spec(world))
    assert (folder / "partial" / "checkpoint.pt").exists() and not (folder / "manifest.json").exists()
    monkeypatch.setattr(runs, "pretrain_vision_tower",
                        lambda *a, **kw: real(*a, checkpoint_every=3, **kw))
    resumed, info = runs.pretrained_vision(world, progress=False)
    assert info.manifest["resumed_from"] == 3  # the last checkpoint before the interruption
    assert not (folder / "partial").exists()
    for k, v in reference.items():
        assert torch.equal(v, resumed[k]), k
