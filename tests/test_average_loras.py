"""benchmarks/average_loras.py: the averaged folder's LoRA, as the loader fuses it, adds the mean of the students'
weight updates (float64 reference computed from the input files)."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "assets" / "tinyworld" / "blade_lora"


def _module():
    spec = importlib.util.spec_from_file_location("average_loras", ROOT / "benchmarks" / "average_loras.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stacked_lora_is_the_mean_update():
    g = torch.Generator().manual_seed(0)
    states = [{"l.lora_A.weight": torch.randn(4, 6, generator=g), "l.lora_B.weight": torch.randn(5, 4, generator=g)}
              for _ in range(3)]  # fmt: skip
    out = _module().average_lora_states(states)
    expected = sum(s["l.lora_B.weight"].double() @ s["l.lora_A.weight"].double() for s in states) / 3
    assert out["l.lora_A.weight"].shape == (12, 6) and out["l.lora_B.weight"].shape == (5, 12)
    torch.testing.assert_close((out["l.lora_B.weight"].double() @ out["l.lora_A.weight"].double()), expected)


def _second_student(tmp_path: Path) -> Path:
    """The bundled student with its B matrices redrawn: another student of the same recipe."""
    other = tmp_path / "other"
    shutil.copytree(BUNDLED, other)
    state = load_file(str(other / "pytorch_lora_weights.safetensors"))
    g = torch.Generator().manual_seed(1)
    state = {k: (torch.randn(v.shape, generator=g) * 0.01 if "lora_B" in k else v) for k, v in state.items()}
    save_file(state, str(other / "pytorch_lora_weights.safetensors"))
    return other


def test_averaged_folder_loads_as_the_mean_update(tmp_path):
    from blade.api import load_blade_lora
    from blade.tinyworld.model import load_pipeline

    other = _second_student(tmp_path)
    out = tmp_path / "averaged"
    _module().main(["--loras", str(BUNDLED), str(other), "--out", str(out)])
    config = json.loads((out / "blade_config.json").read_text())
    assert config["lora_rank"] == config["lora_alpha"] == 128

    name = "blocks.0.attn1.to_q"
    base = dict(load_pipeline().transformer.named_parameters())[f"{name}.weight"].detach().double()
    expected = base + sum(
        s[f"transformer.{name}.lora_B.weight"].double() @ s[f"transformer.{name}.lora_A.weight"].double()
        for s in (load_file(str(f / "pytorch_lora_weights.safetensors")) for f in (BUNDLED, other))
    ) / 2
    pipe = load_pipeline()
    load_blade_lora(pipe, out)
    fused = dict(pipe.transformer.named_parameters())[f"{name}.weight"].detach().double()
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=0)


def test_refuses_students_of_different_recipes(tmp_path):
    other = _second_student(tmp_path)
    config = json.loads((other / "blade_config.json").read_text())
    (other / "blade_config.json").write_text(json.dumps(dict(config, cfg=5.0)))
    with pytest.raises(SystemExit):
        _module().main(["--loras", str(BUNDLED), str(other), "--out", str(tmp_path / "averaged")])
    assert not (tmp_path / "averaged").exists()
