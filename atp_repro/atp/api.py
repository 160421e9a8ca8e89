"""Public API: add ATP modules to a Hugging Face LLaVA model and read what they did.

>>> model = apply_atp(LlavaForConditionalGeneration(cfg), ATPConfig(module_layers=(1, 2, 3)))  # doctest: +SKIP
>>> model.eval(); out = model.generate(**inputs)                    # hard pruning, shorter KV cache
>>> token_counts(model)                                             # (batch, num_layers) vision tokens
>>> model.train(); loss = model(**batch).loss + budget_loss(model)  # soft, differentiable masks
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

from ..paths import atomic_write_bytes
from .architectures import LLAVA, architecture_of, merged_image_grids
from .config import ATPConfig
from .language_model import ATPRecord, ATPRuntime, atp_language_model_class
from .loss import budget_terms
from .module import ATPModule

ATP_CONFIG_FILE = "atp_config.json"
ATP_WEIGHTS_FILE = "atp_modules.pt"


def _language_model(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    lm = getattr(inner, "language_model", None)
    if lm is None or not hasattr(lm, "layers") or not hasattr(lm, "rotary_emb"):
        raise TypeError(
            "apply_atp expects a transformers LLaVA-style model (model.model.language_model with decoder "
            f"`layers` and `rotary_emb`); got {type(model).__name__}"
        )
    return lm


def _runtime(model: nn.Module) -> ATPRuntime:
    runtime = getattr(_language_model(model), "_atp_runtime", None)
    if runtime is None:
        raise ValueError("this model has no ATP modules; call atp_repro.apply_atp(model, config) first")
    return runtime


def _grid_size_hint(model: nn.Module) -> int:
    vision = getattr(model.config, "vision_config", None)
    image_size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if image_size and patch:
        return int(image_size) // int(patch)
    return int(round(getattr(model.config, "image_seq_length", 576) ** 0.5))


def apply_atp(model: nn.Module, config: ATPConfig) -> nn.Module:
    """Add ATP modules in place to a ``LlavaForConditionalGeneration`` (or a Qwen2-VL / Qwen2.5-VL
    ``...ForConditionalGeneration``, see :mod:`atp_repro.atp.architectures`) and return it.

    The language model's class is swapped for an ATP subclass (same weights, same state-dict keys
    plus ``atp_modules.*``). ``model.train()`` then runs the soft path, ``model.eval()`` hard
    pruning. ``model.generate`` is wrapped on the instance so that, without a KV cache, generated
    tokens are treated as answers and excluded from the cross-modality queries (as at training).
    """
    if not isinstance(config, ATPConfig):
        raise TypeError(f"config must be an ATPConfig, got {type(config).__name__}")
    family = architecture_of(model)
    lm = _language_model(model)
    if getattr(lm, "_atp_runtime", None) is not None:
        raise ValueError("ATP modules were already applied to this model")
    num_layers = lm.config.num_hidden_layers
    if config.module_layers[-1] >= num_layers - 1:
        raise ValueError(
            f"ATPConfig.module_layers={config.module_layers} is outside the model's depth: a module must sit "
            f"after a layer in 0..{num_layers - 2} (the model has {num_layers} decoder layers)"
        )
    if family != LLAVA:
        _check_mrope_model(lm, config)
    if config.position_encoding == "rope2d" and not hasattr(lm.rotary_emb, "inv_freq"):
        raise ValueError("position_encoding='rope2d' needs a rotary embedding with `inv_freq`")
    image_token_id = getattr(model.config, "image_token_id", None)
    if image_token_id is None:
        raise ValueError("the model config has no image_token_id; ATP finds the vision span from it")
    side = _grid_size_hint(model)
    # LLaVA-NeXT-style inputs hold several side x side tiles per image (config.image_seq_length)
    seq_length = getattr(model.config, "image_seq_length", None) or 0
    num_vision = seq_length if seq_length > side * side and seq_length % (side * side) == 0 else side * side
    if family == LLAVA and config.fixed_keep is not None and max(config.fixed_keep) > num_vision:
        raise ValueError(f"ATPConfig.fixed_keep={config.fixed_keep} keeps more than the model's {num_vision} vision "
                         f"tokens; allowed: counts in 0..{num_vision}")

    reference = next(lm.parameters())
    lm.atp_modules = nn.ModuleList(
        ATPModule(config, i, lm.config.hidden_size, _grid_size_hint(model)) for i in range(config.num_modules)
    ).to(device=reference.device)
    lm.__class__ = atp_language_model_class(type(lm))
    # transformers keys its output-capture registry by class: register the new class.
    _CAN_RECORD_REGISTRY[lm] = lm._can_record_outputs
    # tiles only when the config says so: a square span of any size is read as one grid, as before
    runtime = ATPRuntime(config=config, image_token_id=int(image_token_id), architecture=family,
                         tile_side=side if family == LLAVA and num_vision > side * side else None)
    lm._atp_runtime = runtime
    # save_pretrained writes the stock checkpoint (a stock from_pretrained loads it without unexpected
    # keys); the ATP modules live in their own files beside it (save_atp / save_atp_pretrained).
    atp_keys = {name for name in model.state_dict() if ".atp_modules." in f".{name}"}
    model._keys_to_ignore_on_save = set(getattr(model, "_keys_to_ignore_on_save", None) or ()) | atp_keys

    # Hooks and the generate wrapper find the runtime through the module they are called on (no
    # closures over this model), so that copy.deepcopy gives an independent, working model.
    model.model.register_forward_pre_hook(_remember_image_tokens, with_kwargs=True)
    model.register_forward_pre_hook(_remember_answers, with_kwargs=True)
    model.generate = ATPGenerate(model)
    return model


def _check_mrope_model(lm: nn.Module, config: ATPConfig) -> None:
    """What ATP supports on an M-RoPE model (Qwen2-VL family), checked before any change to the model."""
    if config.position_encoding != "original":
        raise ValueError(f"position_encoding={config.position_encoding!r} is not supported on M-RoPE models, whose "
                         "vision tokens already carry (row, column) positions that pruning keeps; allowed: 'original'")
    if "sliding_attention" in (getattr(lm.config, "layer_types", None) or ()):
        raise ValueError("ATP does not support sliding-window attention layers (config.use_sliding_window); "
                         "allowed: full attention in every layer")


def _remember_image_tokens(module: nn.Module, args, kwargs) -> None:
    """Forward pre-hook of the VLM's inner model: where the image tokens are (read by the ATP decoder).

    As in the stock model, image-token ids are an image only when pixel values (or encoded images,
    ``mm_encoder_outputs``) come with them (else, e.g. a generated token that equals the id, they are
    text), and without ``input_ids`` the image positions are those whose embedding equals the image
    token's.
    """
    runtime = module.language_model._atp_runtime
    if runtime.architecture != LLAVA:
        _remember_image_grids(module, runtime, kwargs)
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    reference = input_ids if input_ids is not None else embeds
    if reference is None:
        runtime.pending_image_mask = None
    elif kwargs.get("pixel_values") is None and (kwargs.get("mm_encoder_outputs") or {}).get("image") is None:
        runtime.pending_image_mask = torch.zeros(reference.shape[:2], dtype=torch.bool, device=reference.device)
    elif input_ids is not None:
        runtime.pending_image_mask = input_ids == runtime.image_token_id
    else:
        token = torch.tensor(runtime.image_token_id, dtype=torch.long, device=embeds.device)
        runtime.pending_image_mask = (embeds == module.get_input_embeddings()(token)).all(-1)


VIDEO_INPUTS = ("pixel_values_videos", "video_grid_thw")


def _refuse_videos(kwargs) -> None:
    if any(kwargs.get(name) is not None for name in VIDEO_INPUTS) or \
            (kwargs.get("mm_encoder_outputs") or {}).get("video") is not None:
        raise ValueError("ATP prunes image tokens; video inputs (pixel_values_videos / video_grid_thw) are not "
                         "supported")


def _remember_image_grids(module: nn.Module, runtime: ATPRuntime, kwargs) -> None:
    """M-RoPE models: each image's (t, h, w) grid in the decoder's units, from ``image_grid_thw``."""
    _refuse_videos(kwargs)
    runtime.pending_image_grids = None
    if kwargs.get("pixel_values") is None and (kwargs.get("mm_encoder_outputs") or {}).get("image") is None:
        return  # no image in this pass (a decode step, or text only)
    grid_thw = kwargs.get("image_grid_thw")
    if grid_thw is None:  # generate encodes the images first and passes them without their grids
        grid_thw = runtime.generate_image_grid_thw
    merge = module.config.vision_config.spatial_merge_size
    runtime.pending_image_grids = None if grid_thw is None else merged_image_grids(grid_thw, merge)


ANSWER_MASK_KWARG = "atp_answer_mask"


def _remember_answers(module: nn.Module, args, kwargs):
    """Forward pre-hook of the top model: which tokens are answers (excluded from cross-modality queries).

    An explicit ``atp_answer_mask`` (bool, shaped like ``input_ids``, True at answer tokens) wins and
    is removed from the forward's arguments; otherwise the answers are the tokens with ``labels`` != -100.
    """
    explicit = kwargs.pop(ANSWER_MASK_KWARG, None)
    if explicit is not None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        shape = tuple(reference.shape[:2]) if reference is not None else None
        if not isinstance(explicit, torch.Tensor) or explicit.dtype != torch.bool or tuple(explicit.shape) != shape:
            got = (f"{explicit.dtype} {tuple(explicit.shape)}" if isinstance(explicit, torch.Tensor)
                   else type(explicit).__name__)
            raise ValueError(f"{ANSWER_MASK_KWARG} must be a bool tensor shaped like input_ids {shape} "
                             f"(True at answer tokens), got {got}")
        answers = explicit
    else:
        labels = kwargs.get("labels")
        answers = None if labels is None else labels != -100
    _runtime(module).pending_answer_mask = answers
    return args, kwargs


class ATPGenerate:
    """``model.generate`` after :func:`apply_atp`: the model class's ``generate``, with the prompt length
    recorded, so that without a KV cache generated tokens are treated as answers and excluded from the
    cross-modality queries (as at training), and, for M-RoPE models, the images' grids (``generate``
    encodes the images first and passes the model their features without ``image_grid_thw``).

    An object holding its model (not a closure or a bound function), so that ``copy.deepcopy`` and
    pickling give a copy whose ``generate`` runs the copy.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.__doc__ = type(model).generate.__doc__

    def __call__(self, *args, **kwargs):
        runtime = _runtime(self.model)
        if runtime.architecture != LLAVA:
            _refuse_videos(kwargs)
            config = kwargs.get("generation_config") or self.model.generation_config
            copies = max(kwargs.get("num_beams") or config.num_beams or 1,
                         kwargs.get("num_return_sequences") or config.num_return_sequences or 1)
            if copies > 1:
                raise ValueError(f"ATP on an M-RoPE model generates one sequence per sample with greedy or sampled "
                                 f"decoding; got num_beams / num_return_sequences = {copies} (allowed: 1)")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        runtime.prompt_length = None if input_ids is None else int(input_ids.shape[1])
        runtime.generate_image_grid_thw = kwargs.get("image_grid_thw")
        try:
            return type(self.model).generate(self.model, *args, **kwargs)
        finally:
            runtime.prompt_length = None
            runtime.generate_image_grid_thw = None


def has_atp(model: nn.Module) -> bool:
    """True if :func:`apply_atp` was applied to this model."""
    lm = getattr(getattr(model, "model", None), "language_model", None)
    return getattr(lm, "_atp_runtime", None) is not None


def atp_config(model: nn.Module) -> ATPConfig:
    """The ATPConfig a model was given."""
    return _runtime(model).config


def last_atp_record(model: nn.Module) -> ATPRecord:
    """Everything the ATP modules did in the last forward with images (the prefill, for generate)."""
    record = _runtime(model).record
    if record is None:
        raise ValueError("no forward with images has run since ATP was applied")
    return record


def token_counts(model: nn.Module) -> torch.Tensor:
    """(batch, num_decoder_layers) LongTensor of vision tokens each sample had at each layer.

    Soft path: the rounded soft count sum(D). The paper's "Token" is ``token_counts(model).float().mean()``.
    """
    return last_atp_record(model).token_counts


def budget_loss(model: nn.Module, config: ATPConfig | None = None) -> torch.Tensor:
    """lambda_ATP * L_ATP + lambda_target * L_target of the last forward (differentiable in train())."""
    return budget_breakdown(model, config)["budget_loss"]


def budget_breakdown(model: nn.Module, config: ATPConfig | None = None) -> dict[str, torch.Tensor]:
    """The budget loss and its two terms, ``l_atp`` and ``l_target``."""
    config = config or atp_config(model)
    record = last_atp_record(model)
    num_layers = _language_model(model).config.num_hidden_layers
    return budget_terms(record.stage_counts, config.module_layers, num_layers, config.n_target, config.lambda_atp,
                        config.lambda_target)


def atp_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ATP modules' parameters (threshold networks, learned grid embeddings), e.g. for their own LR."""
    _runtime(model)
    return list(_language_model(model).atp_modules.parameters())


def save_atp(model: nn.Module, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the ATP config and module weights next to a ``save_pretrained`` checkpoint (atomically).

    ``state_dict``: the module weights to write (keys as in ``atp_modules.state_dict()``), e.g. gathered
    from a DeepSpeed ZeRO-3 model whose own parameters are partitioned; default: the model's."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atp_config(model).save(directory / ATP_CONFIG_FILE)
    buffer = io.BytesIO()
    torch.save(_language_model(model).atp_modules.state_dict() if state_dict is None else state_dict, buffer)
    atomic_write_bytes(directory / ATP_WEIGHTS_FILE, buffer.getvalue())


def load_atp(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply the ATP config saved in ``directory`` to a stock model and load the module weights.

    The files are read and checked before the model is touched: a missing, truncated or mismatched
    file raises an error naming it and leaves the model stock (a retry can succeed)."""
    directory = Path(directory)
    config_path, weights_path = directory / ATP_CONFIG_FILE, directory / ATP_WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (save_atp writes {ATP_CONFIG_FILE} and {ATP_WEIGHTS_FILE})")
    config = ATPConfig.load(config_path)
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        with torch.random.fork_rng(devices=[]):  # a throw-away copy to check the keys and shapes
            probe = nn.ModuleList(ATPModule(config, i, _language_model(model).config.hidden_size,
                                            _grid_size_hint(model)) for i in range(config.num_modules))
        probe.load_state_dict(state)
    except Exception as err:  # truncated / foreign file, or weights of another config or model size
        raise ValueError(f"{weights_path}: cannot load the ATP module weights ({type(err).__name__}: {err}); "
                         "the model was left unchanged") from err
    apply_atp(model, config)
    _language_model(model).atp_modules.load_state_dict(state)
    return model


def save_atp_pretrained(model: nn.Module, directory: str | Path) -> None:
    """``model.save_pretrained`` (the stock checkpoint: a stock ``from_pretrained`` loads it as the stock
    model) plus the ATP files beside it; reload with :func:`load_atp_pretrained`."""
    model.save_pretrained(directory)
    save_atp(model, directory)


def load_atp_pretrained(directory: str | Path, model_class: type | None = None, **kwargs) -> nn.Module:
    """Load a checkpoint written by :func:`save_atp_pretrained` (stock class + ATP modules)."""
    from transformers import AutoModelForImageTextToText

    loader = model_class or AutoModelForImageTextToText
    model = loader.from_pretrained(directory, **kwargs)
    return load_atp(model, directory)
