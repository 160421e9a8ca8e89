"""The real-scale training path on tiny random models: HF Trainer single-process, and DeepSpeed ZeRO-3
over two processes (gloo on CPU) launched by torchrun, as a GPU run would be.

The two-process runs are marked ``distributed`` (they are part of ``make test``: about a minute).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from atp_repro import numerics
from atp_repro.atp import has_atp, load_atp_pretrained, token_counts
from atp_repro.atp.api import ATP_CONFIG_FILE, ATP_WEIGHTS_FILE, _language_model
from atp_repro.real.tiny_world import write_tiny_world
from atp_repro.real.train import SUMMARY_FILE, build_trainer
from atp_repro.training_config import load_training_config

TIMEOUT_S = 600


# -- single process: what the optimizer sees --------------------------------------------------------


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def _cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """LR multiplier after ``step`` scheduler steps (linear warm-up, then cosine to 0), written out here."""
    if step < warmup:
        return step / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.fixture(scope="module")
def single_world(tmp_path_factory) -> Path:
    return write_tiny_world(tmp_path_factory.mktemp("single"), world_size=1, zero_stage=0, save_steps=100)


def _train_single(config: Path, tmp_path: Path, **overrides):
    cfg = load_training_config(config)
    if overrides:
        import dataclasses

        cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, **overrides))
    trainer, resolved = build_trainer(cfg, output_dir=str(tmp_path / "out"))
    rows: list[int] = []  # real samples per forward (a padding image row is not a sample)
    original = trainer.compute_loss

    def counting(model, inputs, *args, **kwargs):
        rows.append(int(inputs["input_ids"].shape[0]) - int(bool(inputs.get("atp_padding_image", False))))
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = counting
    model = trainer.model
    parts = {"vision": model.model.vision_tower, "projector": model.model.multi_modal_projector,
             "lm_layers": _language_model(model).layers, "atp": _language_model(model).atp_modules}
    before = {name: _weights(part) for name, part in parts.items()}
    trainer.train()
    after = {name: _weights(part) for name, part in parts.items()}
    return cfg, trainer, resolved, rows, {name: _changed(before[name], after[name]) for name in parts}, before, after


def test_the_optimizer_sees_the_global_batch_both_learning_rates_and_the_cosine_schedule(single_world, tmp_path):
    cfg, trainer, resolved, rows, changed, before, after = _train_single(single_world, tmp_path)
    t = cfg.training
    # the global batch: per-device x accumulation x processes, and every step consumed that many samples
    assert resolved["gradient_accumulation_steps"] == t.global_batch_size // t.per_device_batch_size
    assert resolved["global_batch_size"] == t.global_batch_size == 4
    steps = trainer.state.global_step
    accumulation = resolved["gradient_accumulation_steps"]
    per_step = [sum(rows[i * accumulation:(i + 1) * accumulation]) for i in range(steps)]
    samples = resolved["samples"]
    assert per_step[:-1] == [t.global_batch_size] * (steps - 1)  # the last step takes what is left of the epoch
    assert sum(per_step) == samples == 17 and steps == math.ceil(samples / t.global_batch_size)
    # two parameter groups with the config's learning rates, AdamW, weight decay from the config
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert set(groups) == {"lm", "atp"}
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), torch.optim.AdamW)
    assert groups["lm"]["initial_lr"] == t.lr_llm and groups["atp"]["initial_lr"] == t.lr_atp
    assert all(g["weight_decay"] == t.weight_decay for g in groups.values())
    atp_ids = {id(p) for p in _language_model(trainer.model).atp_modules.parameters()}
    assert {id(p) for p in groups["atp"]["params"]} == atp_ids
    assert not atp_ids & {id(p) for p in groups["lm"]["params"]}
    # the schedule: warm-up of ceil(0.03 x steps), then cosine decay to zero, the same multiplier for both groups
    warmup = math.ceil(t.warmup_ratio * steps)
    logged = [e for e in trainer.state.log_history if "lr_lm" in e]
    assert len(logged) == steps
    for step, entry in enumerate(logged, start=1):  # logged after the scheduler's step
        factor = _cosine_with_warmup(step, steps, warmup)
        assert entry["lr_lm"] == pytest.approx(t.lr_llm * factor, abs=1e-12)
        assert entry["lr_atp"] == pytest.approx(t.lr_atp * factor, abs=1e-12)
    # what trains: LM, projector and ATP; the vision tower is frozen (LLaVA-1.5 stage 2)
    assert not changed["vision"]
    assert changed["projector"] and changed["lm_layers"]
    heads = {k for k in changed["atp"] if "_head." in k}
    assert heads, "the ATP threshold heads did not move"
    assert {"vision_tokens", "l_atp", "l_target"} <= set(logged[0])


def test_frozen_lm_trains_the_atp_modules_alone(single_world, tmp_path):
    cfg, trainer, _, _, changed, _, _ = _train_single(single_world, tmp_path, freeze_llm=True)
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["atp"]
    assert not changed["vision"] and not changed["projector"] and not changed["lm_layers"]
    assert changed["atp"]


def test_gradient_checkpointing_trains_to_the_same_weights(tmp_path):
    plain = write_tiny_world(tmp_path / "plain", world_size=1, zero_stage=0, save_steps=100)
    checkpointed = write_tiny_world(tmp_path / "ckpt", world_size=1, zero_stage=0, save_steps=100,
                                    gradient_checkpointing=True)
    *_, after_plain = _train_single(plain, tmp_path / "a")
    cfg, trainer, *_, after_checkpointed = _train_single(checkpointed, tmp_path / "b")
    assert trainer.args.activation_checkpointing and trainer.model.is_activation_checkpointing
    for part, weights in after_plain.items():
        for key, value in weights.items():
            torch.testing.assert_close(after_checkpointed[part][key], value, rtol=1e-5, atol=1e-6)


def test_a_single_process_run_resumes_to_the_uninterrupted_weights(single_world, tmp_path):
    """Without DeepSpeed, Trainer reloads a checkpoint with a plain load_state_dict: the checkpoint must hold
    the weights under the model's own names, or the run would silently continue from the initial weights."""
    from atp_repro.real.train import train_from_config

    cfg = load_training_config(single_world)
    full = train_from_config(cfg, output_dir=str(tmp_path / "full"))
    stopped = train_from_config(cfg, output_dir=str(tmp_path / "resumed"), stop_after_steps=2)
    assert stopped["final_model"] is None and (tmp_path / "resumed" / "checkpoint-2").is_dir()
    resumed = train_from_config(cfg, output_dir=str(tmp_path / "resumed"), resume="last")
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["global_step"] == full["global_step"]
    for name in ("model.safetensors", ATP_WEIGHTS_FILE):
        load = load_file if name.endswith(".safetensors") else (lambda p: torch.load(p, weights_only=True))
        a, b = load(tmp_path / "full" / name), load(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def _derived(base: Path, tmp_path: Path, **changes) -> Path:
    """A copy of a tiny config with ``section.key`` values changed."""
    import yaml

    data = yaml.safe_load(base.read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        data[section][key] = value
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.mark.parametrize(("changes", "message"), [
    ({"data__train_json": "/nonexistent/data.json"}, "data.train_json=/nonexistent/data.json: no such file"),
    ({"data__image_folder": "/nonexistent/images"}, "data.image_folder=/nonexistent/images: no such folder"),
    ({"model__num_hidden_layers": 6, "atp__module_layers": [1]}, "model.num_hidden_layers=6 in the config, but"),
])
def test_cheap_checks_come_before_the_weights_are_loaded(single_world, tmp_path, monkeypatch, changes, message):
    from atp_repro.real import train

    monkeypatch.setattr(train, "load_vlm", lambda *a, **k: pytest.fail("the weights were loaded first"))
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        train.train_from_config(load_training_config(_derived(single_world, tmp_path, **changes)))


def test_resume_last_skips_an_interrupted_save_and_refuses_another_launch(single_world, tmp_path, monkeypatch):
    from atp_repro.real import train

    out = tmp_path / "out"
    for step, complete in ((2, True), (4, False)):  # a save killed while writing checkpoint-4
        folder = out / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        if complete:
            (folder / train.COMPLETE_MARKER).write_text("{}")
            (folder / train.LAUNCH_FILE).write_text(json.dumps({"processes": 2, "zero_stage": 3}))
    cfg = load_training_config(single_world)
    assert train.resume_checkpoint(cfg, "last", str(out)) == str(out / "checkpoint-2")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint folder"):
        train.resume_checkpoint(cfg, str(out / "checkpoint-4"), str(out))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train.resume_checkpoint(cfg, "last", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="resume it with the same number of processes"):
        train.check_launch(out / "checkpoint-2", {"processes": 1, "zero_stage": 0})
    train.check_launch(out / "checkpoint-2", {"processes": 2, "zero_stage": 3})


# -- two processes, DeepSpeed ZeRO-3 -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(config: Path, output_dir: Path, *extra: str, native_numerics: bool = False) -> dict:
    """``torchrun --nproc_per_node 2 -m atp_repro train --config ...``; the run's summary file."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "atp_repro", "train", "--config", str(config), "--output-dir",
               str(output_dir), "--no-progress", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if native_numerics:  # the CPU's own code paths (bf16 kernels), not the pinned AVX2 ones
        env = {k: v for k, v in env.items() if k not in numerics.PINNED_ENV}
        env[numerics.MODE_ENV_VAR] = "native"
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads((output_dir / SUMMARY_FILE).read_text())


@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3")
    config = write_tiny_world(root, world_size=2, zero_stage=3, save_steps=2)
    full = _torchrun(config, root / "full")
    stopped = _torchrun(config, root / "resumed", "--stop-after-steps", "3")
    resumed = _torchrun(config, root / "resumed", "--resume", "last")
    return {"root": root, "config": config, "full": full, "stopped": stopped, "resumed": resumed}


@pytest.mark.distributed
def test_zero3_over_two_processes_trains_with_the_config_batch(zero3_runs):
    full = zero3_runs["full"]
    assert full["processes"] == 2 and full["zero_stage"] == 3 and full["deepspeed"].endswith("zero3.json")
    assert full["gradient_accumulation_steps"] == 2 and full["global_batch_size"] == 4
    assert full["samples"] == 17  # 16 image questions and one text-only sample
    losses = full["logged_losses"]
    assert len(losses) == full["global_step"] == full["max_steps"] == 5
    assert sum(losses[-2:]) / 2 < losses[0], f"the loss did not decrease: {losses}"
    checkpoint = zero3_runs["root"] / "full" / "checkpoint-4"
    assert (checkpoint / f"global_step{4}").is_dir()  # DeepSpeed's partitioned model and optimizer states
    assert (checkpoint / ATP_WEIGHTS_FILE).is_file() and (checkpoint / ATP_CONFIG_FILE).is_file()


@pytest.mark.distributed
def test_resuming_from_a_checkpoint_gives_the_weights_of_an_uninterrupted_run(zero3_runs):
    root = zero3_runs["root"]
    assert zero3_runs["stopped"]["global_step"] == 3 and zero3_runs["stopped"]["final_model"] is None
    assert zero3_runs["resumed"]["resumed_from"].endswith("checkpoint-3")
    assert zero3_runs["resumed"]["global_step"] == 5
    full, resumed = load_file(root / "full" / "model.safetensors"), load_file(root / "resumed" / "model.safetensors")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    full_atp = torch.load(root / "full" / ATP_WEIGHTS_FILE, weights_only=True)
    resumed_atp = torch.load(root / "resumed" / ATP_WEIGHTS_FILE, weights_only=True)
    assert full_atp.keys() == resumed_atp.keys()
    assert all(torch.equal(full_atp[k], resumed_atp[k]) for k in full_atp)


@pytest.mark.distributed
def test_the_saved_model_reloads_with_trained_thresholds_and_generates(zero3_runs):
    from transformers import AutoProcessor

    folder = zero3_runs["root"] / "full"
    model = load_atp_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    assert has_atp(model)
    module = _language_model(model).atp_modules[0]
    bias = module.threshold_net.redundancy_head.bias
    initial = math.log(0.01 / 0.99)  # ATPConfig.init_keep_threshold = 0.01 (weights start at zero)
    assert module.threshold_net.redundancy_head.weight.abs().sum() > 0 or float(bias) != pytest.approx(initial)
    from PIL import Image

    image = Image.open(zero3_runs["root"] / "images" / "0.png")
    inputs = processor(images=image, text="USER: <image>\nwhat colour is the image ? ASSISTANT:", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert token_counts(model).shape == (1, 4)


def _cpu_has_fast_bf16() -> bool:
    from atp_repro.provenance import cpuinfo_field

    flags = (cpuinfo_field("flags") or "").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


@pytest.mark.distributed
@pytest.mark.skipif(not _cpu_has_fast_bf16(), reason="bf16 training needs a CPU with AVX512-BF16 or AMX")
def test_zero3_trains_in_bf16_as_the_shipped_config_asks(tmp_path):
    """The real config trains in bf16: the model's weights are bf16 under DeepSpeed, and the ATP modules,
    created after loading, must be too (ZeRO-3 flattens every parameter into one dtype)."""
    import yaml

    config = write_tiny_world(tmp_path, world_size=2, zero_stage=3, save_steps=100)
    data = yaml.safe_load(config.read_text())
    data["training"]["precision"] = "bf16"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    summary = _torchrun(config, tmp_path / "out", native_numerics=True)
    assert summary["precision"] == "bf16" and summary["zero_stage"] == 3
    assert summary["global_step"] == 5 and all(math.isfinite(x) for x in summary["logged_losses"])
