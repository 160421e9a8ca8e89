"""Real-scale evaluation path without lmms-eval: generation, the offline harness, result files, retention."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from atp_repro.atp import ATPConfig, apply_atp, save_atp
from atp_repro.atp.tiny import tiny_llava, tiny_processor
from atp_repro.real import evaluation
from atp_repro.real.evaluation import (
    AVG_RATE,
    build_prompt,
    evaluate_benchmark_file,
    generate_answers,
    generate_detailed,
    generation_settings,
    read_lmms_eval_results,
    register_lmms_eval_model,
    retention_report,
    retention_table,
)

GRID = 4  # tiny_llava: image size GRID * 4, patch 4 -> GRID * GRID = 16 vision tokens
QUESTIONS = ("w5 w6 w7", "w9 w10")


def make_processor():
    return tiny_processor(tiny_llava(num_layers=4, grid=GRID))


@pytest.fixture(scope="module")
def processor():
    return make_processor()


@pytest.fixture(scope="module")
def stock():
    return tiny_llava(num_layers=4, grid=GRID)


def images() -> list[Image.Image]:
    first = Image.new("RGB", (20, 24), (200, 30, 30))
    second = Image.new("RGB", (16, 16), (10, 10, 10))
    for x in range(0, 16, 2):
        second.putpixel((x, x), (250, 250, 250))
    return [first, second]


@pytest.fixture(scope="module")
def bench(tmp_path_factory, stock, processor):
    """Two-item JSONL benchmark: item 0's answer is the stock model's own answer, item 1's is wrong."""
    root = tmp_path_factory.mktemp("bench")
    (root / "img").mkdir()
    for i, image in enumerate(images()):
        image.save(root / "img" / f"{i}.png")
    with Image.open(root / "img" / "0.png") as image:
        first = generate_answers(stock, processor, [(QUESTIONS[0], evaluation.DEFAULT_HARNESS_GEN_KWARGS,
                                                     [image.convert("RGB")])])[0]
    assert first  # the random model says something
    items = [{"id": "q0", "image": "0.png", "question": QUESTIONS[0], "answer": first.upper() + " ."},
             {"id": "q1", "image": "1.png", "question": QUESTIONS[1], "answer": ["not", "this either"]}]
    (root / "bench.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return root


def atp_copy(model, keep: int):
    return apply_atp(copy.deepcopy(model), ATPConfig(module_layers=(1,), fixed_keep=(keep,)))


# -- (a) generation and the offline harness --------------------------------------------------------


def test_prompt_fallback_and_chat_template(processor):
    assert build_prompt(processor, "w5 w6", 1) == "USER: <image>\nw5 w6 ASSISTANT:"
    assert build_prompt(processor, "<image>\nw5", 1) == "USER: <image>\nw5 ASSISTANT:"  # no second placeholder
    assert build_prompt(processor, "w5", 0) == "USER: w5 ASSISTANT:"
    templated = copy.deepcopy(processor)
    templated.chat_template = (
        "{% for m in messages %}T USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}"
        "{% endfor %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
        "{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}")
    assert build_prompt(templated, "w5 w6", 1) == "T USER: <image>\nw5 w6 ASSISTANT:"


def test_generation_kwargs_batching_and_stop_strings(stock, processor):
    requests = [(q, {"max_new_tokens": 3, "temperature": 0}, [im]) for q, im in zip(QUESTIONS, images())]
    one = generate_detailed(stock, processor, requests, batch_size=1)
    two = generate_detailed(stock, processor, requests, batch_size=2)  # left-padded batch of two prompts
    assert [g.text for g in one] == [g.text for g in two]
    assert [g.vision_tokens for g in one] == [g.vision_tokens for g in two] == [GRID * GRID] * 2
    first_word = one[0].text.split()[0]
    cut = generate_answers(stock, processor, [(QUESTIONS[0], {"max_new_tokens": 3, "until": [first_word]},
                                               [images()[0]])])
    assert cut == [""]
    for bad, name in (({"temperature": -1}, "temperature"), ({"max_new_tokens": 0}, "max_new_tokens"),
                      ({"until": 3}, "until"), ({"num_beams": 0}, "num_beams")):
        with pytest.raises(ValueError, match=name):
            generation_settings(bad)
    assert not generation_settings({"temperature": 0, "do_sample": True}).do_sample  # temperature 0 is greedy
    with pytest.raises(ValueError, match="batch_size"):
        generate_answers(stock, processor, requests, batch_size=0)


def test_harness_writes_result_files_read_back_for_stock_and_atp(stock, processor, bench, tmp_path):
    def run(model, name):
        return evaluate_benchmark_file(model, processor, bench / "bench.jsonl", bench / "img", "gqa", tmp_path / name)

    ub = run(stock, "ub")
    assert ub.score == 0.5 and ub.num_samples == 2 and ub.vision_tokens == GRID * GRID
    assert ub.results_path == tmp_path / "ub" / "gqa_results.json" and ub.samples_path.is_file()

    keep_all = run(atp_copy(stock, GRID * GRID), "atp_all")
    assert keep_all.predictions == ub.predictions and keep_all.score == ub.score
    assert keep_all.vision_tokens == GRID * GRID

    small = run(atp_copy(stock, 4), "atp_small")
    # 4 decoder layers, module after layer 1: 16, 16, 4, 4 tokens -> 10 on average (the paper's "Token")
    assert small.vision_tokens == pytest.approx((2 * 16 + 2 * 4) / 4)
    assert small.vision_tokens < ub.vision_tokens

    scores = read_lmms_eval_results(tmp_path / "ub")
    assert dict(scores) == {"GQA": pytest.approx(50.0)} and scores.tokens == {"GQA": GRID * GRID}
    assert scores.files["GQA"] == ub.results_path
    assert dict(read_lmms_eval_results(ub.results_path, scale="raw")) == {"GQA": pytest.approx(0.5)}
    document = json.loads(small.results_path.read_text())
    assert document["model_args"]["atp"]["fixed_keep"] == [4]
    assert document["n-samples"] == {"gqa": {"original": 2, "effective": 2}}

    df = retention_report(tmp_path / "ub", tmp_path / "atp_small", tmp_path / "table.csv")
    assert df.loc["GQA", "retention_%"] == pytest.approx(100 * small.score / ub.score)
    assert df.attrs["tokens"]["pruned"]["GQA"] == pytest.approx(10.0)
    assert pd.read_csv(tmp_path / "table.csv", index_col=0).index.tolist() == ["GQA", AVG_RATE]


def test_harness_rejects_bad_items(stock, processor, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": 1, "image": "0.png", "question": "w5"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: missing key\(s\) \['answer'\]"):
        evaluate_benchmark_file(stock, processor, bad, tmp_path, "gqa", tmp_path)
    with pytest.raises(ValueError, match="task_name"):
        evaluate_benchmark_file(stock, processor, bad, tmp_path, "../gqa", tmp_path)


# -- (b) retention arithmetic on lmms-eval-layout files ----------------------------------------------


def lmms_eval_file(path: Path, results: dict) -> Path:
    """A result file in lmms-eval's layout (the fields its evaluator writes next to "results")."""
    tasks = sorted(results)
    document = {"results": {t: {"alias": t, **m} for t, m in results.items()},
                "group_subtasks": {t: [] for t in tasks}, "configs": {t: {"task": t} for t in tasks},
                "versions": {t: 0.0 for t in tasks}, "n-shot": {t: 0 for t in tasks},
                "higher_is_better": {t: {} for t in tasks},
                "n-samples": {t: {"original": 10, "effective": 10} for t in tasks},
                "config": {"model": "llava_hf"}, "date": 1700000000.0}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def test_retention_table_from_lmms_eval_files(tmp_path):
    ub_dir = tmp_path / "ub"
    lmms_eval_file(ub_dir / "llava" / "20240301_101500_results.json", {
        "gqa": {"exact_match,none": 0.62, "exact_match_stderr,none": 0.004},
        "mme": {"mme_perception_score,none": 1510.7, "mme_perception_score_stderr,none": "N/A",
                "mme_cognition_score,none": 350.0},
        "pope": {"pope_accuracy,none": 0.87, "pope_f1_score,none": 0.858},
        "scienceqa_img": {"exact_match,none": 0.0},
        "vqav2_test": {"submission,none": None},
    })
    older = lmms_eval_file(ub_dir / "llava" / "20230101_000000_results.json", {"gqa": {"exact_match,none": 0.1}})
    (ub_dir / "submissions").mkdir()
    not_results = ub_dir / "submissions" / "mmbench_en_dev_results.json"
    not_results.write_text(json.dumps({"overall_acc": 0.64, "category_acc": {}}))
    pruned_file = lmms_eval_file(tmp_path / "pruned" / "20240302_090000_results.json", {
        "gqa": {"exact_match,none": 0.595},
        "mme": {"mme_perception_score,none": 1473.9},
        "scienceqa_img": {"exact_match,none": 0.5},
        "seedbench": {"seed_image,none": 0.573, "seed_all,none": 0.55},
        "textvqa_val": {"exact_match,none": 0.5},
    })

    ub = read_lmms_eval_results(ub_dir)
    assert dict(ub) == {"GQA": pytest.approx(62.0), "MME": pytest.approx(1510.7), "POPE": pytest.approx(85.8),
                        "SQA-I": 0.0}
    assert ub.superseded == [older] and "took the newest" in ub.note and str(older) in ub.note
    assert ub.ignored == [not_results] and "VQAv2" in ub.unscored
    pruned = read_lmms_eval_results(pruned_file)
    assert pruned["SEED"] == pytest.approx(57.3) and pruned.unmatched_tasks == ["textvqa_val"]

    df = retention_table(ub, pruned)
    assert df.index.tolist() == ["GQA", "MME", "POPE", "SEED", "SQA-I", AVG_RATE]
    gqa, mme = 100 * 59.5 / 62.0, 100 * 1473.9 / 1510.7
    assert df.loc["GQA", "retention_%"] == pytest.approx(gqa)
    assert df.loc["MME", "retention_%"] == pytest.approx(mme)
    assert df.loc[AVG_RATE, "retention_%"] == pytest.approx((gqa + mme) / 2) == df.attrs["avg_rate"]
    assert math.isnan(df.loc["POPE", "retention_%"]) and math.isnan(df.loc["SEED", "upper_bound"])
    assert math.isnan(df.loc["SQA-I", "retention_%"])  # upper bound 0: NaN, not a crash
    assert df.attrs["missing"] == ["POPE", "SEED"] and df.attrs["missing_from"]["POPE"] == "pruned"
    assert df.attrs["zero_upper_bound"] == ["SQA-I"] and df.attrs["averaged"] == ["GQA", "MME"]
    assert math.isnan(df.loc[AVG_RATE, "upper_bound"])

    raw = retention_table(read_lmms_eval_results(ub_dir, scale="raw"), read_lmms_eval_results(pruned_file, scale="raw"))
    assert raw.loc[AVG_RATE, "retention_%"] == pytest.approx(df.loc[AVG_RATE, "retention_%"])  # scale-free
    only = retention_table({"GQA": 60.0}, {"GQA": 30.0, "MME": None}, benchmarks=["MME", "GQA"])
    assert only.index.tolist() == ["MME", "GQA", AVG_RATE] and only.loc[AVG_RATE, "retention_%"] == 50.0
    with pytest.raises(ValueError, match="benchmarks"):
        retention_table({}, {}, benchmarks=["GQA", "GQA"])
    with pytest.raises(ValueError, match=r"pruned\['GQA'\]"):
        retention_table({"GQA": 1.0}, {"GQA": "high"})


def test_newest_run_by_modification_time_without_name_stamps(tmp_path):
    old = lmms_eval_file(tmp_path / "a" / "results.json", {"gqa": {"exact_match,none": 0.1}})
    new = lmms_eval_file(tmp_path / "b" / "results.json", {"gqa": {"exact_match,none": 0.6}})
    os.utime(old, (1_600_000_000, 1_600_000_000))
    os.utime(new, (1_700_000_000, 1_700_000_000))
    scores = read_lmms_eval_results(tmp_path)
    assert scores["GQA"] == pytest.approx(60.0) and scores.files["GQA"] == new and scores.superseded == [old]


# -- (c) files that are not lmms-eval results -------------------------------------------------------


def test_non_result_json_names_the_file(tmp_path):
    other = tmp_path / "model_results.json"
    other.write_text(json.dumps({"overall_acc": 0.6}))
    with pytest.raises(ValueError, match=rf"{other}: not an lmms-eval result file"):
        read_lmms_eval_results(other)
    broken = tmp_path / "results.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=rf"{broken}: not an lmms-eval result file"):
        read_lmms_eval_results(broken)
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"results": {"gqa": {"exact_match": 0.5}}}))  # no '<metric>,<filter>' keys
    with pytest.raises(ValueError, match=rf"{flat}.*<metric>,<filter>"):
        read_lmms_eval_results(flat)
    with pytest.raises(ValueError, match=rf"{tmp_path}: no lmms-eval result files"):
        read_lmms_eval_results(tmp_path)
    with pytest.raises(ValueError, match="scale"):
        read_lmms_eval_results(other, scale="percent")
    with pytest.raises(FileNotFoundError):
        read_lmms_eval_results(tmp_path / "absent")


# -- (d) lmms-eval missing, and the adapter against a stand-in of lmms-eval's interface ---------------


def test_register_without_lmms_eval_explains_the_install():
    if importlib.util.find_spec("lmms_eval") is not None:
        pytest.skip("lmms-eval is installed here")
    assert not hasattr(evaluation, "ATPLlava")
    with pytest.raises(ImportError, match="pip install lmms-eval") as info:
        register_lmms_eval_model()
    assert "torch" in str(info.value) and "separate" in str(info.value)


@dataclass
class FakeInstance:
    arguments: tuple

    @property
    def args(self):
        return self.arguments


def stub_lmms_eval(monkeypatch) -> dict:
    """Just the names the adapter imports, shaped like lmms-eval's (base class with rank/world size and
    task_dict, a register_model decorator, a manifest registry)."""
    registry: dict = {}
    manifests: list = []

    class Lmms:
        def __init__(self):
            self._rank, self._world_size, self.task_dict = 0, 1, {}

        @property
        def rank(self):
            return self._rank

        @property
        def world_size(self):
            return self._world_size

    def register_model(*names):
        def decorate(cls):
            for name in names:
                registry[name] = cls
            return cls
        return decorate

    @dataclass(frozen=True)
    class ModelManifest:
        model_id: str
        simple_class_path: str | None = None

    class Registry:
        def register_manifest(self, manifest, overwrite=False):
            manifests.append(manifest)

    modules = {name: types.ModuleType(name) for name in (
        "lmms_eval", "lmms_eval.api", "lmms_eval.api.model", "lmms_eval.api.registry", "lmms_eval.models",
        "lmms_eval.models.registry_v2")}
    modules["lmms_eval"].__path__ = []
    modules["lmms_eval.api"].__path__ = []
    modules["lmms_eval.models"].__path__ = []
    modules["lmms_eval.api.model"].lmms = Lmms
    modules["lmms_eval.api.registry"].register_model = register_model
    modules["lmms_eval.models"].MODEL_REGISTRY_V2 = Registry()
    modules["lmms_eval.models.registry_v2"].ModelManifest = ModelManifest
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return {"registry": registry, "manifests": manifests}


def evaluation_with_stub(monkeypatch, name: str) -> tuple[types.ModuleType, dict]:
    """A fresh copy of the evaluation module imported as ``name`` against :func:`stub_lmms_eval`, so that its
    lmms-eval adapters are defined; returns the module and the stubs."""
    stubs = stub_lmms_eval(monkeypatch)
    spec = importlib.util.spec_from_file_location(name, evaluation.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module, stubs


def test_adapter_generate_until_with_a_stand_in_lmms_eval(monkeypatch, tmp_path, stock, processor):
    module, stubs = evaluation_with_stub(monkeypatch, "atp_repro.real._evaluation_with_stub")
    assert stubs["registry"]["atp_llava"] is module.ATPLlava
    assert module.register_lmms_eval_model() is module.ATPLlava
    assert stubs["manifests"][-1].simple_class_path == f"{module.__name__}.ATPLlava"

    folder = tmp_path / "llava"
    stock.save_pretrained(folder)
    processor.save_pretrained(folder)
    pruned = atp_copy(stock, 4)
    save_atp(pruned, tmp_path / "atp")
    lm = module.ATPLlava(pretrained=str(folder), atp=str(tmp_path / "atp"), device="cpu",
                         token_log=str(tmp_path / "tokens.json"), max_batch_size=None)
    docs = [{"image": im, "q": q} for im, q in zip(images(), QUESTIONS)]
    lm.task_dict = {"gqa": {"testdev": docs}}
    gen_kwargs = {"max_new_tokens": 4, "temperature": 0, "do_sample": False, "image_aspect_ratio": "original"}
    requests = [FakeInstance((d["q"], dict(gen_kwargs), lambda doc: [doc["image"]], i, "gqa", "testdev"))
                for i, d in enumerate(docs)]
    answers = lm.generate_until(requests)
    expected = generate_answers(pruned, processor, [(d["q"], gen_kwargs, [d["image"]]) for d in docs])
    assert answers == expected
    log = json.loads((tmp_path / "tokens.json").read_text())
    assert log["tasks"]["gqa"] == {"mean_vision_tokens": pytest.approx(10.0), "requests": 2}
    with pytest.raises(NotImplementedError, match="generate_until only"):
        lm.loglikelihood(requests)
    with pytest.raises(ValueError, match="unknown model_args"):
        module.ATPLlava(pretrained=str(folder), device="cpu", conv_template="vicuna")


def test_the_retention_command_prints_and_writes_the_table(tmp_path, capsys):
    from atp_repro import cli

    ub = lmms_eval_file(tmp_path / "ub.json", {"gqa": {"exact_match,none": 0.62}, "pope": {"pope_f1_score,none": 0.86}})
    pruned = lmms_eval_file(tmp_path / "atp.json",
                            {"gqa": {"exact_match,none": 0.589}, "pope": {"pope_f1_score,none": 0.86}})
    out = tmp_path / "table.csv"
    assert cli.main(["retention", str(ub), str(pruned), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "GQA" in printed and AVG_RATE in printed
    table = pd.read_csv(out, index_col=0)
    assert table.loc[AVG_RATE, "retention_%"] == pytest.approx((95.0 + 100.0) / 2)
    assert cli.main(["retention", str(tmp_path / "absent.json"), str(pruned)]) == 2
