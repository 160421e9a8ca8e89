"""Real-scale ATP training: HF ``Trainer`` (and DeepSpeed ZeRO-3 when distributed) from a config file.

    atp-repro train --config configs/llava15_7b_atp.yaml                      # 1 process: CPU or one GPU
    torchrun --nproc_per_node 4 -m atp_repro train --config my_run.yaml        # ZeRO-3 over 4 GPUs
    deepspeed --num_gpus 4 -m atp_repro train --config my_run.yaml             # the same with DeepSpeed's launcher
    accelerate launch --num_processes 4 -m atp_repro train --config my_run.yaml

What supplementary Table 1 fixes is read from the config: the global batch (the gradient
accumulation is derived from the world size actually launched, so that per-device batch x
accumulation x processes = global batch), AdamW with two learning rates (language model and
projector; ATP modules), cosine decay after a linear warm-up of ``warmup_ratio``, weight decay, one
epoch, gradient clipping, bf16 where the device has fast bf16 (else fp32, recorded). The vision
tower is frozen (LLaVA-1.5 stage 2); ``freeze_llm`` trains the ATP modules alone (supplementary
Sec. 1.2, and Table 7's setting for Qwen2-VL). The loss is the LM loss plus ATP's budget loss.

The model is the one the folder's ``config.json`` names (:func:`atp_repro.real.loading.load_vlm`):
LLaVA-1.5 (a fixed grid of ``image_seq_length`` tokens per image) or Qwen2-VL / Qwen2.5-VL (dynamic
resolution: ``model.vision_grid: null``; each image its own grid, M-RoPE positions from the batch's
``mm_token_type_ids``). Checkpoints are HF Trainer checkpoints
(with DeepSpeed, its ZeRO shards) plus the ATP files, so ``--resume`` continues a run, and the final
folder loads with :func:`atp_repro.atp.load_atp_pretrained`.

More than one process runs under DeepSpeed with ``training.deepspeed_config`` when
``training.deepspeed_zero_stage`` > 0 (DDP otherwise); a single process runs the plain Trainer.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from .. import paths
from ..atp import ATPConfig, apply_atp, atp_parameters, budget_breakdown, has_atp, save_atp, token_counts
from ..atp.api import ATP_WEIGHTS_FILE, _language_model
from ..atp.architectures import LLAVA, architecture_of
from ..training_config import TrainingConfig
from .data import LlavaInstructDataset, collator_for
from .loading import QWEN_MODEL_TYPES, load_vlm

logger = logging.getLogger(__name__)
# DeepSpeed's ZeRO-3 calls torch.distributed's deprecated collectives once per gather: hundreds of lines a step
warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*", category=FutureWarning)
ATP_KEY = "atp_modules."
SUMMARY_FILE = "atp_train_summary.json"


def world_size() -> int:
    """Processes of this launch (``WORLD_SIZE`` set by torchrun / deepspeed / accelerate; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def gradient_accumulation(cfg: TrainingConfig, processes: int) -> int:
    """Accumulation steps that keep the config's global batch with ``processes`` processes."""
    t = cfg.training
    per_step = t.per_device_batch_size * processes
    if t.global_batch_size % per_step:
        raise ValueError(
            f"training.global_batch_size={t.global_batch_size} is not a multiple of training.per_device_batch_size "
            f"x processes = {t.per_device_batch_size} x {processes}; change per_device_batch_size or the launch size")
    return t.global_batch_size // per_step


def resolve_precision(requested: str, device: str) -> str:
    """``bf16`` where the device has fast bf16 (CUDA with bf16, or a CPU with AVX512-BF16 / AMX), else ``fp32``."""
    if requested != "bf16":
        return requested
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    from ..efficiency.strategies import fast_bf16_available

    return "bf16" if fast_bf16_available("cpu") else "fp32"


def training_arguments(cfg: TrainingConfig, *, output_dir: str | None = None, max_steps: int | None = None,
                       processes: int | None = None) -> tuple[TrainingArguments, dict]:
    """HF ``TrainingArguments`` for ``cfg`` and a record of what was resolved (precision, accumulation, DeepSpeed).

    Create them before the model is loaded: under ZeRO-3 transformers then partitions the weights at load time.
    """
    if cfg.scale != "real" or cfg.data is None:
        raise ValueError(f"{cfg.name}: real-scale training needs scale: real and a 'data' section "
                         f"(got scale {cfg.scale!r}, data {'present' if cfg.data else 'absent'})")
    t, run = cfg.training, cfg.run or _default_run(cfg)
    processes = processes or world_size()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(t.precision, device)
    use_deepspeed = t.deepspeed_zero_stage > 0 and processes > 1
    steps = max_steps if max_steps is not None else run.max_steps
    if use_deepspeed:  # DeepSpeed's own process group (gloo on CPU), before zero.Init reads the world size
        import deepspeed

        deepspeed.init_distributed(dist_backend=deepspeed.get_accelerator().communication_backend_name())
    args = TrainingArguments(
        output_dir=str(paths.resolve(output_dir or run.output_dir)),
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=gradient_accumulation(cfg, processes),
        learning_rate=t.lr_llm,
        weight_decay=t.weight_decay,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        optim="adamw_torch",
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        num_train_epochs=t.epochs,
        max_steps=steps if steps is not None else -1,
        max_grad_norm=t.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=run.logging_steps,
        save_strategy="steps",
        save_steps=run.save_steps,
        save_total_limit=run.save_total_limit,
        dataloader_num_workers=run.dataloader_num_workers,
        activation_checkpointing=run.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},  # ATP's soft path rejects the reentrant mode
        remove_unused_columns=False,  # the collator's keys (pixel_values, atp_answer_mask) go to the model
        report_to=[],
        deepspeed=str(paths.resolve(t.deepspeed_config)) if use_deepspeed else None,
    )
    if args.n_gpu > 1:  # one process seeing several GPUs: Trainer would use nn.DataParallel
        raise ValueError(f"one process sees {args.n_gpu} GPUs; launch one process per GPU (torchrun --nproc_per_node "
                         f"{args.n_gpu} -m atp_repro train ...) or set CUDA_VISIBLE_DEVICES to one GPU")
    if args.world_size != processes:  # args.world_size also sets up the process group (before zero.Init loads)
        raise RuntimeError(f"the launcher started {args.world_size} processes but WORLD_SIZE says {processes}")
    resolved = {"precision": precision, "requested_precision": t.precision, "device": device,
                "processes": processes, "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "global_batch_size": t.per_device_batch_size * args.gradient_accumulation_steps * processes,
                "deepspeed": args.deepspeed, "zero_stage": t.deepspeed_zero_stage if use_deepspeed else 0}
    return args, resolved


def _default_run(cfg: TrainingConfig):
    from ..training_config import RunSection

    return RunSection(output_dir=f"runs/{cfg.name}")


def vision_encoder_parameters(model: torch.nn.Module) -> set[int]:
    """ids of the vision encoder's parameters without the projector: LLaVA's ``vision_tower`` (its projector,
    ``multi_modal_projector``, sits beside it); Qwen2-VL's ``visual`` without ``visual.merger``, its projector."""
    if architecture_of(model) == LLAVA:
        tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    else:
        tower, projector = model.model.visual, model.model.visual.merger
    return {id(p) for p in tower.parameters()} - {id(p) for p in projector.parameters()}


def image_tokens_per_image(model: torch.nn.Module) -> int | None:
    """Vision tokens one image takes in the sequence: LLaVA's ``image_seq_length``; None for dynamic resolution
    (Qwen2-VL: each image's own count, from the image processor's grid)."""
    return int(model.config.image_seq_length) if architecture_of(model) == LLAVA else None


def set_trainable(model: torch.nn.Module, freeze_llm: bool) -> dict[str, int]:
    """Vision encoder frozen (LLaVA-1.5 stage 2); projector and LM trainable unless ``freeze_llm``; ATP always.

    The projector is LLaVA's ``multi_modal_projector`` or Qwen2-VL's ``visual.merger``
    (:func:`vision_encoder_parameters`)."""
    atp_ids = {id(p) for p in atp_parameters(model)} if has_atp(model) else set()
    vision_ids = vision_encoder_parameters(model)
    counts = defaultdict(int)
    for p in model.parameters():
        train = id(p) in atp_ids or (not freeze_llm and id(p) not in vision_ids)
        p.requires_grad_(train)
        numel = getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions hold numel() == 0
        counts["trainable" if train else "frozen"] += numel
    return dict(counts)


class ATPTrainer(Trainer):
    """``Trainer`` whose loss adds ATP's budget loss, with the ATP modules' own learning rate.

    The LM loss is the model's per-micro-batch mean (as LLaVA-1.5 trained) and the budget loss is per
    micro-batch too, so both are divided by the accumulation steps alike. Logged beside the loss:
    ``l_atp``, ``l_target`` and ``vision_tokens`` (the paper's Token: vision tokens averaged over all
    decoder layers) averaged over the logging interval, and both learning rates.
    """

    def __init__(self, *args, lr_atp: float, launch_zero_stage: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lr_atp = lr_atp
        self.launch_zero_stage = launch_zero_stage  # recorded in checkpoints (a resume needs the same launch)
        self.model_accepts_loss_kwargs = False  # per-micro-batch mean LM loss, scaled for accumulation by Trainer
        self._atp_sums: dict[str, float] = defaultdict(float)
        self._atp_count = 0

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = self.model if model is None else model
            atp_ids = {id(p) for p in atp_parameters(model)} if has_atp(model) else set()
            lm = [p for p in model.parameters() if p.requires_grad and id(p) not in atp_ids]
            atp = [p for p in model.parameters() if p.requires_grad and id(p) in atp_ids]
            groups = [{"params": lm, "lr": self.args.learning_rate, "name": "lm"}] if lm else []
            groups += [{"params": atp, "lr": self.lr_atp, "name": "atp"}] if atp else []
            if not groups:
                raise ValueError("nothing to train: every parameter is frozen and the model has no ATP modules")
            for group in groups:
                group["weight_decay"] = self.args.weight_decay
            self.optimizer = torch.optim.AdamW(groups, betas=(self.args.adam_beta1, self.args.adam_beta2),
                                               eps=self.args.adam_epsilon)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        padding_image = bool(inputs.pop("atp_padding_image", False))  # see LlavaCollator
        outputs = model(**inputs)
        loss = outputs.loss
        unwrapped = self.accelerator.unwrap_model(model)
        if padding_image and has_atp(unwrapped):  # the only image is the padding row: its graph, not its budget
            loss = loss + 0.0 * budget_breakdown(unwrapped)["budget_loss"]
        elif has_atp(unwrapped) and inputs.get("pixel_values") is not None:
            terms = budget_breakdown(unwrapped)
            loss = loss + terms["budget_loss"]
            counts = token_counts(unwrapped).float()
            with_image = counts[:, 0] > 0
            self._atp_sums["l_atp"] += float(terms["l_atp"].detach())
            self._atp_sums["l_target"] += float(terms["l_target"].detach())
            self._atp_sums["vision_tokens"] += float(counts[with_image].mean())
            self._atp_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._atp_count:
            logs.update({k: v / self._atp_count for k, v in self._atp_sums.items()})
            self._atp_sums.clear()
            self._atp_count = 0
        if "loss" in logs and self.optimizer is not None:
            for group in self.optimizer.param_groups:
                logs[f"lr_{group.get('name', 'group')}"] = group["lr"]
        super().log(logs, start_time)

    # -- checkpoints: the stock HF files plus the ATP files ----------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Trainer's ``_save`` (weights, processor, training arguments) plus the ATP files.

        The weights are written in transformers' own key layout (``save_original_format=False``):
        Trainer's resume without DeepSpeed loads them with a plain ``load_state_dict``, which does not
        convert the original LLaVA / Qwen2-VL layout back and would silently keep the initial weights. Both
        layouts load with ``from_pretrained``."""
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        # save_pretrained drops the ATP keys from the state dict it is given: take them first
        source = state_dict if state_dict else self.model.state_dict()
        atp_state = {k.split(ATP_KEY, 1)[1]: v.detach().cpu().clone() for k, v in source.items() if ATP_KEY in k}
        self.model.save_pretrained(output_dir, state_dict=state_dict, save_original_format=False)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        launch = {"processes": self.args.world_size, "zero_stage": self.launch_zero_stage}
        paths.atomic_write_text(Path(output_dir) / LAUNCH_FILE, json.dumps(launch))
        if has_atp(self.model):
            if not atp_state or any(v.numel() == 0 for v in atp_state.values()):
                raise RuntimeError("the ATP module weights were not gathered; set "
                                   "stage3_gather_16bit_weights_on_model_save: true in the DeepSpeed config")
            save_atp(self.model, output_dir, state_dict=atp_state)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Trainer's loading (without DeepSpeed), checked to have restored every weight, then the ATP modules."""
        target = model if model is not None else self.model
        expected = {k for k in target.state_dict() if ATP_KEY not in k}
        found = checkpoint_keys(resume_from_checkpoint)
        if not expected <= found:
            missing = sorted(expected - found)
            raise RuntimeError(f"{resume_from_checkpoint}: the checkpoint does not hold {len(missing)} of the model's "
                               f"weights under the model's names (e.g. {missing[0]}); it was not written by this "
                               "trainer, so resuming would continue from the initial weights")
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if has_atp(target):
            weights = Path(resume_from_checkpoint) / ATP_WEIGHTS_FILE
            if not weights.is_file():
                raise FileNotFoundError(f"{weights}: the checkpoint has no ATP weights; cannot resume an ATP run")
            state = torch.load(weights, map_location="cpu", weights_only=True)
            _language_model(target).atp_modules.load_state_dict(state)


def checkpoint_keys(folder: str | Path) -> set[str]:
    """The tensor names of a checkpoint folder's safetensors files."""
    from safetensors import safe_open

    keys: set[str] = set()
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            keys |= set(handle.keys())
    return keys


class StopAfter(TrainerCallback):
    """Stops training after ``steps`` optimizer steps, as if the job were killed right after a checkpoint."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:
            control.should_save = True
            control.should_training_stop = True
        return control


def build_trainer(cfg: TrainingConfig, *, output_dir: str | None = None, max_steps: int | None = None,
                  stop_after_steps: int | None = None) -> tuple[ATPTrainer, dict]:
    """Everything a run needs: arguments, model with ATP, data, trainer; and the resolved settings."""
    check_inputs(cfg)
    args, resolved = training_arguments(cfg, output_dir=output_dir, max_steps=max_steps)
    # Half-precision weights only under DeepSpeed, which keeps fp32 master copies in its optimizer; otherwise
    # fp32 weights and autocast (AdamW on bf16 weights would lose most updates at lr 2e-5).
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolved["precision"])
    dtype = half if half is not None and resolved["deepspeed"] else torch.float32
    run = cfg.run or _default_run(cfg)
    model, processor = load_vlm(cfg.model.name_or_path, dtype=dtype, attn_implementation=run.attn_implementation)
    atp = ATPConfig(**cfg.atp_kwargs())
    if atp.init_calibration != "none":
        raise ValueError(f"atp.init_calibration={atp.init_calibration!r} is a mini-world option; real-scale "
                         "training supports 'none' (the paper's start)")
    set_seed(cfg.training.seed)  # the ATP modules' initial weights: the same on every process and in every run
    apply_atp(model, atp)
    _language_model(model).atp_modules.to(dtype)  # DeepSpeed needs one dtype for all parameters
    resolved["parameters"] = set_trainable(model, cfg.training.freeze_llm)
    data = cfg.data
    dataset = LlavaInstructDataset(paths.resolve(data.train_json),
                                   paths.resolve(data.image_folder) if data.image_folder else None,
                                   processor, image_tokens_per_image(model), max_length=data.max_length,
                                   on_invalid=data.on_invalid, image_aspect_ratio=data.image_aspect_ratio,
                                   template=data.conversation_template)
    resolved["samples"] = len(dataset)
    resolved["skipped"] = dict(dataset.skipped)
    pad = processor.tokenizer.pad_token_id
    if pad is None:
        raise ValueError(f"the tokenizer at {cfg.model.name_or_path} has no pad token; "
                         "set pad_token in its tokenizer_config.json")
    collator = collator_for(dataset, pad)
    trainer = ATPTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                         processing_class=processor, lr_atp=cfg.training.lr_atp,
                         launch_zero_stage=resolved["zero_stage"],
                         callbacks=[StopAfter(stop_after_steps)] if stop_after_steps else None)
    return trainer, resolved


LAUNCH_FILE = "atp_launch.json"  # in every checkpoint: the launch it was written by
COMPLETE_MARKER = "trainer_state.json"  # Trainer writes it last


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete ``checkpoint-<step>`` folder of a run, or None.

    A folder without ``trainer_state.json`` (written last) is a save that was killed: it is skipped
    with a warning naming it."""
    folder = Path(output_dir)
    found = sorted((p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True) if folder.is_dir() else []
    for candidate in found:
        if (candidate / COMPLETE_MARKER).is_file():
            return str(candidate)
        logger.warning("%s is incomplete (no %s: the save was interrupted); skipping it", candidate, COMPLETE_MARKER)
    return None


def check_launch(checkpoint: str | Path, resolved: dict) -> None:
    """A checkpoint resumes only under the launch that wrote it: processes and DeepSpeed stage, which set
    the optimizer's partitioning and the data order."""
    path = Path(checkpoint) / LAUNCH_FILE
    if not path.is_file():
        return
    written = json.loads(path.read_text(encoding="utf-8"))
    now = {key: resolved[key] for key in ("processes", "zero_stage")}
    before = {key: written.get(key) for key in now}
    if before != now:
        raise ValueError(f"{checkpoint} was written by a launch with {before}, this launch has {now}: resume it "
                         f"with the same number of processes and DeepSpeed setting")


def check_inputs(cfg: TrainingConfig) -> None:
    """Checks that need no weights, before any are loaded: the model folder and its model type, the data files,
    and the model's sizes read from its config.json against the config's."""
    from .loading import check_model_folder, model_type

    folder = check_model_folder(cfg.model.name_or_path)
    model_kind = model_type(folder)
    data = cfg.data
    for key, value, kind in (("data.train_json", data.train_json, "file"), ("data.image_folder", data.image_folder,
                                                                              "folder")):
        if value is None:
            continue
        path = paths.resolve(value)
        if not (path.is_file() if kind == "file" else path.is_dir()):
            raise FileNotFoundError(f"{key}={value}: no such {kind} ({path})")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    text, vision = config.get("text_config") or {}, config.get("vision_config") or {}
    if model_kind in QWEN_MODEL_TYPES:  # dynamic resolution; the released config.json is flat (no text_config)
        layers = text.get("num_hidden_layers", config.get("num_hidden_layers"))
        if cfg.model.vision_grid is not None:
            raise ValueError(f"model.vision_grid={cfg.model.vision_grid} in the config, but the model at "
                             f"{cfg.model.name_or_path} ({model_kind}) has dynamic resolution: set "
                             "model.vision_grid: null")
        sizes = {"model.num_hidden_layers": layers}
    else:
        sizes = {"model.num_hidden_layers": text.get("num_hidden_layers"),
                 "model.vision_grid": (vision.get("image_size", 0) // vision.get("patch_size", 1)) or None}
        if cfg.model.vision_grid is None:
            raise ValueError(f"model.vision_grid: null (dynamic resolution) in the config, but the model at "
                             f"{cfg.model.name_or_path} ({model_kind}) has a fixed grid of vision "
                             "tokens: set model.vision_grid to its side")
    for key, got in sizes.items():
        if got is not None and got != cfg.get(key):
            raise ValueError(f"{key}={cfg.get(key)} in the config, but the model at {cfg.model.name_or_path} has {got}")


def resume_checkpoint(cfg: TrainingConfig, resume: str | None, output_dir: str | None) -> str | None:
    """The checkpoint folder ``--resume`` names (``last``: the newest complete one), checked before any
    weights are loaded; None without ``resume``."""
    if resume is None:
        return None
    out = paths.resolve(output_dir or (cfg.run or _default_run(cfg)).output_dir)
    if resume == "last":
        checkpoint = last_checkpoint(out)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume last: no complete checkpoint-* folder in {out}")
        return checkpoint
    if not (Path(resume) / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no {COMPLETE_MARKER})")
    return str(resume)


def train_from_config(cfg: TrainingConfig, *, resume: str | None = None, output_dir: str | None = None,
                      max_steps: int | None = None, stop_after_steps: int | None = None) -> dict:
    """Train, save the final model (stock HF files + ATP files) in the output folder, return a summary.

    ``resume``: a checkpoint folder, or ``"last"`` for the newest one in the output folder.
    """
    checkpoint = resume_checkpoint(cfg, resume, output_dir)
    trainer, resolved = build_trainer(cfg, output_dir=output_dir, max_steps=max_steps,
                                      stop_after_steps=stop_after_steps)
    if checkpoint is not None:
        check_launch(checkpoint, resolved)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    finished = (stop_after_steps is None or trainer.state.global_step < stop_after_steps
                or trainer.state.global_step >= trainer.state.max_steps)
    if finished:
        trainer.save_model(trainer.args.output_dir)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = {**resolved, "global_step": trainer.state.global_step, "max_steps": trainer.state.max_steps,
               "resumed_from": checkpoint, "train_loss": result.training_loss, "logged_losses": losses,
               "log_history": trainer.state.log_history, "final_model": trainer.args.output_dir if finished else None}
    if trainer.args.should_save:
        paths.atomic_write_text(Path(trainer.args.output_dir) / SUMMARY_FILE,
                                json.dumps(summary, indent=2, default=str, allow_nan=True))
    end_process_group()
    return summary


def end_process_group() -> None:
    """Wait for every process, then take the process group down before the interpreter exits (a process that
    exits while gloo's threads still run can abort with 'terminate called without an active exception')."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
