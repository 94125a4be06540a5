"""The trainer's model extensions (blade.distill.model_extensions): named by the model folder, imported by name."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from blade.distill.model_extensions import ModelExtensionError, load_extension
from blade.distill.trainer import parse_args
from blade.pipelines.hints import TINYWORLD_EXTENSION

ROOT = Path(__file__).resolve().parents[1]


def _args(model: Path, *extra: str):
    return parse_args("wan", ["--pretrained_model_name_or_path", str(model), "--prompt_dir", "p", "--output_dir", "o",
                              *extra])


def test_the_trainer_does_not_import_tinyworld():
    code = ("import sys, blade.distill.trainer, blade.distill.model_extensions; "
            "print([m for m in sys.modules if m.startswith('blade.tinyworld')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


def test_tinyworld_extension_provides_every_function():
    ext = load_extension(TINYWORLD_EXTENSION)
    assert ext.defaults() == {"num_frames": 17, "height": 128, "width": 128, "fps": 8}
    assert Path(ext.preset_model_path()).parts[-3:] == ("assets", "tinyworld", "pipeline")
    with pytest.raises(ModelExtensionError, match="cannot import"):
        load_extension("blade.no_such_extension")
    with pytest.raises(ModelExtensionError, match="lacks"):
        load_extension("blade.families")


def test_the_folder_names_its_extension(tmp_path):
    assert _args(ROOT / "assets" / "tinyworld" / "pipeline").model_extension == TINYWORLD_EXTENSION
    plain = tmp_path / "plain"
    plain.mkdir()
    args = _args(plain)
    assert args.model_extension is None and not args.tinyworld
    with pytest.raises(SystemExit, match="--eval_every needs a model with a trainer extension"):
        _args(plain, "--eval_every", "2")
    (plain / "blade_defaults.json").write_text(json.dumps({"trainer_extension": TINYWORLD_EXTENSION}))
    args = _args(plain)
    assert args.model_extension == TINYWORLD_EXTENSION and args.tinyworld
    (plain / "blade_defaults.json").write_text(json.dumps({"trainer_extension": "blade.no_such_extension"}))
    with pytest.raises(SystemExit, match="cannot import trainer extension"):
        _args(plain)
    (plain / "blade_defaults.json").write_text(json.dumps({"trainer_extension": 3}))
    with pytest.raises(SystemExit, match="must name a Python module"):
        _args(plain)


def test_old_import_of_the_tinyworld_cache_check_still_works():
    from blade.distill.trainer import check_tinyworld_prompt_cache
    from blade.tinyworld.distill import check_tinyworld_prompt_cache as moved

    assert check_tinyworld_prompt_cache is moved
