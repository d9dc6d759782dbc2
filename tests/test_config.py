"""The typed config loader: YAML + dotted overrides, and the errors users see for bad keys and types."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from training.config import ConfigError, load_config, save_config, to_dict


@dataclass
class OptimSection:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0


@dataclass
class ModelSection:
    hidden_size: int = 64
    quantizer: Literal["ibq", "vq"] = "ibq"
    channel_mult: tuple[int, ...] = (1, 2)
    init_from: str | None = None


@dataclass
class RootConfig:
    name: str = "run"
    seed: int = 0
    bf16: bool = False
    optim: OptimSection = field(default_factory=OptimSection)
    model: ModelSection = field(default_factory=ModelSection)


def _write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_resolve(tmp_path):
    path = _write(
        tmp_path, "name: demo\noptim:\n  lr: 3e-4\n  betas: [0.5, 0.9]\nmodel:\n  channel_mult: [1, 1, 2]\n"
    )
    cfg = load_config(RootConfig, path, ["optim.lr=1e-4", "model.quantizer=vq", "bf16=true", "seed=7"])
    assert cfg.name == "demo"
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.optim.betas == (0.5, 0.9)
    assert cfg.optim.weight_decay == 0.0
    assert cfg.model.channel_mult == (1, 1, 2)
    assert cfg.model.quantizer == "vq"
    assert cfg.bf16 is True and cfg.seed == 7
    assert cfg.model.init_from is None


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    cfg = load_config(RootConfig, _write(tmp_path, "optim:\n  lr: 1e-4\n"))
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == pytest.approx(1e-4)


def test_unknown_key_names_key_and_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrr.*did you mean 'lr'"):
        load_config(RootConfig, _write(tmp_path, "optim:\n  lrr: 0.1\n"))
    with pytest.raises(ConfigError, match=r"model\.hiden_size.*did you mean 'hidden_size'"):
        load_config(RootConfig, None, ["model.hiden_size=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer'.*did you mean 'optim'"):
        load_config(RootConfig, None, ["optimizer.lr=3"])


def test_wrong_type_names_field_and_expected_type(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.hidden_size: expected int, got 'big'"):
        load_config(RootConfig, _write(tmp_path, "model:\n  hidden_size: big\n"))
    with pytest.raises(ConfigError, match=r"optim\.lr: expected float, got 'fast'"):
        load_config(RootConfig, None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"model\.quantizer: expected one of 'ibq' \| 'vq', got 'fsq'"):
        load_config(RootConfig, None, ["model.quantizer=fsq"])
    with pytest.raises(ConfigError, match=r"bf16: expected bool"):
        load_config(RootConfig, None, ["bf16=3"])
    with pytest.raises(ConfigError, match=r"optim\.betas: expected 2 items"):
        load_config(RootConfig, None, ["optim.betas=[0.9]"])


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(RootConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(RootConfig, None, ["optim.lr"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(RootConfig, None, ["optim.lr=2e-5", "model.channel_mult=[1,2,4]"])
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(RootConfig, out)
    assert to_dict(again) == to_dict(cfg)
