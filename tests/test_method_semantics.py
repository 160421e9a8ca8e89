"""What the method decides, pinned against independent computations.

Equivalence tests (keep-all == stock, cached == recomputed) pass just as well for a method that keeps
the *least* important tokens. These tests fix the semantics instead: which tokens survive, the budget
loss on both sides of its target, cumulative keep values, answer tokens excluded from the
cross-modality score, and a pruning positional encoding that really encodes rows and columns.
Each is written so that the corresponding plausible error fails it.
"""

from __future__ import annotations

import math

import pytest
import torch

from atp_repro import ATPConfig, apply_atp, last_atp_record
from atp_repro.atp.loss import budget_terms, target_deviation
from atp_repro.atp.module import ATPModule
from atp_repro.atp.positions import rope2d_cos_sin, rope_section_ids
from atp_repro.atp.tiny import IMAGE_TOKEN_ID, tiny_inputs, tiny_llava

LAYERS = (1, 2, 3)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    return (x - x.min()) / (x.max() - x.min())


def _constant_thresholds(module: ATPModule, theta_r: float, theta_s: float) -> None:
    net = module.threshold_net
    with torch.no_grad():
        for head, theta in ((net.redundancy_head, theta_r), (net.spatial_head, theta_s)):
            head.weight.zero_()
            head.bias.fill_(math.log(theta / (1 - theta)))


def _stock_redundancy(layer: int, inputs: dict, answer_tokens: int = 0) -> torch.Tensor:
    """S_r of every vision token after ``layer``, from the stock model's own attention maps.

    Self-modality: attention a vision token receives from the vision queries that see it (causal),
    averaged over them; cross-modality: attention from the prompt text after the image (answers
    excluded), averaged; each min-max normalised over the image, then their mean.
    """
    stock = tiny_llava(attn_implementation="eager")
    with torch.no_grad():
        attn = stock(**inputs, output_attentions=True).attentions[layer][0].mean(0)  # (L, L), head mean
    ids = inputs["input_ids"][0]
    vision = torch.nonzero(ids == IMAGE_TOKEN_ID).flatten()
    first, last = int(vision[0]), int(vision[-1])
    prompt = torch.arange(last + 1, len(ids) - answer_tokens)
    self_imp = torch.stack([attn[k:last + 1, k].mean() for k in range(first, last + 1)])
    cross_imp = attn[prompt][:, vision].mean(0)
    return 0.5 * (_minmax(self_imp) + _minmax(cross_imp))


@pytest.mark.parametrize("k", [5, 20])
def test_kept_tokens_are_the_top_k_of_the_stock_models_attention(k):
    model = apply_atp(tiny_llava(attn_implementation="eager"), ATPConfig(module_layers=LAYERS, fixed_keep=(k, k, k)))
    inputs = tiny_inputs(model, prefix_lengths=(3,), prompt_lengths=(7,))
    with torch.no_grad():
        model(**inputs)
    kept = set(last_atp_record(model).kept_vision_indices[0][0].tolist())
    expected = set(torch.topk(_stock_redundancy(LAYERS[0], inputs), k).indices.tolist())
    assert kept == expected


def test_answer_tokens_do_not_vote_in_the_cross_modality_score():
    model = apply_atp(tiny_llava(attn_implementation="eager"), ATPConfig(module_layers=LAYERS, fixed_keep=(12, 12, 12)))
    inputs = tiny_inputs(model, prefix_lengths=(3,), prompt_lengths=(9,), seed=3)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -4:] = inputs["input_ids"][:, -4:]  # the last 4 tokens are the answer
    with torch.no_grad():
        model(**inputs, labels=labels)
    record = last_atp_record(model)
    kept = set(record.kept_vision_indices[0][0].tolist())
    with_answers = _stock_redundancy(LAYERS[0], inputs)
    without_answers = _stock_redundancy(LAYERS[0], inputs, answer_tokens=4)
    assert kept == set(torch.topk(without_answers, 12).indices.tolist())
    # The case is built so that counting the answers as queries would keep other tokens.
    assert kept != set(torch.topk(with_answers, 12).indices.tolist())


def test_an_explicit_answer_mask_is_the_same_as_labels():
    """HF Trainer drops labels with label smoothing or a custom loss; atp_answer_mask says it instead."""
    config = ATPConfig(module_layers=LAYERS, fixed_keep=(12, 12, 12))
    model = apply_atp(tiny_llava(attn_implementation="eager"), config)
    inputs = tiny_inputs(model, prefix_lengths=(3,), prompt_lengths=(9,), seed=3)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -4:] = inputs["input_ids"][:, -4:]
    kept = {}
    with torch.no_grad():
        for name, extra in (("labels", {"labels": labels}), ("mask", {"atp_answer_mask": labels != -100}),
                            ("neither", {})):
            model(**inputs, **extra)
            kept[name] = set(last_atp_record(model).kept_vision_indices[0][0].tolist())
    assert kept["mask"] == kept["labels"] != kept["neither"]


def test_a_training_pass_without_answers_fails_before_any_work():
    model = apply_atp(tiny_llava(), ATPConfig(module_layers=LAYERS)).train()
    inputs = tiny_inputs(model, prefix_lengths=(3, 1), prompt_lengths=(5, 6))
    with pytest.raises(ValueError, match="atp_answer_mask"):
        model(**inputs)
    no_answers = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    model(**inputs, atp_answer_mask=no_answers).logits.sum().backward()  # stated explicitly: fine
    with torch.no_grad():
        model(**inputs)  # no gradient (evaluation-style pass): nothing to protect


@pytest.mark.parametrize("bad", [torch.zeros(1, 3, dtype=torch.bool), "answers", None])
def test_a_malformed_answer_mask_is_rejected_naming_it(bad):
    model = apply_atp(tiny_llava(), ATPConfig(module_layers=LAYERS))
    inputs = tiny_inputs(model, prefix_lengths=(3, 1), prompt_lengths=(5, 6))
    if bad is None:
        bad = torch.zeros_like(inputs["input_ids"])  # right shape, not bool
    with pytest.raises(ValueError, match="atp_answer_mask must be a bool tensor shaped like input_ids"):
        model(**inputs, atp_answer_mask=bad)


def _decide(module: ATPModule, column_sums, vision_weight, prompt_weight, alive, keep_value=None,
            spatial=None):
    length = alive.shape[1]
    spatial = torch.zeros(1, length) if spatial is None else spatial
    is_vision = vision_weight > 0
    return module.decide(column_sums, vision_weight, prompt_weight, spatial, is_vision, alive,
                         int(alive.sum()), keep_value)


def _one_image(n_vision: int = 6, n_prompt: int = 3, seed: int = 0):
    """Sequence [vision x n][prompt x m] with random attention column sums (self, cross)."""
    g = torch.Generator().manual_seed(seed)
    length = n_vision + n_prompt
    vision_weight = torch.zeros(1, length)
    vision_weight[0, :n_vision] = 1.0
    prompt_weight = 1.0 - vision_weight
    column_sums = torch.rand(1, length, 2, generator=g)
    column_sums[0, n_vision:] = 0.0
    return column_sums, vision_weight, prompt_weight, vision_weight.bool()


def test_a_module_keeps_tokens_whose_redundancy_score_exceeds_theta_r():
    config = ATPConfig(module_layers=(0,), temperature=1e6)
    module = ATPModule(config, 0, hidden_size=8, grid_size=2)
    _constant_thresholds(module, theta_r=0.5, theta_s=0.999)
    column_sums, vision_weight, prompt_weight, alive = _one_image()
    decision = _decide(module, column_sums, vision_weight, prompt_weight, alive)
    # Independently: self importance = received / number of vision queries at or after the key.
    n = 6
    self_imp = column_sums[0, :n, 0] / torch.arange(n, 0, -1).float()
    cross_imp = column_sums[0, :n, 1] / 3.0
    s_r = 0.5 * (_minmax(self_imp) + _minmax(cross_imp))
    assert torch.allclose(decision.redundancy[0, :n], s_r, atol=1e-6)
    assert decision.keep[0, :n].tolist() == (s_r > 0.5).tolist()
    assert 0 < int(decision.keep.sum()) < n  # the case separates "most" from "least" important


def test_spatial_rule_keeps_the_grid_tokens_above_theta_s():
    config = ATPConfig(module_layers=(0,), temperature=1e6)
    module = ATPModule(config, 0, hidden_size=8, grid_size=2)
    _constant_thresholds(module, theta_r=0.9999, theta_s=0.8)  # nothing passes on redundancy alone...
    column_sums, vision_weight, prompt_weight, alive = _one_image(seed=1)
    spatial = torch.zeros(1, 9)
    spatial[0, [1, 4]] = 0.9  # ...but two tokens sit on a sampling grid scoring above theta_s
    spatial[0, 2] = 0.5
    decision = _decide(module, column_sums, vision_weight, prompt_weight, alive, spatial=spatial)
    kept = set(torch.nonzero(decision.keep[0]).flatten().tolist())
    by_redundancy = set(torch.nonzero(decision.redundancy[0, :6] > 0.9999).flatten().tolist())
    assert kept == {1, 4} | by_redundancy and 2 not in kept  # the union of the two rules


def test_keep_values_accumulate_across_modules():
    config = ATPConfig(module_layers=(0,), temperature=1e6)
    module = ATPModule(config, 0, hidden_size=8, grid_size=2)
    _constant_thresholds(module, theta_r=1e-4, theta_s=0.999)  # this module alone keeps every live token
    column_sums, vision_weight, prompt_weight, alive = _one_image(seed=2)
    previous = torch.ones(1, 9)
    previous[0, [0, 3]] = 0.0  # pruned by an earlier module
    decision = _decide(module, column_sums, vision_weight, prompt_weight, alive, keep_value=previous)
    assert decision.keep_value[0, [0, 3]].tolist() == [0.0, 0.0]  # D = D_prev * M stays 0
    assert decision.keep[0, [0, 3]].tolist() == [False, False]
    assert decision.keep_value[0, 6:].tolist() == [1.0, 1.0, 1.0]  # text keeps D = 1


def test_target_loss_on_both_sides_of_the_target_and_its_gradient():
    layers, depth, n0 = (0, 3, 5), 8, 100.0
    for kept, sign in ((10.0, -1.0), (60.0, 1.0)):  # N_bar below, then above the target
        counts = torch.tensor([[n0, kept, kept, kept]], requires_grad=True)
        n_bar = (1 * n0 + 7 * kept) / depth
        loss = target_deviation(counts, layers, depth, n_target=30.0)
        assert float(loss.detach()) == pytest.approx(abs(n_bar - 30.0) / n0)
        loss.backward()
        # Below the target, keeping more tokens lowers the loss; above it, raises it.
        assert torch.sign(counts.grad[0, 1:]).tolist() == [sign] * 3
    terms = budget_terms(torch.tensor([[n0, 10.0, 10.0, 10.0]]), layers, depth, 30.0, 0.1, 0.2)
    assert float(terms["l_target"]) > 0


def test_rope2d_encodes_row_and_column_of_vision_tokens():
    head_dim, grid = 16, 4
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    grid_index = torch.tensor([[-1, 0, 1, 4, 5, -1]])  # text, (0,0), (0,1), (1,0), (1,1), text
    positions = torch.arange(6)[None]
    fractions = (0.5, 0.25, 0.25)
    cos, _ = rope2d_cos_sin(inv_freq, 1.0, positions, grid_index, grid, torch.tensor([1]), fractions, torch.float32)
    plain = torch.cat([positions[0, :, None] * inv_freq] * 2, -1).cos()  # 1-D RoPE
    assert torch.allclose(cos[0, [0, 5]], plain[[0, 5]])  # text unchanged
    section = rope_section_ids(head_dim // 2, fractions)
    row_pairs, col_pairs = section == 1, section == 2
    # Same row, different column: equal on the row pairs only; same column: equal on the column pairs.
    assert torch.allclose(cos[0, 1, : head_dim // 2][row_pairs], cos[0, 2, : head_dim // 2][row_pairs])
    assert (cos[0, 1, : head_dim // 2][col_pairs] - cos[0, 2, : head_dim // 2][col_pairs]).abs().max() > 0.01
    assert torch.allclose(cos[0, 1, : head_dim // 2][col_pairs], cos[0, 3, : head_dim // 2][col_pairs])
    assert (cos[0, 1, : head_dim // 2][row_pairs] - cos[0, 3, : head_dim // 2][row_pairs]).abs().max() > 0.01


def test_rope2d_gives_rows_and_columns_comparable_rotation_at_llava_scale():
    # LLaVA-1.5-7B: head size 128, RoPE base 10000, a 24x24 grid; the default (1-D, row, col) shares.
    head_dim, grid = 128, 24
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    section = rope_section_ids(head_dim // 2, ATPConfig().rope2d_sections)
    # The largest rotation any pair of a section undergoes across the grid (grid - 1 steps).
    widest = {name: float((grid - 1) * inv_freq[section == s].max()) for name, s in (("row", 1), ("col", 2))}
    assert max(widest.values()) <= 2 * min(widest.values()), widest
    assert min(widest.values()) > 1.0  # both turn by radians across the image, not by a few hundredths


def test_rope2d_changes_what_the_layers_after_the_first_module_compute():
    inputs = None
    logits = {}
    for encoding in ("original", "rope2d"):
        model = apply_atp(tiny_llava(), ATPConfig(module_layers=LAYERS, fixed_keep=(64, 64, 64),
                                                  position_encoding=encoding))
        inputs = inputs or tiny_inputs(model, prefix_lengths=(3,), prompt_lengths=(6,))
        with torch.no_grad():
            logits[encoding] = model(**inputs).logits
    image_start = int(torch.nonzero(inputs["input_ids"][0] == IMAGE_TOKEN_ID)[0])
    # Text before the image never sees a vision token: identical. Everything after it is re-positioned.
    assert torch.allclose(logits["rope2d"][:, :image_start], logits["original"][:, :image_start], atol=1e-6)
    assert not torch.allclose(logits["rope2d"][:, -1], logits["original"][:, -1], atol=1e-4)


def test_a_deep_copy_is_an_independent_working_model():
    import copy

    model = apply_atp(tiny_llava(), ATPConfig(module_layers=LAYERS, fixed_keep=(32, 16, 8)))
    inputs = tiny_inputs(model)
    labels = torch.where(inputs["input_ids"] == IMAGE_TOKEN_ID, -100, inputs["input_ids"])
    model.train()(**inputs, labels=labels)  # a training pass: its record holds graph tensors
    model.eval()
    before = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    twin = copy.deepcopy(model)
    assert torch.equal(twin.generate(**inputs, max_new_tokens=5, do_sample=False), before)
    with torch.no_grad():
        twin.lm_head.weight.copy_(torch.roll(twin.lm_head.weight, 1, dims=0))  # another next-token ranking
    changed = twin.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert not torch.equal(changed, before)  # the copy runs its own weights...
    assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), before)  # ...not the original's
    twin_record, record = last_atp_record(twin), last_atp_record(model)
    assert twin_record is not record  # each model records its own passes


def _gradients(checkpointing: dict | None) -> dict[str, torch.Tensor]:
    from atp_repro import budget_loss

    torch.manual_seed(0)
    model = apply_atp(tiny_llava(), ATPConfig(module_layers=LAYERS, temperature=20.0))
    inputs = tiny_inputs(model)
    labels = torch.where(inputs["input_ids"] == IMAGE_TOKEN_ID, -100, inputs["input_ids"])
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    out = model.train()(**inputs, labels=labels, use_cache=False)
    (out.loss + budget_loss(model)).backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def test_non_reentrant_gradient_checkpointing_gives_the_same_gradients():
    plain, checkpointed = _gradients(None), _gradients({"use_reentrant": False})
    assert plain.keys() == checkpointed.keys() and any("atp_modules" in k for k in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_reentrant_gradient_checkpointing_is_rejected_with_what_to_do():
    with pytest.raises(ValueError, match=r"use_reentrant=True is not supported.*'use_reentrant': False"):
        _gradients({"use_reentrant": True})


PICKLE_CHILD = """
import pickle, sys, torch
from atp_repro.atp.tiny import tiny_llava
tiny_llava()  # transformers registers output capture when a class is first built: unpickled stock models need it too
model, inputs, expected = pickle.load(open(sys.argv[1], "rb"))
assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), expected["generated"])
with torch.no_grad():
    out = model(**inputs, output_hidden_states=True)
assert len(out.hidden_states) == len(expected["hidden"])
assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, expected["hidden"]))
print("ok")
"""


def test_a_pickled_model_works_in_a_new_process_and_is_independent(tmp_path):
    import pickle
    import subprocess
    import sys

    model = apply_atp(tiny_llava(), ATPConfig(module_layers=LAYERS, fixed_keep=(32, 16, 8))).eval()
    inputs = tiny_inputs(model)
    # Before any forward: transformers' output-capture hooks, installed by the first forward, cannot be
    # pickled (the stock LLaVA cannot be pickled after a forward either).
    blob = pickle.dumps(model)
    with torch.no_grad():
        expected = {"generated": model.generate(**inputs, max_new_tokens=5, do_sample=False),
                    "hidden": model(**inputs, output_hidden_states=True).hidden_states}
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps((pickle.loads(blob), inputs, expected)))
    # A new process has never seen the ATP class: unpickling must rebuild it (and its output capture).
    child = subprocess.run([sys.executable, "-c", PICKLE_CHILD, str(path)], capture_output=True, text=True)
    assert child.returncode == 0 and child.stdout.strip() == "ok", child.stderr[-2000:]

    twin = pickle.loads(path.read_bytes())[0]
    assert twin.generate.model is twin
    with torch.no_grad():
        twin.lm_head.weight.copy_(torch.roll(twin.lm_head.weight, 1, dims=0))
    assert not torch.equal(twin.generate(**inputs, max_new_tokens=5, do_sample=False), expected["generated"])
    assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), expected["generated"])
