from pathlib import Path

import pytest
import yaml

from cprec.config import (
    Config,
    ModelConfig,
    config_hash,
    describe_fields,
    flatten,
    load_config,
    save_config,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").rglob("*.yaml"))


def test_configs_folder_not_empty():
    assert len(CONFIG_FILES) >= 8


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_file_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    raw = yaml.safe_load(path.read_text())
    # Values stated in the file (not only inherited) reach the dataclasses.
    for section, values in raw.items():
        if section == "include":
            continue
        for key, value in values.items():
            if not isinstance(value, dict):
                assert getattr(getattr(cfg, section), key) == value, (path, section, key)


def test_phase_files_inherit_and_override():
    stable = load_config(REPO / "configs/food_kitchen_stable.yaml")
    anneal = load_config(REPO / "configs/food_kitchen_anneal.yaml")
    assert stable.train.phase == "stable" and anneal.train.phase == "anneal"
    assert anneal.data.source == "food_kitchen" and anneal.model.hidden_size == 256
    assert anneal.train.init_from.endswith("checkpoints/latest")
    assert anneal.train.loader.mixing == {"A/domain": 2.0, "B/domain": 1.0, "all/mixed": 1.0}


def test_typo_key_names_key_and_suggests():
    with pytest.raises(ValueError, match=r"unknown config key 'train\.lrr'.*did you mean 'train\.lr'"):
        load_config(None, ["train.lrr=0.1"])
    with pytest.raises(ValueError, match=r"unknown config key 'modle'.*'model'"):
        load_config(None, ["modle.hidden_size=3"])


def test_typo_in_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  schedule:\n    warmup_step: 3\n")
    with pytest.raises(ValueError, match=r"train\.schedule\.warmup_step'.*train\.schedule\.warmup_steps"):
        load_config(f)


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.lr=-1", "train.lr"),
        ("train.phase=cooldown", "train.phase"),
        ("model.hidden_size=102", "model.hidden_size"),
        ("train.schedule.decay_shape=step", "train.schedule.decay_shape"),
        ("eval.ks=[0,5]", "eval.ks"),
        ("data.min_interactions=2", "data.min_interactions"),
        ("train.seq_len=abc", "train.seq_len"),
        ("train.micro_batch_size=1.5", "train.micro_batch_size"),
        ("tracking.backend=wandb", "tracking.backend"),
        ("eval.sasrec_similarity=euclid", "eval.sasrec_similarity"),
        ("eval.sasrec_heads=3", "eval.sasrec_heads"),
        ("eval.sasrec_patience=-1", "eval.sasrec_patience"),
        ("eval.zero3_inference=maybe", "eval.zero3_inference"),
    ],
)
def test_invalid_value_names_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_zero3_inference_field():
    from cprec.config import EvalConfig

    assert load_config(None, []).eval.zero3_inference is False  # off: every rank loads the model
    assert load_config(None, ["eval.zero3_inference=true"]).eval.zero3_inference is True
    with pytest.raises(ValueError, match=r"'eval\.zero3_inference': must be true or false"):
        EvalConfig(zero3_inference="yes")  # built in code, past the loader's typing


def test_overrides_are_typed():
    cfg = load_config(
        REPO / "configs/demo_ml1m.yaml",
        ["train.lr=1e-4", "eval.ks=[1,10]", "model.dtype=fp32", "train.loader.mixing={a/domain: 2}"],
    )
    assert cfg.train.lr == 1e-4 and cfg.eval.ks == [1, 10] and cfg.model.dtype == "fp32"
    assert cfg.train.loader.mixing == {"a/domain": 2.0}


def test_save_roundtrip_and_hash(tmp_path):
    cfg = load_config(REPO / "configs/food_kitchen_anneal.yaml", ["train.seed=7"])
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(path)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(path, ["train.seed=8"])) != config_hash(cfg)


def test_every_field_documented():
    rows = describe_fields()
    missing = [name for name, doc, _ in rows if not doc]
    assert not missing, missing
    assert any(name == "train.schedule.decay_shape" for name, _, _ in rows)


def test_include_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("include: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("include: [a.yaml]\n")
    with pytest.raises(ValueError, match="include cycle"):
        load_config(tmp_path / "a.yaml")


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
    assert "model.hidden_size" in flatten(__import__("dataclasses").asdict(ModelConfig()), "model.")


def _readme_own_logs_example() -> str:
    """The YAML block of README's 'Bring your own logs' example."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("Bring your own logs")
    block = text[
        text.index("```yaml", start) + len("```yaml") : text.index("```", text.index("```yaml", start) + 7)
    ]
    return block


def test_include_names_a_shipped_preset_from_any_folder(tmp_path, monkeypatch):
    """README's own-logs example, saved in a folder of its own: `model/small.yaml` is the preset."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text(_readme_own_logs_example())
    cfg = load_config(tmp_path / "mine.yaml")
    preset = yaml.safe_load((REPO / "configs/model/small.yaml").read_text())["model"]
    assert {k: getattr(cfg.model, k) for k in preset} == preset
    assert cfg.data.source == "jsonl" and cfg.data.columns.item == "sku"
    # A file of that name beside the config wins over the preset.
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "small.yaml").write_text("model:\n  hidden_size: 64\n")
    assert load_config(tmp_path / "mine.yaml").model.hidden_size == 64
    (tmp_path / "other.yaml").write_text("include: [model/huge.yaml]\n")
    with pytest.raises(FileNotFoundError, match=r"include 'model/huge\.yaml' not found.*shipped preset"):
        load_config(tmp_path / "other.yaml")
