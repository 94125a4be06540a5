"""8-step BLADE inference for CogVideoX-5B.

    python cogvideox/train/inference.py --model_path ./CogVideoX-5b --lora_path ./blade_cogvideox_lora \
        --prompt "a panda playing guitar in a bamboo forest" --gpu 0

Run `--help` for every flag; the shared logic lives in `blade/cli.py`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without `pip install -e .`

from blade.cli import ScriptSpec, main  # noqa: E402

SPEC = ScriptSpec(
    family="cogvideox",
    description="Generate videos with a CogVideoX-5B pipeline and an 8-step BLADE student LoRA (ASA block-sparse "
    "attention).",
    model_help="local CogVideoX diffusers pipeline folder (required)",
)

if __name__ == "__main__":
    sys.exit(main(SPEC))
