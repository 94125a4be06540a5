"""The TDM trainer under `accelerate launch` with the DeepSpeed ZeRO-2 config (wanx/train/config.yaml), on CPU.

Skipped unless DeepSpeed is importable (CI has none; locally: `pip install --target /tmp/ds deepspeed` and
`PYTHONPATH=/tmp/ds`). On a CPU-only host the trainer's `Accelerator(cpu=True)` makes accelerate ignore
ACCELERATE_USE_DEEPSPEED, so the launched script is wrapped to take the GPU code path (`cpu=False`): accelerate then
initialises the process group through `deepspeed.comm` (gloo) and reports DistributedType.DEEPSPEED. One process only:
with two, accelerate (1.15) leaves num_processes = 1 / process_index = 0 on every rank when no GPU backend exists.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip(
    "deepspeed", reason="deepspeed is not installed (in no extra but [deepspeed]; the launch scripts use it only with "
    "USE_DEEPSPEED=1): this ZeRO-2 path is documented, not run in CI"
)

from blade.testing.tiny import build_tiny_wan_pipeline, save_with_prompt_cache  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--num_frames", "9", "--height", "16", "--width", "16", "--k_step", "2", "--rank", "4", "--lora_alpha", "4",
         "--seed", "3", "--train_batch_size", "2", "--mixed_precision", "no", "--cfg", "3.0"]

# Forces the GPU code path and skips DeepSpeed's CPU-only shared-memory comm op (a minutes-long JIT C++ build; the
# gloo fallback it replaces is what DeepSpeed uses when the op is unavailable).
WRAPPER = """
import importlib, runpy, sys
import accelerate

_init = accelerate.Accelerator.__init__

def init(self, *args, cpu=False, **kwargs):
    _init(self, *args, cpu=False, **kwargs)
    print(f"[ds-test] type={self.distributed_type} mixed_precision={self.mixed_precision}", flush=True)

accelerate.Accelerator.__init__ = init
# not `import deepspeed.comm.torch`: deepspeed.comm re-exports PyTorch's `torch` under that attribute name
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = save_with_prompt_cache(build_tiny_wan_pipeline(seed=0), tmp_path_factory.mktemp("ds"),
                                  ["a red ball moves left", "a dog runs", "a blue car on the road", "a small cat"])
    # the repo's ZeRO-2 accelerate config, with its relative ds_config.json path made absolute
    text = (REPO / "wanx" / "train" / "config.yaml").read_text()
    (root / "config.yaml").write_text(text.replace("../../ds_config.json", str(REPO / "ds_config.json")))
    (root / "wrap.py").write_text(WRAPPER)
    return root


@pytest.mark.slow
def test_deepspeed_config_single_process(assets, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_BUILD_OPS": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(assets / "config.yaml"),
           "--num_processes", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29527",
           str(assets / "wrap.py"), str(REPO / "wanx" / "train" / "train_wanx_tdm.py"),
           "--pretrained_model_name_or_path", str(assets / "pipe"), "--prompt_dir", str(assets / "prompts"),
           "--output_dir", str(out), *SMALL, "--max_train_steps", "2", "--checkpointing_steps", "1",
           "--validation_steps", "0", "--report_to", "none", "--gradient_accumulation_steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    # accelerate took the DeepSpeed branch, whose precision comes from ds_config.json (bf16), not --mixed_precision
    assert "[ds-test] type=DistributedType.DEEPSPEED mixed_precision=bf16" in log
    assert "DeepSpeed config detected" in log
    assert (out / "checkpoint-2" / "COMPLETE").is_file()
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert lora and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in lora.values())
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # the student moved from its B = 0 start
