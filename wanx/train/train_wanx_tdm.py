"""Sparsity-aware TDM distillation of Wan2.1-T2V into an 8-step LoRA student (see `--help`).

Launch with `accelerate launch --config_file wanx/train/config.yaml wanx/train/train_wanx_tdm.py ...`
(wanx/train_wanx_tdm.sh). The loop lives in blade/distill/trainer.py, shared with CogVideoX.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without `pip install -e .`

from blade.distill.trainer import main  # noqa: E402

if __name__ == "__main__":
    main("wan")
