"""ATP on Qwen2-VL (and Qwen2.5-VL): M-RoPE positions, dynamic resolution, non-square grids, several
images per sample. The same equivalences as for LLaVA, on tiny random models built from config classes."""

from __future__ import annotations

import copy

import pytest
import torch

from atp_repro import ATPConfig, apply_atp, budget_loss, last_atp_record, token_counts
from atp_repro.atp.controls import control_scores
from atp_repro.atp.spatial import sparsest_stride, spatial_scores
from atp_repro.atp.tiny import QWEN_IMAGE_TOKEN_ID, qwen2_vl_single_inputs, tiny_qwen2_vl, tiny_qwen2_vl_inputs

LAYERS = (1, 2, 3)
KEEP_ALL = (10_000,) * 3  # more than any image here: nothing is pruned
# three samples, three image shapes (h x w patches -> h/2 x w/2 tokens): 4x6, 4x4 and 2x6 + 2x2 (two images)
IMAGES = (((8, 12),), ((8, 8),), ((4, 12), (4, 4)))
NEW = 4


@pytest.fixture(scope="module", params=["2", "2.5"])
def stock(request):
    return tiny_qwen2_vl(version=request.param)


def _with_atp(model, **config):
    return apply_atp(copy.deepcopy(model), ATPConfig(module_layers=LAYERS, **config))


def _generate(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False, **kwargs)[:, -NEW:]


@pytest.mark.parametrize("version", ["2", "2.5"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_keeping_everything_reproduces_the_stock_model(impl, version):
    stock = tiny_qwen2_vl(attn_implementation=impl, version=version)
    batch = tiny_qwen2_vl_inputs(IMAGES)
    with torch.no_grad():
        reference = stock(**batch).logits
        expected = _generate(stock, batch)
        model = _with_atp(stock, fixed_keep=KEEP_ALL)
        assert torch.equal(model(**batch).logits, reference)
        assert torch.equal(_generate(model, batch), expected)
    assert token_counts(model)[:, 0].tolist() == [24, 16, 16]


def test_fixed_keep_counts_exactly_and_cached_generation_equals_recomputation(stock):
    model = _with_atp(stock, fixed_keep=(10, 5, 2))
    batch = tiny_qwen2_vl_inputs(IMAGES)
    with torch.no_grad():
        cached = _generate(model, batch)
        counts = token_counts(model)
        recomputed = _generate(model, batch, use_cache=False)
    assert torch.equal(cached, recomputed)
    # (B, layers): every vision token before the first module's layer, then the fixed counts per stage
    assert counts.tolist() == [[24, 24, 10, 5, 2, 2], [16, 16, 10, 5, 2, 2], [16, 16, 10, 5, 2, 2]]
    assert last_atp_record(model).image_grids == [[(1, 4, 6)], [(1, 4, 4)], [(1, 2, 6), (1, 2, 2)]]


def test_a_left_padded_batch_of_different_image_sizes_equals_single_runs(stock):
    model = _with_atp(stock, fixed_keep=(10, 5, 2))
    batch = tiny_qwen2_vl_inputs(IMAGES)
    with torch.no_grad():
        logits = model(**batch).logits
        counts, kept = token_counts(model).clone(), last_atp_record(model).kept_vision_indices
        generated = _generate(model, batch)
        for i in range(len(IMAGES)):
            single = qwen2_vl_single_inputs(batch, i)
            length = single["input_ids"].shape[1]
            torch.testing.assert_close(model(**single).logits[0], logits[i, -length:], rtol=0, atol=1e-5)
            assert torch.equal(token_counts(model)[0], counts[i])
            for module in range(len(LAYERS)):
                assert torch.equal(last_atp_record(model).kept_vision_indices[module][0], kept[module][i])
            assert torch.equal(_generate(model, single)[0], generated[i])


def test_the_spatial_rule_reads_each_image_on_its_own_h_by_w_grid():
    """The ``uniform`` control keeps the top of each image's spatial table (the nested sampling grids):
    with two images of different shapes in one sample, the kept indices are the top-k of the two
    images' tables laid one after the other (a square-grid reading of 16 tokens would differ)."""
    stock = tiny_qwen2_vl()
    batch = tiny_qwen2_vl_inputs((((4, 12), (8, 8)),))
    model = _with_atp(stock, fixed_keep=(6, 3, 1), importance="uniform")
    with torch.no_grad():
        model(**batch)
    cfg = model.model.language_model._atp_runtime.config
    table = torch.cat([control_scores("uniform", 2, cfg.grid_strides, cfg.lambda_sample, 6),
                       control_scores("uniform", 4, cfg.grid_strides, cfg.lambda_sample, 4)])
    expected = torch.sort(table, descending=True, stable=True).indices[:6].sort().values
    assert torch.equal(last_atp_record(model).kept_vision_indices[0][0], expected)
    # reading the first image with rows and columns swapped (6 x 2) would keep other tokens
    swapped = torch.cat([control_scores("uniform", 6, cfg.grid_strides, cfg.lambda_sample, 2),
                         control_scores("uniform", 4, cfg.grid_strides, cfg.lambda_sample, 4)])
    assert not torch.equal(torch.sort(swapped, descending=True, stable=True).indices[:6].sort().values, expected)


def test_spatial_scores_on_a_non_square_grid_centre_the_sparsest_grid_on_each_axis():
    strides = (2, 4)
    stride = sparsest_stride(7, strides, 5).reshape(7, 5)
    # sparsest fitting stride 4: rows offset (7 - 1) % 4 // 2 = 1, columns (5 - 1) % 4 // 2 = 0
    assert stride[1, 0] == stride[1, 4] == stride[5, 0] == stride[5, 4] == 4
    assert stride[3, 2] == 2 and stride[0, 0] == 0 and stride[1, 1] == 0
    assert int((stride == 4).sum()) == 4
    assert torch.equal(spatial_scores(6, strides, 2.0, 6), spatial_scores(6, strides, 2.0))  # square: as before
    assert spatial_scores(3, strides, 2.0, 7).shape == (21,)


def test_kept_tokens_keep_their_m_rope_angles_after_compaction():
    """After the last module the sequence is compacted; a later layer must rotate each kept token by the
    model's own M-RoPE position of that token (row and column for vision tokens), not by a recount."""
    stock = tiny_qwen2_vl()
    batch = tiny_qwen2_vl_inputs((((8, 12), (4, 4)),))  # one sample, two images, no padding
    model = _with_atp(stock, fixed_keep=(10, 5, 2))
    seen = {}
    layer = model.model.language_model.layers[LAYERS[-1] + 1]
    handle = layer.register_forward_pre_hook(lambda m, a, k: seen.update(cos=k["position_embeddings"][0]),
                                             with_kwargs=True)
    with torch.no_grad():
        model(**batch)
        handle.remove()
        positions, _ = stock.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                                  batch["image_grid_thw"], attention_mask=batch["attention_mask"])
        cos, _ = stock.model.language_model.rotary_emb(torch.zeros(1), positions)  # (1, L, hd)
    image = batch["input_ids"][0] == QWEN_IMAGE_TOKEN_ID
    keep = ~image
    keep[torch.nonzero(image).flatten()[last_atp_record(model).kept_vision_indices[-1][0]]] = True
    assert seen["cos"].shape[1] == int(keep.sum()) < batch["input_ids"].shape[1]
    assert torch.equal(seen["cos"][0], cos[0, keep])


def test_a_text_only_sample_in_a_batch_passes_through_unpruned(stock):
    batch = tiny_qwen2_vl_inputs((((8, 8),), ()))
    with torch.no_grad():
        reference = stock(**batch).logits
        assert torch.equal(_with_atp(stock, fixed_keep=KEEP_ALL)(**batch).logits, reference)
        pruned = _with_atp(stock, fixed_keep=(6, 3, 1))
        pruned(**batch)
    assert token_counts(pruned).tolist() == [[16, 16, 6, 3, 1, 1], [0] * 6]


def test_the_depth_weighted_budget_term_is_relative_to_each_samples_own_image():
    from atp_repro.atp.loss import budget_terms

    # two images of 24 and 16 tokens, each keeping 1/2, 1/4, 1/8: the same kept fractions
    counts = torch.tensor([[24.0, 12.0, 6.0, 3.0], [16.0, 8.0, 4.0, 2.0]])
    terms = budget_terms(counts, LAYERS, 6, n_target=8.0, lambda_atp=1.0, lambda_target=0.0)
    expected = 0.5 * 2 / 6 + 0.25 * 3 / 6 + 0.125 * 4 / 6
    assert float(terms["l_atp"]) == pytest.approx(expected)


def test_the_soft_path_trains_thresholds_through_the_budget_loss(stock):
    model = _with_atp(stock, temperature=10.0)
    model.train()
    batch = tiny_qwen2_vl_inputs(IMAGES)
    labels = torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)
    labels[:, :-2] = -100  # the last two tokens are the answer
    out = model(**batch, labels=labels)
    (out.loss + budget_loss(model)).backward()
    thresholds = [p for n, p in model.named_parameters() if "atp_modules" in n]
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in thresholds)
    assert last_atp_record(model).soft


def test_unsupported_inputs_and_settings_fail_before_any_work_with_a_clear_message(stock):
    with pytest.raises(ValueError, match="position_encoding='rope2d' is not supported on M-RoPE models.*'original'"):
        _with_atp(stock, position_encoding="rope2d")
    model = _with_atp(stock, fixed_keep=(4, 2, 1))
    batch = tiny_qwen2_vl_inputs(IMAGES)
    video = dict(batch, pixel_values_videos=batch["pixel_values"], video_grid_thw=batch["image_grid_thw"])
    with pytest.raises(ValueError, match="video inputs .* are not supported"):
        model(**video)
    with pytest.raises(ValueError, match="video inputs .* are not supported"):
        model.generate(**video, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"num_beams / num_return_sequences = 2 \(allowed: 1\)"):
        model.generate(**batch, max_new_tokens=2, num_beams=2)


# --- the mini world's Qwen2-VL (supplementary Table 7) ---------------------------------------------------------


@pytest.fixture(scope="module")
def mini_pair():
    from atp_repro.mini.model import MiniModelConfig, build_model
    from atp_repro.mini.qwen import QwenMiniConfig, copy_llava, qwen_mini_model
    from atp_repro.mini.tokenizer import build_tokenizer

    tok = build_tokenizer()
    llava = build_model(MiniModelConfig(), tok).eval()
    qwen = qwen_mini_model(llava, QwenMiniConfig(), tok)
    copy_llava(qwen, llava)
    return llava, qwen, tok


def test_mini_images_are_laid_out_as_the_qwen2_vl_processor_lays_them_out(mini_pair):
    import numpy as np
    from transformers import Qwen2VLImageProcessorPil

    from atp_repro.mini.data import CLIP_MEAN, CLIP_STD, image_to_tensor
    from atp_repro.mini.image_inputs import qwen_image_inputs

    _, qwen, _ = mini_pair
    image = (np.random.default_rng(0).random((96, 96, 3)) * 255).astype(np.uint8)
    processor = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, do_resize=False,
                                         image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    expected = processor(images=[image], return_tensors="pt")
    ours = qwen_image_inputs(image_to_tensor(image)[None], torch.zeros(1, 1, dtype=torch.long), qwen.config)
    assert torch.equal(ours["image_grid_thw"], expected["image_grid_thw"])
    torch.testing.assert_close(ours["pixel_values"], expected["pixel_values"], rtol=0, atol=1e-6)


def test_the_mini_qwen2_vl_copied_from_the_mini_llava_matches_it_on_text_and_image_features(mini_pair):
    """M-RoPE gives text the same position on all three axes, i.e. 1-D RoPE: on text the copied decoder (zero
    q/k/v biases) is the mini LLaVA's exactly. The vision slot rebuilds the images from Qwen2-VL's patch layout,
    so its image tokens equal the mini LLaVA's, one per 2 x 2 merge block, row-major."""
    from atp_repro.mini.model import vision_tower_parameters
    from atp_repro.mini.qwen import image_embeddings

    llava, qwen, _ = mini_pair
    ids = torch.tensor([[1, 10, 11, 12, 13, 14]])
    with torch.no_grad():
        assert torch.equal(qwen(input_ids=ids).logits, llava(input_ids=ids).logits)
        pixels = torch.randn(2, 3, 96, 96)
        assert torch.equal(image_embeddings(qwen, pixels), image_embeddings(llava, pixels))
    projector = {id(p) for p in qwen.model.visual.projector.parameters()}
    tower = vision_tower_parameters(qwen)
    assert tower and not projector & {id(p) for p in tower}  # the projector trains with the LM, the tower is frozen


def test_the_mini_qwen2_vl_prunes_with_atp_and_keeps_its_m_rope_positions(mini_pair):
    """ATP on the mini Qwen2-VL through the mini world's own batches: keep-all equals the stock model."""
    from atp_repro.mini.data import Collator, MiniVQA
    from atp_repro.mini.image_inputs import model_inputs

    _, qwen, tok = mini_pair
    dataset = MiniVQA("test", 3, tok, n_image_tokens=144)
    batch = Collator(tok.pad_token_id, mode="generate")([dataset[i] for i in range(3)])
    inputs = model_inputs(qwen, batch, ("input_ids", "attention_mask", "pixel_values"))
    assert inputs["image_grid_thw"].tolist() == [[1, 24, 24]] * 3
    with torch.no_grad():
        reference = qwen(**inputs).logits
        model = apply_atp(copy.deepcopy(qwen), ATPConfig(module_layers=(0, 3, 5), fixed_keep=(144, 144, 144)))
        assert torch.equal(model(**inputs).logits, reference)
        pruned = apply_atp(copy.deepcopy(qwen), ATPConfig(module_layers=(0, 3, 5), fixed_keep=(36, 18, 9)))
        pruned(**inputs)
    assert token_counts(pruned)[:, 1:].float().mean(0).tolist()[:5] == [36, 36, 36, 18, 18]
