"""The training configuration: the real-scale values, the mini world's scaled values, and that
every malformed config fails with an error naming the key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from atp_repro.training_config import (
    MINI_CONFIG,
    REAL_CONFIG,
    ConfigError,
    TrainingConfig,
    load_training_config,
    parse_training_config,
    supp_table1_comparison,
    write_supp_table1,
)


@pytest.fixture(scope="module")
def real() -> TrainingConfig:
    return load_training_config(REAL_CONFIG)


@pytest.fixture(scope="module")
def mini() -> TrainingConfig:
    return load_training_config(MINI_CONFIG)


@pytest.fixture
def real_data(repo_root: Path) -> dict:
    return yaml.safe_load((repo_root / REAL_CONFIG).read_text())


def _write(tmp_path: Path, data: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -- the committed configs ----------------------------------------------------------------------


def test_real_config_equals_supplementary_table1_value_by_value(real: TrainingConfig) -> None:
    table = supp_table1_comparison(real)
    assert len(table) == 10
    assert table["match"].eq(True).all(), table[["hyperparameter", "paper", "this_run"]]


def test_real_config_values(real: TrainingConfig) -> None:
    t, a = real.training, real.atp
    assert real.scale == "real"
    assert (t.global_batch_size, t.lr_llm, t.lr_atp, t.warmup_ratio, t.epochs) == (
        128,
        2e-5,
        1e-4,
        0.03,
        1,
    )
    assert (t.lr_scheduler, t.optimizer, t.precision, t.weight_decay) == (
        "cosine",
        "adamw",
        "bf16",
        0.0,
    )
    assert t.deepspeed_zero_stage == 3 and t.deepspeed_config == "configs/deepspeed/zero3.json"
    assert (a.n_target, a.lambda_atp, a.lambda_target, a.temperature) == (130, 0.1, 0.2, 1e6)
    # the shipped estimator: straight-through, reaching the scores as well (trainable LM)
    assert a.ste_temperature == 3.0 and a.score_gradient is True
    assert a.module_layers == (4, 14, 24)
    assert a.grid_strides == (2, 3, 4, 6, 8, 12)
    assert 0 < a.lambda_sample <= min(a.grid_strides) ** 2
    assert real.model.num_hidden_layers == 32 and real.model.num_vision_tokens == 576


def test_deepspeed_json_is_zero3(repo_root: Path, real: TrainingConfig) -> None:
    ds = json.loads((repo_root / real.training.deepspeed_config).read_text())
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] in ("auto", True)


def test_mini_world_states_a_reason_for_every_change(
    real: TrainingConfig, mini: TrainingConfig
) -> None:
    assert mini.scale == "mini" and mini.inherits == REAL_CONFIG
    assert mini.overrides and all(o.reason.strip() for o in mini.overrides)
    base = {row["key"]: row["value"] for row in real.describe()}
    # the real config's data and run sections (real-scale runs only) are not inherited by the mini world
    inherited = {k for k in base if k.split(".")[0] in ("model", "training", "atp")}
    assert {row["key"] for row in mini.describe()} == inherited
    changed = {row["key"] for row in mini.describe() if row["value"] != base[row["key"]]}
    assert changed == {o.key for o in mini.overrides}
    for o in mini.overrides:
        assert real.get(o.key) == o.base_value and mini.get(o.key) == o.value


def test_mini_world_keeps_the_paper_budget_fraction(
    real: TrainingConfig, mini: TrainingConfig
) -> None:
    frac_real = real.atp.n_target / real.model.num_vision_tokens
    frac_mini = mini.atp.n_target / mini.model.num_vision_tokens
    assert frac_mini == pytest.approx(frac_real)
    # The ATP modules learn at least 5x faster than the LM (the paper: 5x; the mini world: 20x, see its reason).
    assert mini.training.lr_atp / mini.training.lr_llm >= 5.0


def test_atp_section_builds_the_method_config(real: TrainingConfig, mini: TrainingConfig) -> None:
    atp_config = pytest.importorskip("atp_repro.atp.config")
    for cfg in (real, mini):
        built = atp_config.ATPConfig(**cfg.atp_kwargs())
        assert built.module_layers == cfg.atp.module_layers
        assert built.n_target == cfg.atp.n_target


def test_config_is_frozen_and_fingerprinted(real: TrainingConfig, mini: TrainingConfig) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        real.training.lr_llm = 1.0  # type: ignore[misc]
    assert real.fingerprint() == load_training_config(REAL_CONFIG).fingerprint()
    assert real.fingerprint() != mini.fingerprint()
    assert yaml.safe_load(real.to_yaml()) == real.to_dict()


def test_get_rejects_unknown_dotted_keys(real: TrainingConfig) -> None:
    assert real.get("atp.n_target") == 130
    with pytest.raises(KeyError, match="training.lr_llm"):
        real.get("training.lr_lm")


# -- errors name the key ------------------------------------------------------------------------


def test_typo_key_names_the_key_and_suggests_the_right_one(tmp_path: Path, real_data: dict) -> None:
    real_data["training"]["lr_lm"] = real_data["training"].pop("lr_llm")
    with pytest.raises(ConfigError) as err:
        load_training_config(_write(tmp_path, real_data))
    assert err.value.key == "training.lr_lm"
    assert "did you mean 'training.lr_llm'" in str(err.value)
    assert "cfg.yaml" in str(err.value)


def test_lr_minus_one_is_out_of_range(tmp_path: Path, real_data: dict) -> None:
    real_data["training"]["lr_llm"] = -1
    with pytest.raises(
        ConfigError, match=r"training\.lr_llm: -1 is out of range; must be > 0"
    ) as err:
        load_training_config(_write(tmp_path, real_data))
    assert err.value.key == "training.lr_llm"


def test_bare_lr_key_is_unknown_with_suggestion(tmp_path: Path, real_data: dict) -> None:
    real_data["training"]["lr"] = -1
    with pytest.raises(ConfigError, match=r"training\.lr: unknown key"):
        load_training_config(_write(tmp_path, real_data))


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("training", "epochs", "one", r"training\.epochs: 'one' has type str; expected int"),
        ("training", "epochs", True, r"training\.epochs: True has type bool; expected int"),
        ("training", "epochs", 0, r"training\.epochs: 0 is out of range; must be >= 1"),
        ("training", "warmup_ratio", 1.0, r"training\.warmup_ratio: 1.0 is out of range"),
        (
            "training",
            "optimizer",
            "sgd",
            r"training\.optimizer: 'sgd' has type str; expected one of",
        ),
        ("training", "precision", "bf32", r"training\.precision: .*'bf16', 'fp16', 'fp32'"),
        ("atp", "temperature", 0, r"atp\.temperature: 0 is out of range; must be > 0"),
        ("atp", "lambda_sample", 5.0, r"atp\.lambda_sample: 5.0 is out of range.*<= .*= 4"),
        ("atp", "module_layers", [14, 4], r"atp\.module_layers: .*strictly increasing"),
        ("atp", "module_layers", [4, 14, 31], r"atp\.module_layers: .*< model\.num_hidden_layers"),
        ("atp", "n_target", 600, r"atp\.n_target: 600 is out of range.*576"),
        ("atp", "grid_strides", [2, 48], r"atp\.grid_strides: .*<= model\.vision_grid = 24"),
        ("atp", "position_encoding", "rope", r"atp\.position_encoding: .*'learned2d'"),
        ("model", "vision_grid", 2.5, r"model\.vision_grid: 2.5 has type float; expected int"),
    ],
)
def test_invalid_values_name_the_key_and_allowed_values(
    tmp_path: Path, real_data: dict, section: str, key: str, value: object, message: str
) -> None:
    real_data[section][key] = value
    with pytest.raises(ConfigError, match=message) as err:
        load_training_config(_write(tmp_path, real_data))
    assert err.value.key.endswith(key)


def test_score_gradient_needs_the_straight_through_estimator(tmp_path: Path, real_data: dict) -> None:
    real_data["atp"]["ste_temperature"] = None
    with pytest.raises(ConfigError, match=r"score_gradient: true needs ste_temperature"):
        load_training_config(_write(tmp_path, real_data))
    real_data["atp"]["score_gradient"] = False  # the paper's plain sigmoid, thresholds only
    assert load_training_config(_write(tmp_path, real_data)).atp.score_gradient is False


def test_missing_key_is_named(tmp_path: Path, real_data: dict) -> None:
    del real_data["atp"]["n_target"]
    with pytest.raises(ConfigError, match=r"atp\.n_target: missing required key"):
        load_training_config(_write(tmp_path, real_data))


def test_batch_arithmetic_must_add_up(tmp_path: Path, real_data: dict) -> None:
    real_data["training"]["per_device_batch_size"] = 8
    with pytest.raises(ConfigError, match=r"training\.global_batch_size: 128 must equal .* = 256"):
        load_training_config(_write(tmp_path, real_data))


def test_deepspeed_json_must_agree_with_the_stage(tmp_path: Path, real_data: dict) -> None:
    ds = tmp_path / "z2.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    real_data["training"]["deepspeed_config"] = str(ds)
    with pytest.raises(ConfigError, match=r"training\.deepspeed_zero_stage: 3 differs"):
        load_training_config(_write(tmp_path, real_data))
    real_data["training"]["deepspeed_config"] = str(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match=r"training\.deepspeed_config: .*file not found"):
        load_training_config(_write(tmp_path, real_data))


def test_pyyaml_exponent_strings_become_floats(tmp_path: Path, real_data: dict) -> None:
    real_data["training"]["lr_llm"] = "2e-5"  # what PyYAML makes of a bare 2e-5
    cfg = load_training_config(_write(tmp_path, real_data))
    assert cfg.training.lr_llm == 2e-5 and isinstance(cfg.training.lr_llm, float)


# -- derived configs ----------------------------------------------------------------------------


def _derived(tmp_path: Path, repo_root: Path, overrides: dict, **extra: object) -> Path:
    data = {
        "name": "d",
        "scale": "mini",
        "description": "test",
        "inherits": str(repo_root / REAL_CONFIG),
        "overrides": overrides,
        **extra,
    }
    return _write(tmp_path, data, "derived.yaml")


def test_override_needs_a_reason(tmp_path: Path, repo_root: Path) -> None:
    path = _derived(tmp_path, repo_root, {"training.epochs": {"value": 2, "reason": " "}})
    with pytest.raises(ConfigError, match=r"overrides\.training\.epochs: 'reason' must be"):
        load_training_config(path)
    path = _derived(tmp_path, repo_root, {"training.epochs": {"value": 2}})
    with pytest.raises(ConfigError, match=r"overrides\.training\.epochs: expected exactly"):
        load_training_config(path)


def test_override_of_unknown_key_suggests(tmp_path: Path, repo_root: Path) -> None:
    path = _derived(tmp_path, repo_root, {"training.epoch": {"value": 2, "reason": "r"}})
    with pytest.raises(ConfigError, match=r"did you mean 'training\.epochs'"):
        load_training_config(path)


def test_override_that_changes_nothing_is_rejected(tmp_path: Path, repo_root: Path) -> None:
    path = _derived(tmp_path, repo_root, {"training.epochs": {"value": 1, "reason": "r"}})
    with pytest.raises(ConfigError, match="equals the inherited value"):
        load_training_config(path)


def test_override_is_validated_like_a_value(tmp_path: Path, repo_root: Path) -> None:
    path = _derived(tmp_path, repo_root, {"training.lr_llm": {"value": -1, "reason": "r"}})
    with pytest.raises(ConfigError, match=r"derived\.yaml: training\.lr_llm: -1 is out of range"):
        load_training_config(path)


def test_derived_config_cannot_restate_sections(tmp_path: Path, repo_root: Path) -> None:
    path = _derived(tmp_path, repo_root, {}, training={"epochs": 2})
    with pytest.raises(ConfigError, match="only through 'overrides'"):
        load_training_config(path)


def test_parse_without_file(real_data: dict) -> None:
    cfg = parse_training_config(real_data)
    assert cfg.atp.n_target == 130
    with pytest.raises(ConfigError, match="scal: unknown key"):
        parse_training_config({**real_data, "scal": "real"})


def test_committed_table1_is_up_to_date(
    repo_root: Path, tmp_path: Path, real: TrainingConfig, mini: TrainingConfig
) -> None:
    """tables/supp_table1_hyperparameters.* must be what the configs give now."""
    _, _, written = write_supp_table1(real, mini, output_dir=tmp_path)
    for path in written.values():
        committed = repo_root / "tables" / path.name
        if not committed.exists():
            pytest.skip("no committed Table 1 (run make reproduce)")
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed.name} is stale: the configs changed; run 'make reproduce' and commit tables/"
        )


def test_a_mini_config_cannot_override_the_real_runs_data_section(tmp_path: Path, repo_root: Path) -> None:
    path = tmp_path / "derived.yaml"
    path.write_text(f"name: x\nscale: mini\ndescription: d\ninherits: {repo_root / REAL_CONFIG}\n"
                    "overrides:\n  data.max_length: {value: 10, reason: r}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="overrides.data.max_length.*scale: real configs only"):
        load_training_config(path)
