"""Issue 19 item 4: a model folder recognised as a published model (its config JSON only, no weights) gives the
inference script and the trainer that model's default video size, frames and fps (and, for a stock-model run of
the inference script, its CFG). Precedence: explicit flag > the folder's blade_defaults.json > the recognised
model's registry defaults > the family's. An unrecognised folder keeps the family's defaults.
"""

import json
import shutil
from pathlib import Path

import pytest

from blade.families import FAMILIES, MODELS, model_of_folder, video_defaults

CONFIGS = Path(__file__).resolve().parents[1] / "blade" / "configs"
EXPECTED = {  # (num_frames, height, width, fps), the stock CFG
    "wan2.1-t2v-1.3b": ((81, 480, 832, 16), 5.0),
    "wan2.1-t2v-14b": ((81, 720, 1280, 16), 5.0),
    "wan2.2-t2v-a14b": ((81, 720, 1280, 16), 4.0),
    "wan2.2-ti2v-5b": ((121, 704, 1280, 24), 5.0),
    "cogvideox-5b": ((49, 480, 720, 8), 6.0),
}
SIZE = ("num_frames", "height", "width", "fps")


def _size(obj) -> tuple:
    get = obj.get if isinstance(obj, dict) else lambda k: getattr(obj, k)
    return tuple(int(get(k)) for k in SIZE)


def _config_only_folder(tmp_path: Path, name: str) -> Path:
    """blade/configs/<name> copied: config JSON files only (no weights, no tokenizer)."""
    folder = tmp_path / name
    shutil.copytree(CONFIGS / name, folder)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Recognition from JSON
# ----------------------------------------------------------------------------------------------------------------


def test_model_of_folder_recognises_each_published_config_from_json_only(tmp_path):
    assert set(EXPECTED) == set(MODELS)
    for name, (size, cfg) in EXPECTED.items():
        spec = MODELS[name]
        assert model_of_folder(CONFIGS / name) is spec, name
        assert model_of_folder(CONFIGS / name, spec.family) is spec
        other = "cogvideox" if spec.family == "wan" else "wan"
        assert model_of_folder(CONFIGS / name, other) is None  # a folder of another family: not recognised
        defaults, model = video_defaults(spec.family, CONFIGS / name)
        assert model is spec and _size(defaults) == size and spec.guidance_scale == cfg

    # model_index.json decides whether transformer_2 is present: [null, null] means one expert
    a14b = _config_only_folder(tmp_path, "wan2.2-t2v-a14b")
    index = json.loads((a14b / "model_index.json").read_text())
    (a14b / "model_index.json").write_text(json.dumps({**index, "transformer_2": [None, None]}))
    assert model_of_folder(a14b) is MODELS["wan2.1-t2v-14b"]
    (a14b / "model_index.json").write_text(json.dumps({**index, "transformer_2": ["diffusers", "X"]}))
    assert model_of_folder(a14b) is MODELS["wan2.2-t2v-a14b"]

    # another depth, a missing or unreadable config: unrecognised, never an error; the family's defaults
    deeper = _config_only_folder(tmp_path, "wan2.1-t2v-14b")
    config = json.loads((deeper / "transformer" / "config.json").read_text())
    (deeper / "transformer" / "config.json").write_text(json.dumps({**config, "num_layers": 41}))
    bad = tmp_path / "bad"
    (bad / "transformer").mkdir(parents=True)
    (bad / "transformer" / "config.json").write_text("{not json")
    for folder in (deeper, bad, tmp_path / "missing"):
        assert model_of_folder(folder) is None
        defaults, model = video_defaults("wan", folder)
        assert model is None and _size(defaults) == (81, 480, 832, 16)
    assert _size(video_defaults("cogvideox", bad)[0]) == (49, 480, 720, 8)


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------


def _train_args(family: str, folder: Path, tmp_path: Path, *extra: str):
    from blade.distill.trainer import parse_args

    return parse_args(family, ["--pretrained_model_name_or_path", str(folder), "--prompt_dir", str(tmp_path / "p"),
                               "--output_dir", str(tmp_path / "o"), *extra])  # fmt: skip


def test_trainer_takes_the_recognised_models_size_unless_flags_or_blade_defaults_say_otherwise(tmp_path):
    for name, (size, _) in EXPECTED.items():
        family = MODELS[name].family
        folder = _config_only_folder(tmp_path, name)
        args = _train_args(family, folder, tmp_path)
        assert _size(vars(args)) == size, name
        assert args.cfg == FAMILIES[family].cfg  # TDM's teacher CFG stays the family's recipe value

    folder = tmp_path / "wan2.2-ti2v-5b"
    args = _train_args("wan", folder, tmp_path, "--num_frames", "9", "--fps", "10")
    assert _size(vars(args)) == (9, 704, 1280, 10)  # explicit flags win, the rest from the model
    (folder / "blade_defaults.json").write_text(json.dumps({"height": 256, "width": 448}))
    args = _train_args("wan", folder, tmp_path, "--width", "320")
    assert _size(vars(args)) == (121, 256, 320, 24)  # flag > blade_defaults.json > model

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    assert _size(vars(_train_args("wan", unknown, tmp_path))) == (81, 480, 832, 16)
    assert _size(vars(_train_args("cogvideox", unknown, tmp_path))) == (49, 480, 720, 8)


def test_trainer_help_names_the_model_defaults():
    from blade.distill.trainer import build_parser

    text = build_parser("wan").format_help()
    assert "blade_defaults.json" in text and "blade.families.MODELS" in text


# ----------------------------------------------------------------------------------------------------------------
# Inference script (tiny random pipelines whose transformer configs say they are the published models)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    from blade.testing.tiny import build_tiny_cogvideox_pipeline, build_tiny_wan_pipeline

    root = tmp_path_factory.mktemp("tiny_model_defaults")
    build_tiny_wan_pipeline(seed=0).save_pretrained(root / "wan")
    build_tiny_cogvideox_pipeline(seed=0).save_pretrained(root / "cogvideox")
    return root


def _looks_like(tiny_folders: Path, tmp_path: Path, name: str) -> Path:
    """A complete tiny pipeline folder whose transformer config(s) are the published model's (only the JSON
    matters for recognition; no weight is loaded by prepare_job without a LoRA)."""
    spec = MODELS[name]
    folder = tmp_path / name
    shutil.copytree(tiny_folders / spec.family, folder)
    index = json.loads((folder / "model_index.json").read_text())
    for expert in spec.experts:
        if expert != "transformer":
            shutil.copytree(folder / "transformer", folder / expert, dirs_exist_ok=True)
            index[expert] = index["transformer"]
        (folder / expert / "config.json").write_text((CONFIGS / name / expert / "config.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index))
    assert model_of_folder(folder) is spec
    return folder


def _job(family: str, folder: Path, tmp_path: Path, *extra: str):
    from blade.cli import ScriptSpec, build_parser, prepare_job

    spec = ScriptSpec(family=family, description="test")
    argv = ["--model_path", str(folder), "--prompt", "a dog", "--gpu", "-1", "--output_dir", str(tmp_path / "out"),
            *extra]  # fmt: skip
    return prepare_job(spec, build_parser(spec).parse_args(argv))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_inference_script_takes_the_recognised_models_defaults(name, tiny_folders, tmp_path):
    size, cfg = EXPECTED[name]
    family = MODELS[name].family
    folder = _looks_like(tiny_folders, tmp_path, name)
    job = _job(family, folder, tmp_path)
    assert job.model is MODELS[name] and _size(job) == size
    assert job.guidance_scale == cfg  # the stock model (no LoRA): its own CFG

    job = _job(family, folder, tmp_path, "--num_frames", "9", "--height", "32", "--width", "64", "--fps", "12",
               "--guidance_scale", "1")  # fmt: skip
    assert _size(job) == (9, 32, 64, 12) and job.guidance_scale == 1.0  # explicit flags win

    (folder / "blade_defaults.json").write_text(json.dumps({"num_frames": 17, "fps": 10}))
    job = _job(family, folder, tmp_path, "--height", "64")
    assert _size(job) == (17, 64, size[2], 10)  # flag > blade_defaults.json > the model's registry defaults
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_inference_script_keeps_the_family_defaults_for_an_unknown_folder(family, tiny_folders, tmp_path):
    job = _job(family, tiny_folders / family, tmp_path)
    fam = FAMILIES[family]
    assert job.model is None and job.guidance_scale == 1.0
    assert _size(job) == (fam.default_num_frames, fam.default_height, fam.default_width, fam.fps)


def test_inference_help_states_the_precedence():
    from blade.cli import ScriptSpec, build_parser

    text = " ".join(build_parser(ScriptSpec(family="wan", description="t")).format_help().split())
    assert "blade_defaults.json" in text and "blade.families.MODELS" in text and "--fps" in text
