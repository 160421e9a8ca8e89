"""The evaluation path on Qwen2-VL (and Qwen2.5-VL), offline: the chat-template prompt, batched generation of
requests whose images have different non-square sizes (answers and vision-token counts as one by one, stock and
ATP), the loader, the offline harness on the tiny Qwen2-VL world with the retention report of its two result files,
and the lmms-eval adapter ``atp_qwen2_vl`` against a stand-in of lmms-eval's interface.

The tiny Qwen2-VL (``atp_repro.real.tiny_world``) has 4 decoder layers, patch 2 and merge 2: an image of h x w
pixels takes (h / 4) x (w / 4) tokens after the processor's resize to multiples of 4.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atp_repro.atp import ATPConfig, apply_atp, has_atp, save_atp, token_counts
from atp_repro.real.evaluation import (
    AVG_RATE,
    TABLE7_BENCHMARKS,
    TOKENS_KEY,
    build_prompt,
    evaluate_benchmark_file,
    generate_answers,
    generate_detailed,
    generation_settings,
    load_local_llava,
    load_local_vlm,
    retention_report,
)
from atp_repro.real.loading import UnsupportedModelError
from atp_repro.real.tiny_world import COLOURS, LAYERS, QWEN_IMAGE_SIZES, tiny_model_and_processor, write_tiny_world
from tests.test_real_evaluation import FakeInstance, evaluation_with_stub, lmms_eval_file

QUESTION = "what colour is the image ?"
GEN = {"max_new_tokens": 3, "temperature": 0, "do_sample": False}
MODULE_LAYERS = (1,)  # one ATP module after decoder layer 1 of 4
KEEP_ALL = (10_000,)  # more than any image here: nothing is pruned
KEEP = 6
IMAGE_SPAN = "<|vision_start|><|image_pad|><|vision_end|>"


def tokens_of(size: tuple[int, int]) -> int:
    """Vision tokens of a (width, height) image: multiples of 4 pixels (all sizes here are), 4 x 4 pixels a token."""
    width, height = size
    return (width // 4) * (height // 4)


def image(size: tuple[int, int], seed: int) -> Image.Image:
    """A noise image (its patches differ, so that ATP's scores do)."""
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def requests() -> list[tuple]:
    """Four requests, five images of five sizes (20x12, 12x24, 28x16, and 16x8 + 24x20 in the last request)."""
    images = [image(size, seed) for seed, size in enumerate(QWEN_IMAGE_SIZES[:5])]
    return [(QUESTION, GEN, [images[0]]), ("say hello", GEN, [images[1]]), (QUESTION, GEN, [images[2]]),
            (QUESTION, GEN, images[3:5])]


UNPRUNED = [15.0, 18.0, 28.0, 8.0 + 30.0]  # vision tokens of each request, in every layer


def pruned_average(unpruned: float, keep: int = KEEP) -> float:
    """The layer average with ``keep`` tokens after the module of layer 1: layers 0-1 unpruned, 2-3 ``keep``."""
    return (2 * unpruned + (LAYERS - 2) * min(unpruned, keep)) / LAYERS


def with_atp(model, **config):
    return apply_atp(copy.deepcopy(model), ATPConfig(module_layers=MODULE_LAYERS, position_encoding="original",
                                                     **config))


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def pair(request):
    """``(model, processor)`` of the tiny Qwen2-VL (Qwen2.5-VL) world."""
    return tiny_model_and_processor(request.param)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The tiny Qwen2-VL world's folder: model/, images/ (six plain images of the sizes above, then 8 x 16)."""
    return write_tiny_world(tmp_path_factory.mktemp("qwen-eval"), samples=6, variant="qwen2_vl").parent


def run(model, processor, batch_size: int):
    return generate_detailed(model, processor, requests(), batch_size=batch_size)


# -- prompt ---------------------------------------------------------------------------------------------------------


def test_the_prompt_is_the_chat_templates_rendering_with_the_images_before_the_question(pair):
    _, processor = pair
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert build_prompt(processor, QUESTION, 1) == rendered == (
        "<|im_start|>system\nyou are a helpful assistant<|im_end|>\n<|im_start|>user\n"
        f"{IMAGE_SPAN}{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    # LLaVA's <image> mark, which some lmms-eval task contexts carry, is removed (as lmms-eval's qwen2_vl does)
    assert build_prompt(processor, f"<image>{QUESTION}", 1) == rendered
    assert build_prompt(processor, QUESTION, 2).count(IMAGE_SPAN) == 2
    assert IMAGE_SPAN not in build_prompt(processor, QUESTION, 0)
    plain = copy.deepcopy(processor)
    plain.chat_template = None
    with pytest.raises(ValueError, match="has no chat_template: only a LLaVA processor"):
        build_prompt(plain, QUESTION, 1)


# -- generation -----------------------------------------------------------------------------------------------------


def test_the_processor_builds_a_left_padded_batch_with_each_images_own_grid(pair, monkeypatch):
    model, processor = copy.deepcopy(pair[0]), pair[1]
    seen = {}
    stock_generate = model.generate

    def recording(**inputs):
        seen.update(inputs)
        return stock_generate(**inputs)

    monkeypatch.setattr(model, "generate", recording)
    run(model, processor, batch_size=4)
    grids = [[1, height // 2, width // 2] for width, height in QWEN_IMAGE_SIZES[:5]]
    assert seen["image_grid_thw"].tolist() == grids
    assert seen["pixel_values"].shape[0] == sum(t * h * w for t, h, w in grids)  # every image's patches
    ids, mask = seen["input_ids"], seen["attention_mask"]
    assert bool(mask[:, -1].all()) and not bool(mask[:, 0].all())  # padded on the left
    is_image = ids == processor.image_token_id
    assert is_image.sum(1).tolist() == UNPRUNED
    assert (seen["mm_token_type_ids"] == is_image.long()).all()  # what the model's M-RoPE positions read


def test_a_batch_of_different_image_sizes_equals_one_by_one_for_the_stock_model(pair):
    model, processor = pair
    singles, batch = run(model, processor, 1), run(model, processor, 4)
    assert [g.text for g in batch] == [g.text for g in singles]
    assert all(g.text for g in batch)  # the random model says something
    assert [g.vision_tokens for g in batch] == [g.vision_tokens for g in singles] == UNPRUNED


def test_atp_keeping_every_token_answers_as_the_stock_model(pair):
    model, processor = pair
    stock = run(model, processor, 4)
    keep_all = with_atp(model, fixed_keep=KEEP_ALL)
    for batch_size in (1, 4):
        generations = run(keep_all, processor, batch_size)
        assert [g.text for g in generations] == [g.text for g in stock]
        assert [g.vision_tokens for g in generations] == UNPRUNED


@pytest.mark.parametrize("pruning", ["fixed_keep", "thresholds"])
def test_a_pruned_batch_equals_one_by_one_and_records_each_requests_layer_average(pair, pruning):
    model, processor = pair
    config = {"fixed_keep": (KEEP,)} if pruning == "fixed_keep" else {"init_keep_threshold": 0.5}
    pruned = with_atp(model, **config)
    singles = run(pruned, processor, 1)
    single_tokens = [g.vision_tokens for g in singles]
    batch = run(pruned, processor, 4)
    layer_average = token_counts(pruned).float().mean(1).tolist()  # (batch, layers) of the batch's prefill
    assert [g.text for g in batch] == [g.text for g in singles]
    assert [g.vision_tokens for g in batch] == single_tokens == layer_average
    assert all(t < unpruned for t, unpruned in zip(single_tokens, UNPRUNED))
    if pruning == "fixed_keep":
        assert single_tokens == [pruned_average(n) for n in UNPRUNED]


def test_a_text_only_request_records_no_vision_tokens_with_atp(pair):
    model, processor = pair
    pruned = with_atp(model, fixed_keep=(KEEP,))
    text_only = ("say hello", GEN, [])
    generations = generate_detailed(pruned, processor, [*requests()[:1], text_only], batch_size=2)
    assert [g.vision_tokens for g in generations] == [pruned_average(UNPRUNED[0]), 0.0]
    assert generations[1].text == generate_answers(model, processor, [text_only])[0]  # nothing to prune


# -- loading, the offline harness and the retention report ----------------------------------------------------------


def write_benchmark(world: Path, first_answer: str) -> Path:
    """A JSONL benchmark of the world's six images (what colour each is); the first answer is the stock model's
    own, so that the upper bound scores above 0."""
    colours = list(COLOURS)
    items = [{"id": f"q{i}", "image": f"{i}.png", "question": QUESTION, "answer": colours[i % len(colours)]}
             for i in range(6)]
    items[0]["answer"] = first_answer
    path = world / "bench.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return path


def test_the_harness_scores_a_qwen2_vl_folder_with_and_without_atp_and_retention_reads_both(world, tmp_path):
    folder, images = world / "model", world / "images"
    stock, processor = load_local_vlm(folder)
    assert type(stock).__name__ == "Qwen2VLForConditionalGeneration" and not has_atp(stock)
    with Image.open(images / "0.png") as first:
        first_answer = generate_answers(stock, processor, [(QUESTION, GEN, [first.convert("RGB")])])[0]
    bench = write_benchmark(world, first_answer)
    sizes = [Image.open(images / f"{i}.png").size for i in range(6)]
    unpruned = [float(tokens_of(size)) for size in sizes]
    assert len(set(unpruned)) > 3  # images of different sizes

    def harness(model, name):
        return evaluate_benchmark_file(model, processor, bench, images, "gqa", tmp_path / name, gen_kwargs=GEN,
                                       batch_size=3)

    ub = harness(stock, "ub")
    assert ub.score >= 1 / 6 and ub.num_samples == 6
    assert ub.vision_tokens == pytest.approx(sum(unpruned) / 6)

    in_memory = with_atp(stock, fixed_keep=(KEEP,))
    save_atp(in_memory, tmp_path / "atp_folder")
    loaded, _ = load_local_vlm(folder, atp=tmp_path / "atp_folder", dtype="float32")
    assert has_atp(loaded)
    atp = harness(loaded, "atp")
    assert atp.vision_tokens == pytest.approx(sum(pruned_average(n) for n in unpruned) / 6)
    assert atp.vision_tokens < ub.vision_tokens
    assert atp.predictions == harness(in_memory, "in_memory").predictions
    samples = [json.loads(line) for line in atp.samples_path.read_text().splitlines()]
    assert [s["vision_tokens"] for s in samples] == [pruned_average(n) for n in unpruned]
    assert json.loads(atp.results_path.read_text())["model_args"]["atp"]["fixed_keep"] == [KEEP]

    df = retention_report(tmp_path / "ub", tmp_path / "atp", tmp_path / "table.csv")
    assert df.loc["GQA", "upper_bound"] == pytest.approx(100 * ub.score)
    assert df.loc["GQA", "retention_%"] == pytest.approx(100 * atp.score / ub.score)
    assert df.attrs["tokens"] == {"upper_bound": {"GQA": pytest.approx(ub.vision_tokens)},
                                  "pruned": {"GQA": pytest.approx(atp.vision_tokens)}}
    assert (tmp_path / "table.csv").is_file()


def test_an_unsupported_model_type_fails_naming_it(world, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(world / "model", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llava_next"}))
    with pytest.raises(UnsupportedModelError, match=re.escape(
            "pretrained=" + str(other) + ": config.json has model_type 'llava_next', which is not supported here; "
            "supported: 'llava', 'qwen2_vl', 'qwen2_5_vl'")):
        load_local_vlm(other)
    with pytest.raises(UnsupportedModelError, match="model_type 'qwen2_vl', which is not supported here; "
                                                    "supported: 'llava' "):
        load_local_llava(world / "model")
    with pytest.raises(ValueError, match=r"model_types=\('bert',\) is invalid: expected a non-empty subset of "):
        load_local_vlm(world / "model", model_types=("bert",))
    with pytest.raises(ValueError, match=r"dtype='fp8' is invalid"):
        load_local_vlm(world / "model", dtype="fp8")


# Supplementary Table 7's Qwen2-VL-7B rows as lmms-eval writes them (fractions; OCRBench points / 1000; MMBench
# in percent): task -> (metric, upper bound, ATP)
TABLE7 = {"docvqa_val": ("anls", 0.945, 0.912), "ocrbench": ("ocrbench_accuracy", 0.845, 0.809),
          "chartqa": ("relaxed_overall", 0.830, 0.795), "infovqa_val": ("anls", 0.765, 0.737),
          "mmmu_val": ("mmmu_acc", 0.541, 0.514), "mmbench_en_dev": ("gpt_eval_score", 83.0, 81.2)}


def test_retention_reads_table_7s_benchmarks_and_gives_its_avg_rate(tmp_path):
    sides = {}
    for side, column in (("ub", 1), ("atp", 2)):
        sides[side] = lmms_eval_file(tmp_path / side / "20250101_000000_results.json",
                                     {task: {f"{row[0]},none": row[column]} for task, row in TABLE7.items()})
    df = retention_report(sides["ub"], sides["atp"], benchmarks=TABLE7_BENCHMARKS)
    assert df.index.tolist() == [*TABLE7_BENCHMARKS, AVG_RATE]
    assert df["upper_bound"].tolist()[:7] == pytest.approx([94.5, 845, 83.0, 76.5, float("nan"), 54.1, 83.0],
                                                           nan_ok=True)  # the paper's printed scale
    assert df.attrs["missing"] == ["AI2D"]  # no Qwen2-VL score in Table 7 either
    assert round(df.attrs["avg_rate"], 1) == 96.2  # Table 7's Avg. Rate of Qwen2-VL-7B + ATP
    assert df.loc["OCRBench", "retention_%"] == pytest.approx(100 * 809 / 845)


def test_ocrbenchs_top_p_0_is_greedy_and_refused_when_sampling():
    ocrbench = {"max_new_tokens": 128, "temperature": 0, "top_p": 0, "num_beams": 1, "do_sample": False}
    assert not generation_settings(ocrbench).do_sample
    with pytest.raises(ValueError, match=r"top_p'\]=0 is invalid when sampling"):
        generation_settings({**ocrbench, "temperature": 0.7, "do_sample": True})
    with pytest.raises(ValueError, match=r"top_p'\]=1.5 is invalid: expected a number in \[0, 1\]"):
        generation_settings({**ocrbench, "top_p": 1.5})


# -- the lmms-eval adapter ------------------------------------------------------------------------------------------


def test_the_qwen2_vl_adapter_with_a_stand_in_lmms_eval(monkeypatch, world, tmp_path):
    module, stubs = evaluation_with_stub(monkeypatch, "atp_repro.real._evaluation_with_stub_qwen")
    registry = stubs["registry"]
    assert registry["atp_qwen2_vl"] is registry["atp_qwen2_5_vl"] is module.ATPQwen2VL
    assert registry["atp_llava"] is module.ATPLlava
    assert module.register_lmms_eval_model("atp_qwen2_vl") is module.ATPQwen2VL
    paths = {m.model_id: m.simple_class_path for m in stubs["manifests"]}
    assert paths == {"atp_llava": f"{module.__name__}.ATPLlava", "atp_qwen2_vl": f"{module.__name__}.ATPQwen2VL",
                     "atp_qwen2_5_vl": f"{module.__name__}.ATPQwen2VL"}
    with pytest.raises(ValueError, match="name='atp_qwen' is invalid: expected one of"):
        module.register_lmms_eval_model("atp_qwen")

    folder = world / "model"
    stock, processor = load_local_vlm(folder)
    pruned = with_atp(stock, fixed_keep=(KEEP,))
    save_atp(pruned, tmp_path / "atp")
    lm = module.ATPQwen2VL(pretrained=str(folder), atp=str(tmp_path / "atp"), device="cpu", batch_size="4",
                           token_log=str(tmp_path / "tokens.json"))
    built = requests()
    docs = [{"images": images, "q": context} for context, _, images in built]
    lm.task_dict = {"gqa": {"testdev": docs}}
    instances = [FakeInstance((d["q"], dict(GEN), lambda doc: doc["images"], i, "gqa", "testdev"))
                 for i, d in enumerate(docs)]
    answers = lm.generate_until(instances)
    assert answers == generate_answers(pruned, processor, built)
    log = json.loads((tmp_path / "tokens.json").read_text())
    expected = sum(pruned_average(n) for n in UNPRUNED) / len(UNPRUNED)
    assert log["tasks"]["gqa"] == {"mean_vision_tokens": pytest.approx(expected), "requests": 4}
    with pytest.raises(NotImplementedError, match="atp_qwen2_vl implements generate_until only"):
        lm.loglikelihood(instances)

    # each name serves its own family and says which one serves the folder
    with pytest.raises(UnsupportedModelError, match=r"--model atp_llava serves model_type 'llava'; pretrained=.* "
                                                    r"has model_type 'qwen2_vl': use --model atp_qwen2_vl"):
        module.ATPLlava(pretrained=str(folder), device="cpu")
    llava, llava_processor = tiny_model_and_processor("llava")
    llava.save_pretrained(tmp_path / "llava")
    llava_processor.save_pretrained(tmp_path / "llava")
    with pytest.raises(UnsupportedModelError, match=r"--model atp_qwen2_vl serves model_type 'qwen2_vl', "
                                                    r"'qwen2_5_vl'; .* has model_type 'llava': use --model atp_llava"):
        module.ATPQwen2VL(pretrained=str(tmp_path / "llava"), device="cpu")


# --- the Table 7 notebook's real-weight rows ------------------------------------------------------------------


def _table7_sides(tmp_path, atp_factor: float = 1.0, tokens: tuple[float, float] | None = None) -> dict:
    sides = {}
    for side, column in (("ub", 1), ("atp", 2)):
        results = {}
        for task, row in TABLE7.items():
            results[task] = {f"{row[0]},none": row[column] * (atp_factor if side == "atp" else 1.0)}
            if tokens is not None:
                results[task][TOKENS_KEY] = tokens[column - 1]
        sides[side] = lmms_eval_file(tmp_path / side / "20250101_000000_results.json", results)
    return sides


def test_table7_rows_carry_the_papers_names_scores_tokens_and_a_verdict(tmp_path):
    from atp_repro.real.table7 import ATP_ROW, UPPER_BOUND_ROW, qwen2_vl_rows

    sides = _table7_sides(tmp_path, tokens=(1076.0, 256.0))
    rows = qwen2_vl_rows(sides["ub"], sides["atp"])
    cells = {(row, column): value for row, column, value in rows.cells}
    assert cells[UPPER_BOUND_ROW, "MMB-EN"] == pytest.approx(83.0) and cells[ATP_ROW, "OCRBench"] == pytest.approx(809)
    assert round(cells[ATP_ROW, "Avg. Rate"], 1) == 96.2
    assert cells[UPPER_BOUND_ROW, "Token"] == 1076.0 and cells[ATP_ROW, "Token"] == 256.0
    assert (ATP_ROW, "AI2D") not in cells  # no score on either side
    assert rows.claim.holds is True and "96.2% over 6 benchmarks" in rows.claim.evidence
    worse = qwen2_vl_rows(*_table7_sides(tmp_path / "worse", atp_factor=0.9).values())
    assert worse.claim.holds is False and worse.tokens == {UPPER_BOUND_ROW: None, ATP_ROW: None}
    assert not any(column == "Token" for _, column, _ in worse.cells)


def test_table7_rows_name_a_missing_or_empty_parameter(tmp_path):
    from atp_repro.real.table7 import qwen2_vl_rows

    sides = _table7_sides(tmp_path)
    with pytest.raises(ValueError, match="qwen_ub_results is empty"):
        qwen2_vl_rows("", sides["atp"])
    with pytest.raises(FileNotFoundError, match="qwen_atp_results: .*nowhere"):
        qwen2_vl_rows(sides["ub"], tmp_path / "nowhere")


def test_table7_tokens_come_from_the_adapters_token_logs_per_rank_files_combined(tmp_path):
    from atp_repro.real.table7 import ATP_ROW, UPPER_BOUND_ROW, qwen2_vl_rows, read_token_log

    sides = _table7_sides(tmp_path)  # real lmms-eval result files hold no token counts
    ub_log = tmp_path / "ub_tokens.json"
    ub_log.write_text(json.dumps({"model": "ub", "tasks": {task: {"mean_vision_tokens": 1076.0, "requests": 10}
                                                           for task in TABLE7}}), encoding="utf-8")
    for rank, (mean, requests) in enumerate(((200.0, 3), (300.0, 1))):  # a two-process run: one log per rank
        (tmp_path / f"atp_tokens.rank{rank}.json").write_text(json.dumps(
            {"model": "atp", "tasks": {task: {"mean_vision_tokens": mean, "requests": requests} for task in TABLE7}}),
            encoding="utf-8")
    assert read_token_log(tmp_path / "atp_tokens.json")["DocVQA"] == pytest.approx(225.0)
    rows = qwen2_vl_rows(sides["ub"], sides["atp"], ub_tokens=ub_log, atp_tokens=tmp_path / "atp_tokens.json")
    assert rows.tokens == {UPPER_BOUND_ROW: pytest.approx(1076.0), ATP_ROW: pytest.approx(225.0)}
    with pytest.raises(FileNotFoundError, match="qwen_atp_tokens: .*no such token log"):
        qwen2_vl_rows(sides["ub"], sides["atp"], atp_tokens=tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match="qwen_ub_tokens: .*is not a token log"):
        qwen2_vl_rows(sides["ub"], sides["atp"], ub_tokens=tmp_path / "bad.json")


def test_generation_stops_at_every_end_of_turn_id_the_model_names():
    from types import SimpleNamespace

    from atp_repro.real.evaluation import _stop_ids

    qwen_like = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[151645, 151643]))
    assert _stop_ids(qwen_like, 151645) == [151645, 151643]
    assert _stop_ids(qwen_like, 7) == [7, 151645, 151643]
    assert _stop_ids(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=2)), 2) == 2
    assert _stop_ids(SimpleNamespace(), None) is None
