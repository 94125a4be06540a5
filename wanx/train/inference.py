"""8-step BLADE inference for Wan2.1 (and the bundled TinyWorld miniature, the default model).

    python wanx/train/inference.py --prompt "a large yellow circle moves right on a gray background"
        (the bundled TinyWorld teacher + its BLADE student LoRA, 8 steps, ASA; `--lora_path none` for the teacher)
    python wanx/train/inference.py --model_path ./Wan2.1-T2V-1.3B-Diffusers --lora_path ./blade_wan_lora \
        --prompt_file prompts.txt --gpu 0

Run `--help` for every flag; the shared logic lives in `blade/cli.py`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without `pip install -e .`

from blade.cli import ScriptSpec, main  # noqa: E402
from blade.tinyworld.model import TINYWORLD_DEFAULTS, bundled_pipeline_path  # noqa: E402

SPEC = ScriptSpec(
    family="wan",
    description="Generate videos with a Wan2.1 pipeline and an 8-step BLADE student LoRA (ASA block-sparse "
    "attention). Default model: the bundled TinyWorld miniature (17x128x128, runs on a CPU).",
    default_model_path=bundled_pipeline_path(),
    default_model_hints={**TINYWORLD_DEFAULTS, "tinyworld": True},
    default_lora_path=bundled_pipeline_path().parent / "blade_lora",
    default_model_missing="The bundled TinyWorld pipeline (assets/tinyworld/pipeline) is missing: restore it from "
    "the repository (git checkout -- assets/tinyworld) or pass --model_path to a Wan2.1 diffusers folder, e.g. "
    "Wan2.1-T2V-1.3B-Diffusers from Hugging Face (`huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers "
    "--local-dir ./Wan2.1-T2V-1.3B-Diffusers`).",
    model_help="local Wan2.1 diffusers pipeline folder (default: the bundled TinyWorld pipeline)",
)

if __name__ == "__main__":
    sys.exit(main(SPEC))
