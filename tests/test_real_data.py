"""Real-scale data and loading path, offline: LLaVA-665k samples -> tokens, labels and images; the collator;
the local model-folder checks and ``load_llava``.

Everything runs on ``tiny_llava`` / ``tiny_processor`` (a whitespace word-level tokenizer: each word the test
uses has its own id, ``<image>`` is id 4), so token sequences are compared word by word.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from atp_repro.atp.tiny import IMAGE_TOKEN_ID, PAD_TOKEN_ID, tiny_llava, tiny_processor
from atp_repro.real.data import (
    IGNORE_INDEX,
    LLAVA15_SYSTEM,
    LlavaCollator,
    LlavaDataError,
    LlavaInstructDataset,
    conversation_messages,
    expand_to_square,
)
from atp_repro.real.loading import PLACEHOLDER, ModelFolderError, check_model_folder, load_llava

GRID = 4  # image 16 x 16, patch 4: 16 image tokens
WORDS = (*LLAVA15_SYSTEM.split(), "q1", "q2", "q3", "a1", "a2", "a3", "hello")
RED = (255, 0, 0)
BLUE = (0, 0, 255)

TWO_TURN = {"id": "two-turn", "image": "wide.png",
            "conversations": [{"from": "human", "value": "q1 q2\n<image>"},  # marker at the end: moved first
                              {"from": "gpt", "value": "a1 a2"},
                              {"from": "human", "value": "q3"},
                              {"from": "gpt", "value": "a3"}]}
TEXT_ONLY = {"id": "text-only", "conversations": [{"from": "human", "value": "q3"}, {"from": "gpt", "value": "a3"}]}

# Simple chat templates: "USER: " + images as "<image>\n" + text, "ASSISTANT: " + text (+ eos), generation
# prompt "ASSISTANT:".
_USER = ("USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
         "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} ")
TEMPLATE_WITH_EOS = ("{% for m in messages %}{% if m['role'] == 'user' %}" + _USER +
                     "{% else %}ASSISTANT: {{ m['content'][-1]['text'] }}</s>{% endif %}{% endfor %}"
                     "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
TEMPLATE_WITHOUT_EOS = TEMPLATE_WITH_EOS.replace("</s>", " ")
# llava-hf/llava-1.5-7b-hf's own template (no eos after an answer)
TEMPLATE_LLAVA_HF = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


@pytest.fixture(scope="module")
def model():
    return tiny_llava(num_layers=4, grid=GRID)


@pytest.fixture(scope="module")
def processor(model):
    return tiny_processor(model, words=WORDS)


@pytest.fixture(scope="module")
def num_image_tokens(model) -> int:
    return model.config.image_seq_length


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, model, processor) -> Path:
    """A complete saved tiny checkpoint (read-only for the tests: copy it before removing files)."""
    folder = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def data(tmp_path) -> Path:
    """An image folder with a wide (20 x 10) red image, a tall blue one and a square one."""
    Image.new("RGB", (20, 10), RED).save(tmp_path / "wide.png")
    Image.new("RGB", (10, 24), BLUE).save(tmp_path / "tall.png")
    Image.new("RGB", (16, 16), RED).save(tmp_path / "square.png")
    return tmp_path


@pytest.fixture
def make_dataset(data, processor, num_image_tokens):
    """``make_dataset(samples, **kwargs)``: writes ``samples`` as the JSON file and builds the dataset."""
    def build(samples, *, proc=None, name="train.json", **kwargs) -> LlavaInstructDataset:
        path = data / name
        path.write_text(json.dumps(samples), encoding="utf-8")
        return LlavaInstructDataset(path, data, proc or processor, num_image_tokens, **kwargs)
    return build


def tokens(processor, ids) -> list[str]:
    return processor.tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def trained_layout(layout: list[tuple[str, bool]]) -> tuple[list[str], list[bool]]:
    return [t for t, _ in layout], [trained for _, trained in layout]


def check_layout(processor, sample: dict, layout: list[tuple[str, bool]]) -> None:
    """input_ids decode to the layout's tokens; labels equal input_ids exactly at the trained ones, else -100."""
    expected_tokens, trained = trained_layout(layout)
    assert tokens(processor, sample["input_ids"]) == expected_tokens
    expected_labels = [int(i) if t else IGNORE_INDEX for i, t in zip(sample["input_ids"], trained)]
    assert sample["labels"].tolist() == expected_labels


def user(*words: str) -> list[tuple[str, bool]]:
    return [(w, False) for w in words]


def answer(*words: str) -> list[tuple[str, bool]]:
    return [(w, True) for w in (*words, "</s>")]


def image_span(n: int) -> list[tuple[str, bool]]:
    return [("<image>", False)] * n


def normalised(processor, rgb: tuple[int, int, int]) -> torch.Tensor:
    image_processor = processor.image_processor
    mean, std = torch.tensor(image_processor.image_mean), torch.tensor(image_processor.image_std)
    return (torch.tensor(rgb) / 255 - mean) / std


def write_sample_file(data: Path, samples) -> Path:
    path = data / "samples.json"
    path.write_text(json.dumps(samples), encoding="utf-8")
    return path


# -- 1. the fallback template (LLaVA-1.5's vicuna_v1) ------------------------------------------------------------


def test_fallback_template_layout_and_labels_of_a_two_turn_image_sample(make_dataset, processor, num_image_tokens):
    dataset = make_dataset([TWO_TURN])
    assert not getattr(processor, "chat_template", None)
    sample = dataset[0]
    layout = [("<s>", False), *user(*LLAVA15_SYSTEM.split(), "USER:"), *image_span(num_image_tokens),
              *user("q1", "q2", "ASSISTANT:"), *answer("a1", "a2"),
              *user("USER:", "q3", "ASSISTANT:"), *answer("a3")]
    check_layout(processor, sample, layout)
    ids = sample["input_ids"]
    assert int((ids == IMAGE_TOKEN_ID).sum()) == num_image_tokens == 16
    start = int((ids == IMAGE_TOKEN_ID).nonzero()[0])
    assert torch.equal(ids[start:start + num_image_tokens], torch.full((num_image_tokens,), IMAGE_TOKEN_ID))
    assert tokens(processor, ids[start - 1:start]) == ["USER:"]  # the marker moved to the start of the turn
    assert (sample["labels"][start:start + num_image_tokens] == IGNORE_INDEX).all()


def test_fallback_template_without_system_and_for_a_text_only_sample(make_dataset, processor):
    sample = make_dataset([TEXT_ONLY], system=None)[0]
    check_layout(processor, sample, [("<s>", False), *user("USER:", "q3", "ASSISTANT:"), *answer("a3")])
    assert sample["pixel_values"] is None


def test_image_is_padded_to_a_square_of_the_mean_colour_or_cropped(make_dataset, processor):
    padded = make_dataset([TWO_TURN])[0]["pixel_values"]
    cropped = make_dataset([TWO_TURN], image_aspect_ratio="crop")[0]["pixel_values"]
    assert padded.shape == cropped.shape == (3, GRID * 4, GRID * 4)
    red = normalised(processor, RED)
    # 20 x 10 red centred on 20 x 20: rows 5..14 of 20 -> rows ~4..11 of 16; rows 0-2 and 13-15 are the mean colour
    for row in (0, 1, 2, 13, 14, 15):
        assert padded[:, row, :].abs().max() < 0.05, row
    for row in (6, 7, 8, 9):
        assert torch.allclose(padded[:, row, :], red[:, None].expand(3, 16), atol=0.05), row
    assert torch.allclose(cropped, red[:, None, None].expand(3, 16, 16), atol=0.05)  # crop: red everywhere


# -- 2. the processor's chat template ----------------------------------------------------------------------------


@pytest.mark.parametrize("template", [TEMPLATE_WITH_EOS, TEMPLATE_WITHOUT_EOS, TEMPLATE_LLAVA_HF],
                         ids=["eos-in-template", "no-eos-in-template", "llava-1.5-hf"])
def test_chat_template_labels_cover_the_answers_and_one_eos_each(make_dataset, processor, num_image_tokens,
                                                                 template):
    templated = copy.deepcopy(processor)
    templated.chat_template = template
    sample = make_dataset([TWO_TURN], proc=templated, template="processor")[0]
    layout = [("<s>", False), *user("USER:"), *image_span(num_image_tokens), *user("q1", "q2", "ASSISTANT:"),
              *answer("a1", "a2"), *user("USER:", "q3", "ASSISTANT:"), *answer("a3")]
    check_layout(processor, sample, layout)
    labelled = sample["labels"][sample["labels"] != IGNORE_INDEX]
    assert tokens(processor, labelled) == ["a1", "a2", "</s>", "a3", "</s>"]


def test_chat_template_that_is_not_a_growing_prefix_is_rejected(make_dataset, processor):
    templated = copy.deepcopy(processor)
    templated.chat_template = "{{ messages | length }} " + TEMPLATE_WITH_EOS  # the head changes with each turn
    with pytest.raises(LlavaDataError, match="sample 0 \\(id two-turn\\): .*growing prefix"):
        make_dataset([TWO_TURN], proc=templated, template="processor")


# -- 3. text-only samples and the collator ---------------------------------------------------------------------


def test_mixed_batch_stacks_only_the_image_and_right_pads(make_dataset, processor):
    dataset = make_dataset([TEXT_ONLY, TWO_TURN])
    text, image = dataset[0], dataset[1]
    assert text["pixel_values"] is None and image["pixel_values"] is not None
    collator = LlavaCollator(pad_token_id=PAD_TOKEN_ID, padding_sample=dataset.padding_image_sample())
    batch = collator([text, image])
    lengths = [len(text["input_ids"]), len(image["input_ids"])]
    assert lengths[0] < lengths[1]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, lengths[1])
    assert batch["pixel_values"].shape == (1, 3, GRID * 4, GRID * 4)
    assert torch.equal(batch["pixel_values"][0], image["pixel_values"])
    for row, sample in enumerate((text, image)):
        n = len(sample["input_ids"])
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (lengths[1] - n)
        assert torch.equal(batch["input_ids"][row, :n], sample["input_ids"])
        assert (batch["input_ids"][row, n:] == PAD_TOKEN_ID).all()
        assert torch.equal(batch["labels"][row, :n], sample["labels"])
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    assert torch.equal(batch["atp_answer_mask"], batch["labels"] != IGNORE_INDEX)
    assert batch["atp_answer_mask"].sum().item() == 2 + 5  # "a3 </s>" and "a1 a2 </s> a3 </s>"
    assert batch["atp_padding_image"] is False


def test_all_text_batch_gets_a_padding_image_row(make_dataset, processor, num_image_tokens):
    dataset = make_dataset([TEXT_ONLY, TEXT_ONLY])
    padding = dataset.padding_image_sample()
    assert padding["input_ids"].tolist() == [1] + [IMAGE_TOKEN_ID] * num_image_tokens
    batch = LlavaCollator(pad_token_id=PAD_TOKEN_ID, padding_sample=padding)([dataset[0], dataset[1]])
    assert batch["input_ids"].shape[0] == 3
    n, width = 1 + num_image_tokens, batch["input_ids"].shape[1]
    assert width == max(n, len(dataset[0]["input_ids"]))
    assert tokens(processor, batch["input_ids"][2, :n]) == ["<s>"] + ["<image>"] * num_image_tokens
    assert (batch["input_ids"][2, n:] == PAD_TOKEN_ID).all()
    assert batch["attention_mask"][2].tolist() == [1] * n + [0] * (width - n)
    assert (batch["labels"][2] == IGNORE_INDEX).all()
    assert not batch["atp_answer_mask"][2].any()
    assert batch["pixel_values"].shape == (1, 3, GRID * 4, GRID * 4)
    assert (batch["pixel_values"] == 0).all()
    assert batch["atp_padding_image"] is True
    # the text rows are unchanged
    assert torch.equal(batch["labels"][0, :len(dataset[0]["labels"])], dataset[0]["labels"])


def test_images_are_stacked_in_sample_order(make_dataset):
    tall = {**TWO_TURN, "id": "tall", "image": "tall.png"}
    dataset = make_dataset([TWO_TURN, TEXT_ONLY, tall])
    batch = LlavaCollator(pad_token_id=PAD_TOKEN_ID)([dataset[0], dataset[1], dataset[2]])
    assert batch["pixel_values"].shape[0] == 2
    assert torch.equal(batch["pixel_values"][0], dataset[0]["pixel_values"])  # red
    assert torch.equal(batch["pixel_values"][1], dataset[2]["pixel_values"])  # blue
    assert not torch.equal(dataset[0]["pixel_values"], dataset[2]["pixel_values"])


def test_collator_without_padding_sample_or_answer_mask(make_dataset):
    dataset = make_dataset([TEXT_ONLY])
    batch = LlavaCollator(pad_token_id=PAD_TOKEN_ID, answer_mask=False)([dataset[0]])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # no image, no padding row, no flag


def test_conversation_messages_moves_the_marker_to_the_start_of_its_turn():
    messages = conversation_messages(TWO_TURN)
    assert messages == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q1 q2"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a1 a2"}]},
        {"role": "user", "content": [{"type": "text", "text": "q3"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a3"}]},
    ]
    with pytest.raises(ValueError, match="last turn must be from gpt"):
        conversation_messages({"conversations": TWO_TURN["conversations"][:3]})


# -- 4. invalid data ---------------------------------------------------------------------------------------------


def conv(*turns: tuple[str, str]) -> list[dict]:
    return [{"from": who, "value": value} for who, value in turns]


BAD_SAMPLES = {
    "missing-image": ({"image": "nope.png", "conversations": conv(("human", "<image>\nq1"), ("gpt", "a1"))},
                      "missing image: {data}/nope.png"),
    "not-alternating": ({"conversations": conv(("human", "q1"), ("human", "q2"), ("gpt", "a1"))},
                        "turn 1 is from 'human': turns must alternate"),
    "starts-with-gpt": ({"conversations": conv(("gpt", "a1"), ("human", "q1"), ("gpt", "a2"))},
                        "turn 0 is from 'gpt'"),
    "last-turn-human": ({"conversations": conv(("human", "q1"), ("gpt", "a1"), ("human", "q2"))},
                        "the last turn must be from gpt"),
    "two-markers": ({"image": "wide.png", "conversations": conv(("human", "<image>\nq1 <image>"), ("gpt", "a1"))},
                    "exactly one <image> in its turns, found 2"),
    "two-markers-two-turns": ({"image": "wide.png", "conversations": conv(
        ("human", "<image>\nq1"), ("gpt", "a1"), ("human", "<image>\nq2"), ("gpt", "a2"))},
        "exactly one <image> in its turns, found 2"),
    "no-marker": ({"image": "wide.png", "conversations": conv(("human", "q1"), ("gpt", "a1"))},
                  "exactly one <image> in its turns, found 0"),
    "marker-without-image": ({"conversations": conv(("human", "<image>\nq1"), ("gpt", "a1"))},
                             "<image> in a sample without 'image'"),
    "marker-in-answer": ({"image": "wide.png", "conversations": conv(("human", "<image>\nq1"), ("gpt", "<image>"))},
                         "turn 1 (gpt) contains <image>"),
    "unknown-role": ({"conversations": conv(("human", "q1"), ("bot", "a1"))}, "turn 1 must be"),
    "no-conversations": ({"conversations": []}, "'conversations' must be a non-empty list"),
}


@pytest.mark.parametrize("case", list(BAD_SAMPLES))
def test_bad_sample_fails_naming_file_index_id_and_reason(make_dataset, data, case):
    bad, reason = BAD_SAMPLES[case]
    samples = [TWO_TURN, {"id": f"bad-{case}", **bad}]  # the bad one is sample 1
    with pytest.raises(LlavaDataError) as info:
        make_dataset(samples, on_invalid="fail")
    message = str(info.value)
    assert message.startswith(f"{data / 'train.json'}: sample 1 (id bad-{case}): ")
    assert reason.format(data=data) in message
    assert "data.on_invalid" in message


def test_over_max_length_counts_image_tokens_and_names_the_setting(make_dataset, num_image_tokens):
    length = len(make_dataset([TWO_TURN], max_length=4096)[0]["input_ids"])
    assert length == 1 + len(LLAVA15_SYSTEM.split()) + 1 + num_image_tokens + 3 + 3 + 3 + 2
    assert len(make_dataset([TWO_TURN], max_length=length)) == 1  # the bound itself is allowed
    with pytest.raises(LlavaDataError, match=re.escape(f"sample 0 (id two-turn): over the maximum length: {length} "
                                                       f"tokens > data.max_length={length - 1}")):
        make_dataset([TWO_TURN], max_length=length - 1)


def test_image_sample_without_image_folder_fails(data, processor, num_image_tokens):
    path = write_sample_file(data, [TWO_TURN])
    with pytest.raises(LlavaDataError, match="missing image: wide.png \\(no data.image_folder given\\)"):
        LlavaInstructDataset(path, None, processor, num_image_tokens)
    assert len(LlavaInstructDataset(write_sample_file(data, [TEXT_ONLY]), None, processor, num_image_tokens)) == 1


def test_json_file_problems(data, processor, num_image_tokens):
    not_a_list = write_sample_file(data, TWO_TURN)
    with pytest.raises(LlavaDataError, match=re.escape(f"{not_a_list}: expected a JSON list of samples, got dict")):
        LlavaInstructDataset(not_a_list, data, processor, num_image_tokens)
    missing = data / "absent.json"
    with pytest.raises(LlavaDataError, match=re.escape(f"{missing}: no such file (data.train_json)")):
        LlavaInstructDataset(missing, data, processor, num_image_tokens)
    broken = data / "broken.json"
    broken.write_text("[{", encoding="utf-8")
    with pytest.raises(LlavaDataError, match="not valid JSON"):
        LlavaInstructDataset(broken, data, processor, num_image_tokens)


def test_skip_keeps_the_good_samples_and_counts_the_bad_by_reason(make_dataset, processor):
    good = [TWO_TURN, TEXT_ONLY]
    reference = make_dataset(good, name="good.json")
    max_length = int(reference.lengths.max())
    long = {"id": "long", "conversations": conv(("human", " ".join(["q1"] * max_length)), ("gpt", "a1"))}
    samples = [BAD_SAMPLES["missing-image"][0], TWO_TURN, BAD_SAMPLES["not-alternating"][0], "not a mapping",
               long, BAD_SAMPLES["last-turn-human"][0], TEXT_ONLY, *[TWO_TURN, TEXT_ONLY] * 2]
    dataset = make_dataset(samples, on_invalid="skip", max_length=max_length)
    assert [s["id"] for s in dataset.samples] == ["two-turn", "text-only"] * 3
    assert len(dataset) == 6
    assert dataset.skipped == Counter({"missing image": 1, "malformed conversation": 2, "malformed sample": 1,
                                       "over the maximum length": 1})
    for i in range(2):
        assert torch.equal(dataset[i]["input_ids"], reference[i]["input_ids"])
        assert torch.equal(dataset[i]["labels"], reference[i]["labels"])
    assert dataset[1]["pixel_values"] is None and dataset[0]["pixel_values"] is not None


def test_skip_refuses_when_more_samples_are_bad_than_good(make_dataset):
    """A wrong image folder makes every image sample 'missing': that is an error, not a few skipped samples."""
    bad = [BAD_SAMPLES["missing-image"][0]] * 3
    with pytest.raises(LlavaDataError, match="3 of 5 samples would be skipped .*check data.image_folder"):
        make_dataset([*bad, TWO_TURN, TEXT_ONLY], on_invalid="skip")


def test_skip_with_no_usable_sample_fails(make_dataset):
    with pytest.raises(LlavaDataError, match="no usable sample .*missing image"):
        make_dataset([BAD_SAMPLES["missing-image"][0], BAD_SAMPLES["two-markers"][0]], on_invalid="skip")


@pytest.mark.parametrize(("name", "allowed"), [("on_invalid", "('fail', 'skip')"),
                                               ("image_aspect_ratio", "('pad', 'crop')")])
def test_bad_choices_name_the_parameter_and_allowed_values(make_dataset, name, allowed):
    with pytest.raises(ValueError, match=re.escape(f"{name} must be one of {allowed}, got 'bogus'")):
        make_dataset([TEXT_ONLY], **{name: "bogus"})


def test_bad_sizes_are_value_errors(make_dataset, data, processor):
    path = write_sample_file(data, [TEXT_ONLY])
    for num_image_tokens, max_length in ((0, 10), (16, 0)):
        with pytest.raises(ValueError, match="num_image_tokens and max_length must be >= 1"):
            LlavaInstructDataset(path, data, processor, num_image_tokens, max_length=max_length)


# -- 5. expand_to_square -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "inside"), [((20, 10), (slice(5, 15), slice(0, 20))),
                                              ((10, 20), (slice(0, 20), slice(5, 15)))],
                         ids=["wide", "tall"])
def test_expand_to_square_centres_the_image_on_the_background(size, inside):
    background = (10, 200, 30)
    square = expand_to_square(Image.new("RGB", size, RED), background)
    assert square.size == (20, 20)
    pixels = np.asarray(square)  # rows, columns, channels
    expected = np.empty((20, 20, 3), dtype=np.uint8)
    expected[:] = background
    expected[inside] = RED
    np.testing.assert_array_equal(pixels, expected)


def test_expand_to_square_returns_a_square_image_unchanged():
    image = Image.new("RGB", (12, 12), RED)
    assert expand_to_square(image, (0, 0, 0)) is image


# -- 6. model folders ---------------------------------------------------------------------------------------------


def missing_part(error: pytest.ExceptionInfo) -> str:
    """The 'missing ...' list of a ModelFolderError message (the layout hint names every file, so test this)."""
    found = re.search(r"incomplete checkpoint folder, missing (.+?) \(expected", str(error.value))
    assert found, str(error.value)
    return found.group(1)


def copy_folder(model_folder: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(model_folder, folder)
    return folder


def test_complete_folder_passes(model_folder):
    assert check_model_folder(model_folder) == model_folder
    assert check_model_folder(str(model_folder)) == model_folder


def test_placeholder_and_missing_folder(tmp_path):
    with pytest.raises(ModelFolderError, match=re.escape(f"model.name_or_path={PLACEHOLDER} is the placeholder")):
        check_model_folder(PLACEHOLDER)
    assert PLACEHOLDER == "path/to/llava-1.5-7b-hf"
    absent = tmp_path / "nowhere"
    with pytest.raises(ModelFolderError, match=re.escape(f"model.atp={absent}: no such folder")):
        check_model_folder(absent, what="model.atp")


@pytest.mark.parametrize(("removed", "named"), [
    ("config.json", "config.json"),
    ("model.safetensors", "model.safetensors or pytorch_model.bin or model.safetensors.index.json"),
    ("tokenizer.json", "tokenizer.json or tokenizer.model"),
    ("tokenizer_config.json", "tokenizer_config.json"),
    ("processor_config.json", "preprocessor_config.json or processor_config.json"),
])
def test_folder_without_a_required_file_names_it(model_folder, tmp_path, removed, named):
    folder = copy_folder(model_folder, tmp_path)
    (folder / removed).unlink()
    with pytest.raises(ModelFolderError) as info:
        check_model_folder(folder)
    assert missing_part(info) == named
    assert isinstance(info.value, FileNotFoundError)


def test_tokenizer_and_processor_files_are_optional_without_need_processor(model_folder, tmp_path):
    folder = copy_folder(model_folder, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        (folder / name).unlink()
    assert check_model_folder(folder, need_processor=False) == folder
    with pytest.raises(ModelFolderError) as info:
        check_model_folder(folder)
    assert missing_part(info) == ("tokenizer_config.json, tokenizer.json or tokenizer.model, "
                                  "preprocessor_config.json or processor_config.json")


def test_weight_index_listing_a_missing_shard_names_the_shard(model_folder, tmp_path):
    folder = copy_folder(model_folder, tmp_path)
    shard = "model-00002-of-00002.safetensors"
    index = {"metadata": {}, "weight_map": {"a.weight": "model.safetensors", "b.weight": shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    with pytest.raises(ModelFolderError) as info:
        check_model_folder(folder)
    assert missing_part(info) == shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}), encoding="utf-8")
    with pytest.raises(ModelFolderError, match="not a weight index"):
        check_model_folder(folder)


def test_load_llava_returns_the_model_and_an_equivalent_processor(model_folder, model, processor):
    from transformers import LlavaForConditionalGeneration

    loaded, loaded_processor = load_llava(model_folder)
    assert isinstance(loaded, LlavaForConditionalGeneration)
    assert loaded.config.image_seq_length == model.config.image_seq_length
    for word in ("hello", "q1", "USER:", "<image>"):
        original = processor.tokenizer(word, add_special_tokens=False)["input_ids"]
        assert loaded_processor.tokenizer(word, add_special_tokens=False)["input_ids"] == original
        assert original != [processor.tokenizer.unk_token_id]
    state, loaded_state = model.state_dict(), loaded.state_dict()
    name = next(iter(state))
    assert torch.equal(state[name], loaded_state[name])


def test_load_llava_checks_the_folder_first(tmp_path):
    with pytest.raises(ModelFolderError, match="no such folder"):
        load_llava(tmp_path / "nowhere")


def test_a_sentencepiece_style_tokenizer_sees_the_whole_conversation_at_once(tmp_path, num_image_tokens):
    """With a Metaspace (SentencePiece-style) tokenizer, a piece of text tokenized on its own starts with a
    word-boundary token that the whole text does not have; the ids must be those of the whole conversation,
    and the labels exactly the answer words and their </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    words += [f"\u2581{w}" for w in ("USER:", "ASSISTANT:", "q1", "q2", "q3", "a1", "a2", "a3")] + ["\u2581", "\n"]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    model = tiny_llava(num_layers=2, grid=4)
    base = tiny_processor(model)
    processor = LlavaProcessor(image_processor=base.image_processor, tokenizer=tokenizer, patch_size=4,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token="<image>")
    sample = {"id": "sp", "conversations": [{"from": "human", "value": "q1 q2"}, {"from": "gpt", "value": "a1 a2"},
                                            {"from": "human", "value": "q3"}, {"from": "gpt", "value": "a3"}]}
    path = tmp_path / "sp.json"
    path.write_text(json.dumps([sample]), encoding="utf-8")
    item = LlavaInstructDataset(path, None, processor, num_image_tokens, system=None)[0]
    whole = "USER: q1 q2 ASSISTANT: a1 a2</s>USER: q3 ASSISTANT: a3</s>"
    expected = [tokenizer.bos_token_id] + tokenizer(whole, add_special_tokens=False)["input_ids"]
    assert item["input_ids"].tolist() == expected
    trained = item["labels"][item["labels"] != IGNORE_INDEX].tolist()
    assert tokenizer.convert_ids_to_tokens(trained) == ["\u2581a1", "\u2581a2", "</s>", "\u2581a3", "</s>"]
