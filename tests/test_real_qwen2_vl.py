"""The real-scale path on Qwen2-VL (and Qwen2.5-VL), offline: loading by the folder's model type, the
dynamic-resolution dataset and collator against the Qwen2-VL processor itself, a batch of images of different
sizes through the tiny model, a frozen-LM training run through the trainer, the reload of its result, and the
shipped config.

Everything runs on the tiny Qwen2-VL world of ``atp_repro.real.tiny_world`` (a whitespace word-level tokenizer
with Qwen2-VL's special tokens, images of different non-square sizes, patch 2 and merge 2: an image of h x w
pixels takes (h / 4) x (w / 4) tokens after the processor's resize).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from atp_repro.atp import ATPConfig, apply_atp, has_atp, load_atp_pretrained, proportional_module_layers, token_counts
from atp_repro.atp.api import ATP_WEIGHTS_FILE, _language_model
from atp_repro.real.data import (
    IGNORE_INDEX,
    LlavaCollator,
    LlavaInstructDataset,
    collator_for,
    conversation_messages,
)
from atp_repro.real.loading import (
    ModelFolderError,
    UnsupportedModelError,
    check_model_folder,
    load_llava,
    load_processor,
    load_vlm,
)
from atp_repro.real.tiny_world import COLOURS, QWEN_IMAGE_SIZES, tiny_model_and_processor, write_tiny_world
from atp_repro.training_config import MINI_CONFIG, REAL_CONFIG, ConfigError, load_training_config, parse_training_config

QWEN_CONFIG = "configs/qwen2vl_7b_atp.yaml"
MODEL_CLASSES = {"llava": "LlavaForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration",
                 "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
TWO_TURN = {"id": "two-turn", "image": "0.png",
            "conversations": [{"from": "human", "value": "what colour is the image ?\n<image>"},
                              {"from": "gpt", "value": "red"},
                              {"from": "human", "value": "say hello"},
                              {"from": "gpt", "value": "hello"}]}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The config of the tiny Qwen2-VL world (single process, LM frozen); beside it model/, images/, data.json."""
    return write_tiny_world(tmp_path_factory.mktemp("qwen"), variant="qwen2_vl", world_size=1, zero_stage=0,
                            save_steps=100)


@pytest.fixture(scope="module")
def loaded(world):
    """``(model, processor)`` of the world's folder, through the loader."""
    return load_vlm(world.parent / "model")


def make_dataset(world: Path, processor, samples=None, **kwargs) -> LlavaInstructDataset:
    """The world's data (or ``samples``, written beside it) as a dynamic-resolution dataset."""
    path = world.parent / "data.json"
    if samples is not None:
        path = world.parent / "samples.json"
        path.write_text(json.dumps(samples), encoding="utf-8")
    options = {"image_aspect_ratio": "native", "template": "processor", **kwargs}
    return LlavaInstructDataset(path, world.parent / "images", processor, None, **options)


def image_of(world: Path, sample: dict) -> Image.Image:
    with Image.open(world.parent / "images" / sample["image"]) as image:
        return image.convert("RGB")


def tokens(processor, ids) -> list[str]:
    return processor.tokenizer.convert_ids_to_tokens([int(i) for i in ids])


# -- loading ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(MODEL_CLASSES))
def test_the_loader_builds_the_class_that_config_json_names(tmp_path, variant):
    model, processor = tiny_model_and_processor(variant)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_vlm(tmp_path)
    assert type(loaded).__name__ == MODEL_CLASSES[variant]
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys() and all(torch.equal(state[k], loaded_state[k]) for k in state)
    assert type(loaded_processor).__name__ == type(processor).__name__
    words = "<|im_start|> user what colour" if variant != "llava" else "USER: what colour"
    assert loaded_processor.tokenizer(words)["input_ids"] == processor.tokenizer(words)["input_ids"]


def test_an_unsupported_model_type_fails_at_once_naming_it_and_the_supported_ones(world, tmp_path):
    folder = tmp_path / "other"
    shutil.copytree(world.parent / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llava_next"}))
    expected = "config.json has model_type 'llava_next', which is not supported here; supported: 'llava', " \
               "'qwen2_vl', 'qwen2_5_vl'"
    with pytest.raises(UnsupportedModelError, match=re.escape(expected)):
        load_vlm(folder)
    with pytest.raises(UnsupportedModelError, match="model_type 'qwen2_vl', which is not supported here; "
                                                    "supported: 'llava' "):
        load_llava(world.parent / "model")  # load_llava (load_local_llava, the atp_llava adapter) stays LLaVA-only
    with pytest.raises(ModelFolderError, match=re.escape("model.name_or_path=path/to/Qwen2-VL-7B-Instruct is the "
                                                         "placeholder")):
        check_model_folder("path/to/Qwen2-VL-7B-Instruct")


# -- data ---------------------------------------------------------------------------------------------------------


def test_dataset_ids_equal_the_qwen2_vl_processors_own_and_labels_cover_the_answers(world, loaded):
    _, processor = loaded
    dataset = make_dataset(world, processor, [TWO_TURN, {**TWO_TURN, "id": "tall", "image": "1.png"}])
    for index in range(2):
        item, sample = dataset[index], dataset.sample(index)
        rendered = processor.apply_chat_template(conversation_messages(sample), tokenize=False)
        expected = processor(text=[rendered], images=[image_of(world, sample)], return_tensors="pt")
        assert torch.equal(item["input_ids"], expected["input_ids"][0])
        assert torch.equal(item["pixel_values"], expected["pixel_values"])
        assert torch.equal(item["image_grid_thw"], expected["image_grid_thw"][0])
        labelled = item["labels"][item["labels"] != IGNORE_INDEX]
        assert tokens(processor, labelled) == ["red", "<|im_end|>", "hello", "<|im_end|>"]
        trained = item["labels"] != IGNORE_INDEX
        assert torch.equal(item["labels"][trained], item["input_ids"][trained])
        assert len(item["input_ids"]) == dataset.lengths[index]  # the length checked when the dataset was built
    # dynamic resolution: each image its own grid and token count, at its own aspect ratio (no square)
    counts = [int((dataset[i]["input_ids"] == processor.image_token_id).sum()) for i in range(2)]
    grids = [dataset[i]["image_grid_thw"].tolist() for i in range(2)]
    assert grids == [[1, 6, 10], [1, 12, 6]]  # 20 x 12 and 12 x 24 pixels, patch 2
    assert counts == [15, 18]
    padded_dataset = make_dataset(world, processor, [TWO_TURN], image_aspect_ratio="pad")
    padded = padded_dataset[0]
    assert padded["image_grid_thw"].tolist() == [1, 10, 10]  # padded to 20 x 20 first
    # 25 image tokens instead of 15, in the ids and in the length checked when the dataset was built
    assert len(padded["input_ids"]) == padded_dataset.lengths[0] == len(dataset[0]["input_ids"]) + 25 - 15


def test_the_collator_gives_the_processors_batch(world, loaded):
    """Samples with images of different sizes and a text-only one: input ids, attention mask, patches, grids and
    mm_token_type_ids as the Qwen2-VL processor makes them for the same texts and images (right-padded)."""
    _, processor = loaded
    dataset = make_dataset(world, processor)
    samples = [dataset.sample(i) for i in (0, 1, 3)]
    assert [s.get("image") for s in samples] == ["0.png", "1.png", None]
    batch = collator_for(dataset, processor.tokenizer.pad_token_id)([dataset[i] for i in (0, 1, 3)])
    texts = [processor.apply_chat_template(conversation_messages(s), tokenize=False) for s in samples]
    expected = processor(text=texts, images=[image_of(world, s) for s in samples[:2]], padding=True,
                         return_tensors="pt")
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(batch[key], expected[key]), key
    assert batch["image_grid_thw"].shape == (2, 3) and batch["pixel_values"].shape[0] == 15 * 4 + 18 * 4
    assert set(batch["mm_token_type_ids"].unique().tolist()) == {0, 1}
    assert batch["atp_padding_image"] is False


def test_a_batch_without_an_image_gets_a_padding_image_row(world, loaded):
    model, processor = loaded
    dataset = make_dataset(world, processor)
    text_only = [i for i in range(len(dataset)) if dataset.sample(i).get("image") is None]
    batch = collator_for(dataset, processor.tokenizer.pad_token_id)([dataset[i] for i in text_only])
    assert batch["atp_padding_image"] is True and batch["input_ids"].shape[0] == len(text_only) + 1
    grid = batch["image_grid_thw"]
    assert grid.shape == (1, 3) and batch["pixel_values"].shape == (int(grid.prod()), 24)
    assert (batch["pixel_values"] == 0).all()  # the mean colour, normalised
    row = batch["input_ids"][-1][batch["attention_mask"][-1].bool()]
    assert int((row == processor.image_token_id).sum()) == int(grid.prod()) // 4
    assert torch.equal(batch["mm_token_type_ids"][-1], (batch["input_ids"][-1] == processor.image_token_id).long())
    assert (batch["labels"][-1] == IGNORE_INDEX).all()
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if not k.startswith("atp_")}
        assert math.isfinite(float(model(**inputs).loss))


# -- model --------------------------------------------------------------------------------------------------------


def _forward(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k != "atp_padding_image"}
    out = model(**inputs)
    return out.logits, out.loss


@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl"])
def test_a_batch_of_different_image_sizes_gives_each_samples_own_logits_and_loss(world, variant):
    """ATP's training forward on a right-padded batch of three image sizes and a text-only sample: each row's logits
    are that sample's alone, and the loss is the per-sample losses combined as the model combines them (the mean
    over every labelled token of the batch)."""
    model, processor = tiny_model_and_processor(variant)
    cfg = load_training_config(world)
    model = apply_atp(model, ATPConfig(**{**cfg.atp_kwargs(), "temperature": 10.0})).train()
    dataset = make_dataset(world, processor)
    items = [dataset[i] for i in (0, 2, 3, 4)]
    assert len({tuple(item["image_grid_thw"].tolist()) for item in items if item["image_grid_thw"] is not None}) == 3
    collate = LlavaCollator(processor.tokenizer.pad_token_id, image_token_id=processor.image_token_id,
                            video_token_id=processor.video_token_id)
    with torch.no_grad():
        logits, loss = _forward(model, collate(items))
        assert math.isfinite(float(loss))
        singles = [_forward(model, collate([item])) for item in items]
    for i, (item, (single_logits, _)) in enumerate(zip(items, singles)):
        n = len(item["input_ids"])
        torch.testing.assert_close(logits[i, :n], single_logits[0], rtol=0, atol=2e-5)
    labelled = [int((item["labels"][1:] != IGNORE_INDEX).sum()) for item in items]  # shifted: the first predicts none
    combined = sum(float(single_loss) * k for (_, single_loss), k in zip(singles, labelled)) / sum(labelled)
    assert float(loss) == pytest.approx(combined, rel=1e-5)


# -- training through the trainer, and the reload -----------------------------------------------------------------


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """``train_from_config`` (what ``atp-repro train`` runs) on the tiny world: the summary, the trainer, and the
    model's weights before and after training."""
    from atp_repro.real import train

    captured = {}
    build = train.build_trainer

    def capturing(*args, **kwargs):
        trainer, resolved = build(*args, **kwargs)
        captured.update(trainer=trainer, before=_weights(trainer.model))
        return trainer, resolved

    out = tmp_path_factory.mktemp("qwen-run") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "build_trainer", capturing)
        summary = train.train_from_config(load_training_config(world), output_dir=str(out))
    trainer = captured["trainer"]
    return {"summary": summary, "trainer": trainer, "before": captured["before"], "after": _weights(trainer.model),
            "out": out}


def test_a_frozen_lm_run_moves_the_atp_thresholds_and_no_other_weight(trained):
    summary, trainer, before, after = trained["summary"], trained["trainer"], trained["before"], trained["after"]
    assert summary["global_step"] == 5 and summary["samples"] == 17 and summary["zero_stage"] == 0
    assert all(math.isfinite(x) for x in summary["logged_losses"])
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["atp"]
    atp_keys = {k for k in before if ".atp_modules." in k}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= atp_keys, sorted(changed - atp_keys)[:5]  # LM, vision tower, merger: unchanged
    assert {k for k in changed if "redundancy_head" in k}, "the thresholds did not move"
    model = trainer.model
    assert all(not p.requires_grad for p in model.model.visual.merger.parameters())  # the projector is frozen too
    assert summary["parameters"]["trainable"] == sum(p.numel() for p in _language_model(model).atp_modules.parameters())
    logged = [e for e in summary["log_history"] if "loss" in e]
    assert {"vision_tokens", "l_atp", "l_target"} <= set(logged[0])


def test_the_saved_model_reloads_with_the_trained_thresholds_and_generates(trained, world):
    out, trainer = trained["out"], trained["trainer"]
    model = load_atp_pretrained(out).eval()
    processor = load_processor(out, "qwen2_vl")
    assert has_atp(model) and type(model).__name__ == "Qwen2VLForConditionalGeneration"
    trained_atp = _language_model(trainer.model).atp_modules.state_dict()
    saved = torch.load(out / ATP_WEIGHTS_FILE, weights_only=True)
    reloaded = _language_model(model).atp_modules.state_dict()
    assert all(torch.equal(trained_atp[k], saved[k]) and torch.equal(saved[k], reloaded[k]) for k in saved)
    original, _ = load_vlm(world.parent / "model")
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in original.state_dict().items())  # the LM left as released
    question = {"type": "text", "text": "what colour is the image ?"}
    messages = [{"role": "user", "content": [{"type": "image"}, question]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image = Image.new("RGB", QWEN_IMAGE_SIZES[2], COLOURS["green"])
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    out_ids = model.generate(**inputs, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert out_ids.shape[1] == inputs["input_ids"].shape[1] + 3
    assert token_counts(model).shape == (1, 4) and int(token_counts(model)[0, 0]) == 28  # 28 x 16 px: 7 x 4


def test_a_trainable_lm_run_trains_merger_and_lm_and_resumes_to_the_uninterrupted_weights(tmp_path):
    """The main setting's trainable LM on Qwen2-VL, single process: the checkpoint holds every weight under the
    model's own names (Trainer reloads it with a plain load_state_dict), so a resumed run ends bit for bit where
    an uninterrupted one does."""
    from safetensors.torch import load_file

    from atp_repro.real.train import train_from_config

    cfg = load_training_config(write_tiny_world(tmp_path, samples=8, variant="qwen2_vl", world_size=1, zero_stage=0,
                                                save_steps=100, freeze_llm=False))
    assert cfg.atp.score_gradient
    full = train_from_config(cfg, output_dir=str(tmp_path / "full"))
    train_from_config(cfg, output_dir=str(tmp_path / "resumed"), stop_after_steps=1)
    resumed = train_from_config(cfg, output_dir=str(tmp_path / "resumed"), resume="last")
    assert resumed["resumed_from"].endswith("checkpoint-1") and resumed["global_step"] == full["global_step"] == 3
    for name in ("model.safetensors", ATP_WEIGHTS_FILE):
        load = load_file if name.endswith(".safetensors") else (lambda path: torch.load(path, weights_only=True))
        a, b = load(tmp_path / "full" / name), load(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    start, _ = load_vlm(tmp_path / "model")
    end, _ = load_vlm(tmp_path / "full")
    before, after = start.state_dict(), end.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.visual.merger.") for k in moved)
    assert any(k.startswith("model.language_model.layers.") for k in moved)
    assert not any(k.startswith("model.visual.") and not k.startswith("model.visual.merger.") for k in moved)


@pytest.mark.parametrize("freeze_llm", [False, True])
def test_set_trainable_freezes_the_vision_transformer_and_trains_its_merger_with_the_lm(freeze_llm):
    from atp_repro.real.train import set_trainable

    model, _ = tiny_model_and_processor("qwen2_vl")
    apply_atp(model, ATPConfig(module_layers=(1,), position_encoding="original"))
    counts = set_trainable(model, freeze_llm=freeze_llm)
    merger = {id(p) for p in model.model.visual.merger.parameters()}
    atp = {id(p) for p in _language_model(model).atp_modules.parameters()}
    for name, p in model.named_parameters():
        if id(p) in atp:
            assert p.requires_grad, name
        elif name.startswith("model.visual.") and id(p) not in merger:
            assert not p.requires_grad, name  # the vision transformer: frozen
        else:
            assert p.requires_grad == (not freeze_llm), name  # merger (the projector), LM, embeddings, lm_head
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_cheap_checks_of_a_qwen2_vl_run_come_before_the_weights_are_loaded(world, tmp_path, monkeypatch):
    from atp_repro.real import train

    monkeypatch.setattr(train, "load_vlm", lambda *a, **k: pytest.fail("the weights were loaded first"))
    data = yaml.safe_load(world.read_text())
    changed = tmp_path / "changed.yaml"

    def run(changes: dict, error, message: str) -> None:
        edited = json.loads(json.dumps(data))
        for dotted, value in changes.items():
            section, key = dotted.split(".")
            edited[section][key] = value
        changed.write_text(yaml.safe_dump(edited), encoding="utf-8")
        with pytest.raises(error, match=message):
            train.train_from_config(load_training_config(changed))

    run({"model.vision_grid": 4, "data.image_aspect_ratio": "pad"}, ValueError,
        r"model\.vision_grid=4 in the config, but the model at .* \(qwen2_vl\) has dynamic resolution: set "
        r"model\.vision_grid: null")
    run({"model.num_hidden_layers": 6}, ValueError, "model.num_hidden_layers=6 in the config, but the model")
    other = tmp_path / "other"
    shutil.copytree(world.parent / "model", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "idefics3"}))
    run({"model.name_or_path": str(other)}, UnsupportedModelError, "model_type 'idefics3', which is not supported")


def test_a_llava_folder_with_a_dynamic_resolution_config_is_refused_before_loading(tmp_path, monkeypatch):
    from atp_repro.real import train

    config = write_tiny_world(tmp_path, world_size=1, zero_stage=0)  # LLaVA, a 4 x 4 grid
    data = yaml.safe_load(config.read_text())
    data["model"]["vision_grid"] = None
    data["atp"]["position_encoding"] = "original"
    data["data"].update(image_aspect_ratio="native", conversation_template="processor")
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    monkeypatch.setattr(train, "load_vlm", lambda *a, **k: pytest.fail("the weights were loaded first"))
    with pytest.raises(ValueError, match=r"model\.vision_grid: null \(dynamic resolution\) in the config, but the "
                                         r"model at .* \(llava\) has a fixed grid"):
        train.train_from_config(load_training_config(config))


# -- the shipped config -------------------------------------------------------------------------------------------


def test_the_shipped_qwen2_vl_config_loads_and_validates():
    real, qwen = load_training_config(REAL_CONFIG), load_training_config(QWEN_CONFIG)
    assert qwen.scale == "real" and qwen.inherits == REAL_CONFIG
    assert qwen.model.name_or_path == "path/to/Qwen2-VL-7B-Instruct"
    assert qwen.model.num_hidden_layers == 28 and qwen.model.vision_grid is None and qwen.model.dynamic_resolution
    assert qwen.model.num_vision_tokens is None
    assert qwen.atp.module_layers == proportional_module_layers(28) == (3, 12, 21)
    assert qwen.training.freeze_llm is True and qwen.atp.score_gradient is False
    assert qwen.atp.position_encoding == "original"
    assert qwen.data.conversation_template == "processor" and qwen.data.image_aspect_ratio == "native"
    assert qwen.atp.n_target == pytest.approx(256 * 130 / 144, abs=0.5)  # Table 7's 256 tokens (see its reason)
    assert all(o.reason for o in qwen.overrides)
    # everything else is the LLaVA config's: supplementary Table 1 and the rest of the ATP objective
    changed = {o.key for o in qwen.overrides}
    for row in real.describe():
        if row["key"] not in changed:
            assert qwen.get(row["key"]) == row["value"], row["key"]
    ATPConfig(**qwen.atp_kwargs())
    with pytest.raises(ModelFolderError, match="path/to/Qwen2-VL-7B-Instruct is the placeholder"):
        check_model_folder(qwen.model.name_or_path)


@pytest.mark.parametrize(("section", "key", "value", "message"), [
    ("atp", "position_encoding", "learned2d", r"atp\.position_encoding: 'learned2d' with model\.vision_grid: null.*"
                                              r"allowed: 'original'"),
    ("data", "image_aspect_ratio", "crop", r"data\.image_aspect_ratio: 'crop' .* allowed: 'native'.*'pad'"),
    ("data", "conversation_template", "llava_v1", r"data\.conversation_template: 'llava_v1' .* allowed: 'processor'"),
])
def test_dynamic_resolution_settings_that_cannot_work_name_the_key(section, key, value, message):
    data = load_training_config(QWEN_CONFIG).to_dict()
    data[section][key] = value
    with pytest.raises(ConfigError, match=message):
        parse_training_config(data)


def test_dynamic_resolution_keys_need_the_matching_model():
    data = load_training_config(REAL_CONFIG).to_dict()
    data["data"]["image_aspect_ratio"] = "native"
    with pytest.raises(ConfigError, match=r"data\.image_aspect_ratio: 'native' .* needs dynamic resolution "
                                          r"\(model\.vision_grid: null\); .* allowed: 'pad', 'crop'"):
        parse_training_config(data)
    mini = load_training_config(MINI_CONFIG)
    with pytest.raises(ConfigError, match=r"model\.vision_grid: null \(dynamic resolution\) is for real-scale"):
        dataclasses.replace(mini, model=dataclasses.replace(mini.model, vision_grid=None))


def test_an_image_the_processor_cannot_resize_fails_naming_its_file(world, loaded):
    Image.new("RGB", (2 * 201 * 28, 28), (10, 20, 30)).save(world.parent / "images" / "strip.png")  # aspect > 200
    sample = {"id": "strip", "image": "strip.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat colour is the image ?"}, {"from": "gpt", "value": "red"}]}
    with pytest.raises(ValueError, match=r"sample 0 \(id strip\): unusable image: .*strip\.png \("):
        make_dataset(world, loaded[1], samples=[sample])
