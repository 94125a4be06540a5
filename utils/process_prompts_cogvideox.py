"""Encode training prompts for cogvideox TDM distillation (see `--help`; the logic lives in blade/prompt_cli.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from blade.prompt_cli import COGVIDEOX, main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(COGVIDEOX))
