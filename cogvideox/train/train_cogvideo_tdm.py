"""Sparsity-aware TDM distillation of CogVideoX-5B into an 8-step LoRA student (see `--help`).

Launch with `accelerate launch --config_file cogvideox/train/config.yaml cogvideox/train/train_cogvideo_tdm.py ...`
(cogvideox/train_tdm_1.sh). The loop lives in blade/distill/trainer.py, shared with Wan.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without `pip install -e .`

from blade.distill.trainer import main  # noqa: E402

if __name__ == "__main__":
    main("cogvideox")
