"""blade.config.BladeConfig: the LoRA folder's blade_config.json, one type for its writer and its readers."""

import json
from pathlib import Path

import pytest

from blade.config import CONFIG_NAME, BladeConfig, BladeConfigError

BUNDLED = Path(__file__).resolve().parents[1] / "assets" / "tinyworld" / "blade_lora"


def test_bundled_file_loads_and_saves_back_unchanged(tmp_path):
    config = BladeConfig.load(BUNDLED)  # a folder, or the file itself
    assert config == BladeConfig.load(BUNDLED / CONFIG_NAME)
    assert config.family == "wan" and config.k_step == 8 and config.anchors[0] == 999 and config.eta == 0.9
    assert config.asa_config().block_size == 128 and config.resolved_prediction_type == "flow"
    raw = json.loads((BUNDLED / CONFIG_NAME).read_text())
    assert config["k_step"] == 8 and config.get("asa")["max_keep"] == raw["asa"]["max_keep"]  # the dict it was before
    assert raw["asa"]["max_keep"] == 0.17 and raw["shift"] == 3.0  # call-10 student at the paper clamp (session 12)
    config.save(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text()) == json.loads((BUNDLED / CONFIG_NAME).read_text())


def test_older_and_hand_written_files(tmp_path):
    old = BladeConfig.from_dict({"family": "cogvideox", "k_step": 4, "beta_end": 0.02, "note": "kept"})
    assert old.resolved_prediction_type == "v_prediction" and old.num_anchors == 4 and old.asa_config() is None
    assert old.extra == {"beta_end": 0.02, "note": "kept"}
    old.save(tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["note"] == "kept" and saved["beta_end"] == 0.02 and saved["k_step"] == 4
    assert BladeConfig.from_dict({"anchors": [999, 499]}).num_anchors == 2
    assert BladeConfig().num_anchors == 8 and BladeConfig.from_dict({}).dense_steps == 0


@pytest.mark.parametrize(
    "data, message",
    [
        ({"eta": 2}, "eta must be in [0, 1]"),
        ({"k_step": 0}, "k_step must be an int >= 1"),
        ({"k_step": 2, "anchors": [999, 666, 333]}, "3 anchors given for k_step=2"),
        ({"prediction_type": "epsilon"}, "prediction_type must be"),
        ({"asa": {"block_size": 10}}, "asa: ASAConfig.block_size"),
        ({"asa": {"nope": 1}}, "unknown ASAConfig fields"),
        ({"dense_steps": -1}, "dense_steps must be an int >= 0"),
        ({"height": "tall"}, "height must be an int >= 1"),
        ({"lora_targets": "ffn"}, "lora_targets must be one of"),
        ({"cfg_2": "three"}, "cfg_2 must be a number"),
        ({"boundary_ratio": 1.5}, "boundary_ratio must be a number in"),
        ({"boundary_ratio": "high"}, "boundary_ratio must be a number in"),
        ({"early_context": {"steps": 1}}, "early_context needs asa"),
        ({"asa": {}, "early_context": {"steps": -1}}, "early_context: EarlyContext.steps must be an int >= 0"),
        ({"asa": {}, "early_context": {"steps": 1, "size": 3}}, "unknown EarlyContext fields"),
        ({"asa": {"block_size": 16}, "early_context": {"steps": 1, "max_keep": 0}}, "EarlyContext.max_keep must be"),
        ({"asa": {}, "early_context": [1]}, "early_context must be an object"),
    ],
)
def test_invalid_values_are_refused_with_the_key(data, message):
    with pytest.raises(BladeConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        BladeConfig.from_dict(data)


def test_load_names_the_file(tmp_path):
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(BladeConfigError, match="is not valid JSON"):
        BladeConfig.load(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(BladeConfigError, match="should hold a JSON object"):
        BladeConfig.load(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"eta": -1}))
    with pytest.raises(BladeConfigError, match=f"{CONFIG_NAME}: eta must be"):
        BladeConfig.load(tmp_path / CONFIG_NAME)
    with pytest.raises(FileNotFoundError):
        BladeConfig.load(tmp_path / "missing")


def test_training_choices_are_written_only_when_set(tmp_path):
    """lora_targets, cfg_2, cfg_boundary and boundary_ratio (newer than the bundled file) round-trip when set and
    stay absent when not, and the preset names are the trainer's."""
    from blade.config import LORA_TARGET_PRESETS
    from blade.distill import lora

    assert set(LORA_TARGET_PRESETS) == {*lora.TARGET_PRESETS, lora.ALL_LINEAR}
    config = BladeConfig(family="wan", lora_targets="all", cfg_2=3.0, cfg_boundary=900.0, boundary_ratio=0.875)
    config.save(tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["lora_targets"] == "all" and saved["cfg_2"] == 3.0 and saved["boundary_ratio"] == 0.875
    assert saved["cfg_boundary"] == 900.0
    assert BladeConfig.load(tmp_path) == config
    BladeConfig(family="wan").save(tmp_path)
    written = set(json.loads((tmp_path / CONFIG_NAME).read_text()))
    assert not {"lora_targets", "cfg_2", "cfg_boundary", "boundary_ratio"} & written


def test_early_context_round_trips_and_is_written_only_when_set(tmp_path):
    from blade.attention import ASAConfig, EarlyContext

    config = BladeConfig(family="wan", asa={"max_keep": 0.17, "pool_size": 20},
                         early_context={"steps": 1, "max_keep": 0.25, "pool_size": 5})  # fmt: skip
    config.save(tmp_path)
    assert BladeConfig.load(tmp_path) == config
    early = BladeConfig.load(tmp_path).early_context_config()
    assert early == EarlyContext(steps=1, max_keep=0.25, pool_size=5)
    assert early.config_for(config.asa_config()) == ASAConfig(max_keep=0.25, pool_size=5)
    assert BladeConfig(family="wan").early_context_config() is None
    BladeConfig(family="wan", asa={}).save(tmp_path)
    assert "early_context" not in json.loads((tmp_path / CONFIG_NAME).read_text())


def test_early_context_resolve_puts_the_given_fields_over_the_stored_ones():
    from blade.attention import EarlyContext

    stored = EarlyContext(steps=2, max_keep=0.3, pool_size=4)
    assert EarlyContext.resolve(stored) is stored and EarlyContext.resolve(None) is None
    assert EarlyContext.resolve(stored, max_keep=0.5) == EarlyContext(steps=2, max_keep=0.5, pool_size=4)
    assert EarlyContext.resolve(None, steps=1) == EarlyContext(steps=1, max_keep=0.25, pool_size=5)  # the defaults
    assert EarlyContext.resolve(stored, steps=0) is None
    with pytest.raises(ValueError, match="number of steps"):
        EarlyContext.resolve(None, pool_size=3)
    with pytest.raises(ValueError, match="max_keep"):
        EarlyContext.resolve(stored, max_keep=2.0)
    assert EarlyContext.resolve(stored, attention="dense") is None  # a stored context needs ASA to apply
    with pytest.raises(ValueError, match="this run's attention is dense"):
        EarlyContext.resolve(None, attention="dense", steps=1)
