"""Pairwise evaluation: sample, judgement records, annotation sessions, judges, tallies, agreement."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import signal

import numpy as np
import pandas as pd
import pytest

from atp_repro.pairwise import (
    AnnotationSession,
    JudgementError,
    ModelJudge,
    ReferenceJudge,
    draw_sample,
    load_sample,
    read_judgements,
    run_judge,
    tally_folder,
    write_sample,
)
from atp_repro.pairwise.judges import parse_choice
from atp_repro.pairwise.records import JudgementLog, judgement_path
from atp_repro.pairwise.tally import (
    agreement,
    cohen_kappa,
    fleiss_kappa,
    krippendorff_alpha,
    mean_win_rate,
    outcomes,
    tally,
    win_rate,
)


def _runs(n: int = 40) -> dict[str, pd.DataFrame]:
    idx = pd.Index(range(n), name="index")
    truth = [str(i % 3) for i in range(n)]
    base = pd.DataFrame({"question": [f"question {i} ?" for i in range(n)], "answer": truth}, index=idx)
    atp = base.assign(prediction=[t if i % 4 else "x" for i, t in enumerate(truth)])  # wrong on every 4th
    ub = base.assign(prediction=[t if i % 5 else "y" for i, t in enumerate(truth)])  # wrong on every 5th
    return {"atp": atp, "upper_bound": ub}


def _image(item) -> np.ndarray:
    return np.full((8, 8, 3), int(item.id[1:]) % 256, dtype=np.uint8)


@pytest.fixture
def folder(tmp_path):
    sample = draw_sample(_runs(), 12, seed=3, sources={"atp": {"run": "a"}, "upper_bound": {"run": "b"}})
    write_sample(sample, tmp_path / "s", _image)
    return tmp_path / "s"


# ----- sample ----------------------------------------------------------------------------------------

def test_sample_is_seeded_balanced_and_blind(folder):
    s = load_sample(folder)
    again = draw_sample(_runs(), 12, seed=3, sources={"atp": {"run": "a"}, "upper_bound": {"run": "b"}})
    assert [it.id for it in s.items] == [it.id for it in again.items]
    other = draw_sample(_runs(), 12, seed=4)
    assert [it.id for it in other.items] != [it.id for it in s.items]
    assert len({it.id for it in s.items}) == 12
    assert {it.left for it in s.items} == {"atp", "upper_bound"}  # sides are randomised
    for it in s.items:  # what the annotator sees: answers under A/B, the left one first
        a, b = it.shown
        assert a == it.answers[it.left] and b == next(v for k, v in it.answers.items() if k != it.left)
    assert s.sources["atp"]["run"] == "a" and len(s.sources["atp"]["records_sha256"]) == 64


def test_sample_bad_input():
    runs = _runs()
    with pytest.raises(ValueError, match="n must be an int from 1 to 40"):
        draw_sample(runs, 41, seed=0)
    with pytest.raises(ValueError, match="seed must be"):
        draw_sample(runs, 4, seed=-1)
    with pytest.raises(ValueError, match="same questions"):
        draw_sample({"atp": runs["atp"], "upper_bound": runs["upper_bound"].iloc[:-1]}, 4, seed=0)
    with pytest.raises(ValueError, match="missing columns"):
        draw_sample({"atp": runs["atp"].drop(columns="prediction"), "upper_bound": runs["upper_bound"]}, 4, seed=0)


def test_manifest_refuses_edits_and_changed_images(folder):
    (folder / "images" / f"{load_sample(folder).items[0].id}.png").write_bytes(b"not the image")
    with pytest.raises(ValueError, match="missing or changed"):
        load_sample(folder)
    raw = json.loads((folder / "manifest.json").read_text())
    raw["items"][0]["answers"]["atp"] = "edited"
    (folder / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="does not match its sample id"):
        load_sample(folder, check_images=False)


def test_write_sample_refuses_to_replace_another_sample(folder):
    with pytest.raises(ValueError, match="write the new sample to another folder"):
        write_sample(draw_sample(_runs(), 12, seed=5), folder, _image)


# ----- records: bad input named by file and line ----------------------------------------------------

def _line(folder, **changes):
    s = load_sample(folder)
    it = s.items[0]
    rec = {"sample": s.sample_id, "item": it.id, "judge": "H1", "kind": "human", "left": it.left, "choice": "A",
           "revision": 0, "time": "2026-12-01T00:00:00.000Z"}
    rec.update(changes)
    return json.dumps(rec) + "\n"


@pytest.mark.parametrize("second, message", [
    ({"item": "q9999"}, "line 2: unknown item 'q9999'"),
    ({}, "line 2: duplicate judgement of item"),
    ({"sample": "000000000000"}, "line 2: judgement of sample '000000000000'"),
    ({"choice": "C"}, "line 2: choice must be one of"),
    ({"judge": "H2"}, "line 2: judge 'H2' in the file of judge 'H1'"),
    ({"kind": "robot"}, "line 2: kind must be one of"),
    ({"revision": 2}, "line 2: bad revision"),
])
def test_bad_judgement_lines_are_named(folder, second, message):
    path = judgement_path(folder, "H1")
    path.parent.mkdir()
    path.write_text(_line(folder) + _line(folder, **second))
    with pytest.raises(JudgementError, match=message) as err:
        read_judgements(path, load_sample(folder))
    assert str(path) in str(err.value)


def test_malformed_line_and_wrong_side_are_named(folder):
    path = judgement_path(folder, "H1")
    path.parent.mkdir()
    s = load_sample(folder)
    path.write_text(_line(folder) + "{not json\n")
    with pytest.raises(JudgementError, match=r"H1.jsonl, line 2: not a JSON object"):
        read_judgements(path, s)
    other = {"atp": "upper_bound", "upper_bound": "atp"}[s.items[0].left]
    path.write_text(_line(folder, left=other))
    with pytest.raises(JudgementError, match="line 1: item .* was shown with"):
        read_judgements(path, s)
    path.write_text(_line(folder)[:-1].replace("}", ', "extra": 1}') + "\n")
    with pytest.raises(JudgementError, match="line 1: expected the fields"):
        read_judgements(path, s)


def test_torn_last_line_is_ignored_then_repaired(folder):
    s = load_sample(folder)
    log = JudgementLog(s, folder, "H1")
    log.record(s.items[0].id, "A")
    with open(log.path, "a") as fh:
        fh.write('{"sample": "' + s.sample_id[:5])  # a crash in the middle of a write
    with pytest.warns(UserWarning, match="line 2 is incomplete"):
        assert len(read_judgements(log.path, s)) == 1
    log.record(s.items[1].id, "B")
    assert [j.item for j in read_judgements(log.path, s)] == [s.items[0].id, s.items[1].id]


def test_revisions_keep_the_file_append_only(folder):
    s = load_sample(folder)
    log = JudgementLog(s, folder, "H1")
    first = log.record(s.items[0].id, "A")
    second = log.record(s.items[0].id, "tie")
    assert (first.revision, second.revision) == (0, 1)
    assert len(log.path.read_text().splitlines()) == 2
    assert outcomes(log.read(), s).loc[s.items[0].id] == "tie"  # the last revision counts


# ----- session: resume, skip, back, kill -------------------------------------------------------------

def test_session_resumes_at_the_first_unjudged_item(folder):
    s = AnnotationSession(folder, "H1")
    ids = [it.id for it in s.items]
    assert s.view().progress == "item 1 / 12 · 0 / 12 judged"
    s.choose("A")
    s.skip()  # item 2 stays unjudged
    s.choose("B")  # item 3
    assert s.view().item_id == ids[3]
    again = AnnotationSession(folder, "H1")
    assert again.view().item_id == ids[1] and again.judged == 2
    again.choose("tie")  # item 2, then the next unjudged after it: item 4
    assert again.view().item_id == ids[3]
    v = again.back()
    assert v.item_id == ids[2] and v.current_choice == "B"
    again.choose("A")  # a revision of item 3
    latest = {j.item: (j.choice, j.revision) for j in read_judgements(judgement_path(folder, "H1"), s.sample)}
    assert latest[ids[2]] == ("A", 1)
    assert "atp" not in repr(s.view()) and "upper_bound" not in repr(s.view())  # blind


def test_session_done_and_back(folder):
    s = AnnotationSession(folder, "H1")
    for _ in range(12):
        s.choose("tie")
    assert s.view().done and s.view().progress == "done · 12 / 12 judged"
    with pytest.raises(RuntimeError, match="every item is judged"):
        s.choose("A")
    assert s.back().item_id == s.items[-1].id
    with pytest.raises(ValueError, match="choice must be one of"):
        s.choose("maybe")


def _click_then_wait(folder, clicks):
    """An annotator driven through its buttons' callbacks, then stopped to be killed."""
    from atp_repro.pairwise.annotator import Annotator

    ann = Annotator(folder, "H1")
    for k in range(clicks):
        ann.buttons["AB"[k % 2]].click()
        (folder / "clicks_done").write_text(str(k + 1))
    os.kill(os.getpid(), signal.SIGSTOP)  # wait here to be killed


def test_killed_session_loses_nothing_and_resumes(folder):
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_click_then_wait, args=(folder, 5))
    p.start()
    for _ in range(600):
        p.join(0.1)
        if (folder / "clicks_done").exists() and (folder / "clicks_done").read_text() == "5":
            break
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    s = AnnotationSession(folder, "H1")
    ids = [it.id for it in s.items]
    assert s.judged == 5 and s.view().item_id == ids[5]
    js = read_judgements(judgement_path(folder, "H1"), s.sample)
    assert [j.item for j in js] == ids[:5] and all(j.revision == 0 for j in js)  # none lost, none twice


# ----- annotator widget logic (no browser) ------------------------------------------------------------

def test_annotator_buttons_and_keys_drive_the_session(folder):
    from atp_repro.pairwise.annotator import KEYS, Annotator

    ann = Annotator(folder, "H1")
    assert "item 1 / 12" in ann.progress.value and bytes(ann.image.value).startswith(b"\x89PNG")
    ann.buttons["A"].click()
    ann.act(KEYS["t"])
    ann.act(KEYS["ArrowLeft"])
    assert "Tie" in ann.status.value  # back shows the recorded choice
    assert [j.choice for j in read_judgements(judgement_path(folder, "H1"), ann.session.sample)] == ["A", "tie"]
    with pytest.raises(ValueError, match="must be one of A, B, tie, skip, back"):
        ann.act("C")


# ----- judges -------------------------------------------------------------------------------------------

def test_reference_judge_prefers_the_correct_answer(folder):
    s = load_sample(folder)
    run_judge(ReferenceJudge(), s, folder)
    o = outcomes(read_judgements(judgement_path(folder, "reference"), s), s)
    for it in s.items:
        ok = {k: v == it.reference for k, v in it.answers.items()}
        expected = "tie" if ok["atp"] == ok["upper_bound"] else "win" if ok["atp"] else "loss"
        assert o.loc[it.id] == expected
    before = judgement_path(folder, "reference").read_bytes()
    run_judge(ReferenceJudge(), s, folder)
    assert judgement_path(folder, "reference").read_bytes() == before  # deterministic: left as it is


def test_model_judge_parses_replies_and_names_bad_ones(folder):
    s = load_sample(folder)
    prompts = []
    judge = ModelJudge("model", lambda image, prompt: prompts.append((image, prompt)) or "Answer: B.")
    run_judge(judge, s, folder)
    assert all(img.is_file() for img, _ in prompts)
    a, b = s.items[0].shown
    assert f"Answer A: {a}" in prompts[0][1] and f"Answer B: {b}" in prompts[0][1]
    assert parse_choice("It's a TIE") == "tie" and parse_choice("A") == "A" and parse_choice("neither") is None
    with pytest.raises(ValueError, match="no A / B / tie in the reply for item"):
        run_judge(ModelJudge("m2", lambda image, prompt: "I cannot tell"), s, folder)
    with pytest.raises(ValueError, match="template must contain"):
        ModelJudge("m3", lambda i, p: "A", template="no fields")
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        ModelJudge.from_pretrained(folder / "no-such-model")


# ----- tallies and agreement: hand-worked cases ----------------------------------------------------------

def _o(*values):
    return pd.Series(list(values), index=[f"i{k}" for k in range(len(values))], dtype=object)


def test_win_rate_counts_ties_as_half():
    assert win_rate(_o("win", "tie", "loss", "win")) == pytest.approx(2.5 / 4)
    assert win_rate(_o("tie", "tie")) == 0.5
    t = tally(_o("tie", "tie", "tie"), n_resamples=200)
    assert (t["wins"], t["ties"], t["losses"], t["win_rate"], t["ci_low"], t["ci_high"]) == (0, 3, 0, 0.5, 0.5, 0.5)
    t = tally(_o(*(["win"] * 30 + ["loss"] * 10)), n_resamples=2000)
    assert t["ci_low"] < 0.75 < t["ci_high"] and t["ci_low"] > 0.55 and t["ci_high"] < 0.9
    with pytest.raises(ValueError, match="values must be in"):
        win_rate(_o("win", "draw"))


def test_mean_win_rate_over_judges():
    m = mean_win_rate({"H1": _o("win", "win", "loss", "tie"), "H2": _o("loss", "loss", "loss", "tie")},
                      n_resamples=500)
    assert m["win_rate"] == pytest.approx((2.5 / 4 + 0.5 / 4) / 2) and m["n_common"] == 4
    assert m["ci_low"] <= m["win_rate"] <= m["ci_high"]


def test_kappa_hand_worked_cases():
    unanimous = _o("win", "loss", "tie", "win")
    assert cohen_kappa(unanimous, unanimous) == pytest.approx(1.0)
    assert fleiss_kappa({"a": unanimous, "b": unanimous, "c": unanimous}) == pytest.approx(1.0)
    assert krippendorff_alpha({"a": unanimous, "b": unanimous}) == pytest.approx(1.0)
    # perfect disagreement with balanced marginals: p_o = 0, p_e = 0.5 -> kappa = -1
    assert cohen_kappa(_o("win", "loss", "win", "loss"), _o("loss", "win", "loss", "win")) == pytest.approx(-1.0)
    # all ties for everyone: chance agreement is 1, kappa undefined
    ties = _o("tie", "tie", "tie")
    assert math.isnan(cohen_kappa(ties, ties)) and math.isnan(fleiss_kappa({"a": ties, "b": ties}))
    assert math.isnan(krippendorff_alpha({"a": ties, "b": ties}))
    # a worked 2-category case: p_o = 0.75, p_e = 0.5*0.5 + 0.5*0.5 = 0.5 -> kappa = 0.5
    assert cohen_kappa(_o("win", "win", "loss", "loss"), _o("win", "loss", "loss", "loss")) == pytest.approx(0.5)
    # Fleiss, 2 raters, 4 items (win,win)(win,loss)(loss,loss)(loss,loss): P_bar = 0.75, shares 3/8, 5/8
    # -> P_e = 9/64 + 25/64 = 34/64, kappa = (0.75 - 34/64) / (1 - 34/64) = 14/30
    assert fleiss_kappa({"a": _o("win", "win", "loss", "loss"), "b": _o("win", "loss", "loss", "loss")}) == \
        pytest.approx(14 / 30)


def test_agreement_uses_items_both_judged():
    a, b = _o("win", "loss", "tie"), _o("win", "loss").rename(lambda k: k)
    frame = agreement({"H1": a, "H2": b})
    pair = frame.iloc[0]
    assert pair["judges"] == "H1 / H2" and pair["items"] == 2 and pair["agreement"] == 1.0
    assert frame.iloc[1]["judges"].startswith("all:")


def test_tally_folder_reads_every_judge_and_averages_humans(folder):
    s = load_sample(folder)
    run_judge(ReferenceJudge(), s, folder)
    for judge, choice in (("H1", "A"), ("H2", "tie")):
        log = JudgementLog(s, folder, judge)
        for it in s.items:
            log.record(it.id, choice)
    t = tally_folder(folder, n_resamples=300).set_index("judge")
    assert list(t.index) == ["H1", "H2", "reference", "Human (average)"]
    assert t.loc["H2", "win_rate"] == 0.5 and t.loc["reference", "kind"] == "automatic"
    h1 = sum(it.left == "atp" for it in s.items) / len(s.items)  # "A" wins for ATP where ATP is on the left
    assert t.loc["H1", "win_rate"] == pytest.approx(h1)
    assert t.loc["Human (average)", "win_rate"] == pytest.approx((h1 + 0.5) / 2)


def test_a_file_of_another_sample_is_refused(folder, tmp_path):
    other = write_sample(draw_sample(_runs(), 12, seed=9), tmp_path / "other", _image)
    log = JudgementLog(other, tmp_path / "other", "H1")
    log.record(other.items[0].id, "A")
    target = judgement_path(folder, "H1")
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(log.path.read_bytes())
    with pytest.raises(JudgementError, match=r"H1.jsonl, line 1: judgement of sample"):
        tally_folder(folder)


def test_model_judge_from_a_local_folder_runs_offline(tmp_path, monkeypatch):
    """A tiny LLaVA and its processor saved to disk, loaded back as a judge with the hub switched off."""
    from PIL import Image
    from transformers import CLIPImageProcessor, LlavaProcessor

    from atp_repro.mini.model import MiniModelConfig, build_model
    from atp_repro.mini.tokenizer import build_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok, cfg = build_tokenizer(), MiniModelConfig(image_size=32, patch_size=8, vision_layers=1)
    side = {"height": cfg.image_size, "width": cfg.image_size}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": cfg.image_size}, crop_size=side),
        tokenizer=tok, patch_size=cfg.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template="{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                      "<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:")
    build_model(cfg, tok).save_pretrained(tmp_path / "judge-model")
    processor.save_pretrained(tmp_path / "judge-model")
    judge = ModelJudge.from_pretrained(tmp_path / "judge-model", max_new_tokens=3)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "x.png")
    reply = judge.generate(tmp_path / "x.png", judge.prompt(draw_sample(_runs(), 1, seed=0).items[0]))
    assert judge.judge_id == "judge-model" and isinstance(reply, str) and reply.strip()
