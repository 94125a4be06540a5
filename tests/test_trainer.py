"""The shared TDM trainer (blade/distill/trainer.py) end to end on the tiny Wan pipeline, on CPU."""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blade.distill.trainer import CheckpointError, check_checkpoint, parse_args, train
from blade.prompt_cli import main as encode_main
from blade.prompts import PromptCacheError
from blade.testing.tiny import build_tiny_wan_pipeline, save_with_prompt_cache

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--num_frames", "9", "--height", "16", "--width", "16", "--k_step", "2", "--rank", "4", "--lora_alpha", "4",
         "--seed", "3", "--train_batch_size", "2", "--mixed_precision", "no", "--cfg", "3.0"]



@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return save_with_prompt_cache(build_tiny_wan_pipeline(seed=0), tmp_path_factory.mktemp("trainer"),
                                  ["a red ball moves left", "a dog runs", "a blue car on the road", "a small cat",
                                   "a bird flies over the river"])


def _args(assets, out, *extra):
    return parse_args("wan", ["--pretrained_model_name_or_path", str(assets / "pipe"), "--prompt_dir",
                              str(assets / "prompts"), "--output_dir", str(out), *SMALL, *extra])


def _lora(folder):
    return load_file(str(Path(folder) / "pytorch_lora_weights.safetensors"))


def test_resume_equals_uninterrupted_and_lora_loads(assets, tmp_path):
    full = tmp_path / "full"
    summary = train(_args(assets, full, "--max_train_steps", "4", "--checkpointing_steps", "2",
                          "--validation_steps", "4"))
    assert summary["global_step"] == 4
    for name in ("checkpoint-2", "checkpoint-4"):
        assert (full / name / "COMPLETE").is_file() and (full / name / "blade_config.json").is_file()
    assert (full / "validation" / "step-4" / "00.mp4").stat().st_size > 0
    assert list((full / "logs").rglob("events.out.tfevents*"))

    # "killed" run: only checkpoint-2 survived, plus a half-written later checkpoint without its marker
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copytree(full / "checkpoint-4", resumed / "checkpoint-3")
    (resumed / "checkpoint-3" / "COMPLETE").unlink()
    out = train(_args(assets, resumed, "--max_train_steps", "4", "--checkpointing_steps", "2",
                      "--validation_steps", "0", "--resume_from_checkpoint", "latest", "--report_to", "none"))
    assert out["global_step"] == 4
    a, b = _lora(full), _lora(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fa = load_file(str(full / "checkpoint-4" / "fake_lora.safetensors"))
    fb = load_file(str(resumed / "checkpoint-4" / "fake_lora.safetensors"))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    init_b = [k for k in a if "lora_B" in k]
    assert init_b and any(a[k].abs().sum() > 0 for k in init_b)  # the student moved away from its B = 0 start
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in a

    # the final LoRA loads into a stock pipeline and changes its transformer
    pipe = build_tiny_wan_pipeline(seed=0)
    x, t, e = torch.randn(1, 16, 3, 2, 2), torch.tensor([500.0]), torch.randn(1, 8, 32)
    with torch.no_grad():
        before = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=e, return_dict=False)[0]
        pipe.load_lora_weights(str(full))
        after = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=e, return_dict=False)[0]
    assert not torch.allclose(before, after)
    q = pipe.transformer.blocks[0].attn1.to_q
    assert torch.equal(q.lora_A[q.active_adapters[0]].weight, a["transformer.blocks.0.attn1.to_q.lora_A.weight"])

    # an explicit incomplete / corrupt checkpoint is refused with a clear error
    with pytest.raises(CheckpointError, match="COMPLETE"):
        check_checkpoint(resumed / "checkpoint-3")
    (resumed / "checkpoint-2" / "optimizer.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot load"):
        train(_args(assets, tmp_path / "x", "--max_train_steps", "3", "--validation_steps", "0", "--report_to",
                    "none", "--resume_from_checkpoint", str(resumed / "checkpoint-2")))


def test_bad_prompt_dirs(assets, tmp_path):
    with pytest.raises(PromptCacheError, match="not found"):
        train(parse_args("wan", ["--pretrained_model_name_or_path", str(assets / "pipe"), "--prompt_dir",
                                 str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o"), *SMALL]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PromptCacheError, match="index.json"):
        train(parse_args("wan", ["--pretrained_model_name_or_path", str(assets / "pipe"), "--prompt_dir",
                                 str(tmp_path / "empty"), "--output_dir", str(tmp_path / "o"), *SMALL]))


@pytest.mark.slow
def test_two_process_accelerate_launch(assets, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # accelerate 1.15's `--cpu` starts a single process; `--multi_gpu` on a CPU-only host starts 2 (torchrun) and the
    # trainer's Accelerator(cpu=True) joins them over gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           str(REPO / "wanx" / "train" / "train_wanx_tdm.py"),
           "--pretrained_model_name_or_path", str(assets / "pipe"), "--prompt_dir", str(assets / "prompts"),
           "--output_dir", str(tmp_path / "ddp"), *SMALL, "--max_train_steps", "2", "--checkpointing_steps", "1",
           "--validation_steps", "0", "--report_to", "none", "--gradient_accumulation_steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "ddp" / "checkpoint-2"
    assert (ckpt / "COMPLETE").is_file()
    assert (ckpt / "rng_state_0.pt").is_file() and (ckpt / "rng_state_1.pt").is_file()
    assert _lora(tmp_path / "ddp")


def test_cogvideox_with_asa_smoke(tmp_path):
    """CogVideoX path (v-prediction, [B, F, C, H, W], RoPE from the pipeline, x0-space fake loss, lambda_reg) + ASA."""
    from blade.prompt_cli import COGVIDEOX
    from blade.testing.tiny import build_tiny_cogvideox_pipeline

    build_tiny_cogvideox_pipeline(seed=0).save_pretrained(tmp_path / "cog")
    (tmp_path / "p.txt").write_text("a red ball\na dog runs\n")
    assert encode_main(COGVIDEOX, ["--input_file", str(tmp_path / "p.txt"), "--output_dir", str(tmp_path / "pc"),
                                   "--model_path", str(tmp_path / "cog")]) == 0
    args = parse_args("cogvideox", ["--pretrained_model_name_or_path", str(tmp_path / "cog"), "--prompt_dir",
                                    str(tmp_path / "pc"), "--output_dir", str(tmp_path / "o"), "--num_frames", "9",
                                    "--height", "32", "--width", "32", "--k_step", "2", "--rank", "4", "--lora_alpha",
                                    "4", "--max_train_steps", "1", "--validation_steps", "0", "--report_to", "none",
                                    "--mixed_precision", "no", "--use_sparsity"])
    out = train(args)
    assert out["global_step"] == 1 and "loss_fake_reg" in out and "sparsity" in out
    assert all(map(lambda k: torch.isfinite(torch.tensor(out[k])), ("loss_fake", "loss_g")))
    cfg = (tmp_path / "o" / "blade_config.json").read_text()
    assert '"prediction_type": "v_prediction"' in cfg and '"asa": {' in cfg
    # the default --lora_targets all reaches CogVideoX's feed-forward and time-embedding Linears, and the saved file
    # loads into a stock CogVideoX pipeline with those weights
    saved = _lora(tmp_path / "o")
    pipe = build_tiny_cogvideox_pipeline(seed=0)
    pipe.load_lora_weights(str(tmp_path / "o"))
    for name in ("transformer_blocks.0.ff.net.2", "time_embedding.linear_1", "proj_out"):
        module = pipe.transformer.get_submodule(name)
        assert torch.equal(module.lora_A[module.active_adapters[0]].weight, saved[f"transformer.{name}.lora_A.weight"])


def test_tinyworld_prompt_cache_check():
    """The TinyWorld teacher learned CFG's uncond from "" at 32 text tokens: Wan's negative prompt is refused."""
    from types import SimpleNamespace

    from blade.tinyworld.distill import check_tinyworld_prompt_cache

    def cache(negative, max_length):
        return SimpleNamespace(index={"negative": {"prompt": negative}}, max_length=max_length, directory="p")

    check_tinyworld_prompt_cache(cache("", 32))
    with pytest.raises(PromptCacheError, match="negative prompt"):
        check_tinyworld_prompt_cache(cache("Bright tones, overexposed", 32))
    with pytest.raises(PromptCacheError, match="512 text tokens"):
        check_tinyworld_prompt_cache(cache("", 512))


def _tensors_equal(a, b) -> bool:
    """Bit-for-bit equality of nested optimizer/scheduler states (tensors, numbers, dicts, lists)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_asa_resume_equals_uninterrupted(assets, tmp_path):
    """With --use_sparsity the prober draws from torch's global RNG: a run stopped by --max_train_minutes and
    resumed from 'latest' must end bit-identical (student, fake, optimizer) to an uninterrupted run.

    128x128 with 9 frames gives 3 x 8 x 8 = 192 video tokens = 2 ASA blocks of 128, so the prober's random sample
    positions change the mask (with one block the mask is always full and an RNG drift would go unseen)."""
    size = ["--height", "128", "--width", "128", "--use_sparsity", "--validation_steps", "0", "--report_to", "none",
            "--max_train_steps", "4", "--checkpointing_steps", "2"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    assert train(_args(assets, full, *size))["global_step"] == 4
    # stop after the first optimizer step (any step takes longer than 1e-6 minutes), then resume in a new train()
    first = train(_args(assets, stopped, *size, "--max_train_minutes", "1e-6"))
    assert first["global_step"] == 1 and (stopped / "checkpoint-1" / "COMPLETE").is_file()
    assert train(_args(assets, stopped, *size, "--resume_from_checkpoint", "latest"))["global_step"] == 4

    a, b = _lora(full), _lora(stopped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fa = load_file(str(full / "checkpoint-4" / "fake_lora.safetensors"))
    fb = load_file(str(stopped / "checkpoint-4" / "fake_lora.safetensors"))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    oa = torch.load(full / "checkpoint-4" / "optimizer.pt", weights_only=False)
    ob = torch.load(stopped / "checkpoint-4" / "optimizer.pt", weights_only=False)
    assert _tensors_equal(oa, ob)
    # the run really trained with a non-trivial sparse mask (else the test would not see RNG drift)
    cfg = (full / "blade_config.json").read_text()
    assert '"asa": {' in cfg


def test_sigterm_stops_at_the_step_boundary_with_a_checkpoint_and_resumes_exactly(assets, tmp_path, monkeypatch):
    """A preemption notice (SIGTERM) in the middle of step 2 of 4, checkpoints every 100 steps: the run finishes
    step 2, writes checkpoint-2 and the LoRA, returns normally; resuming it ends equal to an uninterrupted run."""
    import signal

    from blade.distill.step import TDMStep

    common = ["--max_train_steps", "4", "--checkpointing_steps", "100", "--validation_steps", "0",
              "--report_to", "none"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    assert train(_args(assets, full, *common))["global_step"] == 4

    real_step, calls = TDMStep.__call__, []

    def step_then_preempt(self, batches, state):
        calls.append(state["global_step"])
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)  # arrives while step 2 runs: default action would kill pytest
        return real_step(self, batches, state)

    monkeypatch.setattr(TDMStep, "__call__", step_then_preempt)
    before = signal.getsignal(signal.SIGTERM)
    first = train(_args(assets, stopped, *common))
    assert signal.getsignal(signal.SIGTERM) is before
    assert first["global_step"] == 2 and first["stopped_by"] == "SIGTERM"
    assert (stopped / "checkpoint-2" / "COMPLETE").is_file()
    assert (stopped / "pytorch_lora_weights.safetensors").is_file()
    monkeypatch.setattr(TDMStep, "__call__", real_step)
    resumed = train(_args(assets, stopped, *common, "--resume_from_checkpoint", "latest"))
    assert resumed["global_step"] == 4 and "stopped_by" not in resumed
    a, b = _lora(full), _lora(stopped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------- fault injection (issue 21)


def _main_error(capsys, argv) -> str:
    """Run the trainer's main() and return its one-line error (it must exit 2)."""
    from blade.distill.trainer import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main("wan", argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ")
    return err[-1]


def _argv(assets, out, *extra, prompts=None):
    return ["--pretrained_model_name_or_path", str(assets / "pipe"), "--prompt_dir", str(prompts or assets / "prompts"),
            "--output_dir", str(out), *SMALL, "--validation_steps", "0", "--report_to", "none", *extra]


@pytest.mark.parametrize("flag,value", [
    ("--train_batch_size", "0"), ("--gradient_accumulation_steps", "0"), ("--checkpointing_steps", "0"),
    ("--rank", "0"), ("--max_train_steps", "0"), ("--learning_rate", "-1e-4"), ("--learning_rate_fake", "nan"),
    ("--eta", "1.5"), ("--eta", "-0.1"), ("--tau_max", "1000"), ("--k_step", "0"), ("--max_train_minutes", "0"),
    ("--seed", "-1"), ("--height", "0"), ("--dense_steps", "-1"), ("--asa_max_keep", "0"), ("--asa_max_keep", "1.5"),
    ("--asa_block_size", "24"), ("--asa_block_size", "0"), ("--asa_pool_size", "0"), ("--fake_attention", "dense"),
])
def test_numeric_flags_validated_at_parse_time(assets, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as info:
        parse_args("wan", _argv(assets, tmp_path / "o", flag, value))
    assert info.value.code == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_tau_max_must_exceed_the_last_segment_end(assets, tmp_path):
    """K = 2: anchors 999, 499, so tau in (499, tau_max] needs tau_max >= 500 (student_anchors is the reference)."""
    from blade.distill.schedule import student_anchors

    last_mid = student_anchors(2)[1]
    parse_args("wan", _argv(assets, tmp_path, "--tau_max", str(last_mid + 1)))
    with pytest.raises(SystemExit):
        parse_args("wan", _argv(assets, tmp_path, "--tau_max", str(last_mid)))


def _copy_cache(assets, dst: Path) -> Path:
    shutil.copytree(assets / "prompts", dst)
    return dst


def test_bad_outputs_refused_before_the_model_loads(assets, tmp_path, capsys, monkeypatch):
    import blade.distill.trainer as trainer
    import blade.outputs as outputs

    def no_load(*a, **k):
        raise AssertionError("the model loaded before the output folder was checked")

    monkeypatch.setattr(trainer, "load_pipeline", no_load)
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    err = _main_error(capsys, _argv(assets, a_file))
    assert "is a file" in err and str(a_file) in err
    err = _main_error(capsys, _argv(assets, a_file / "sub"))
    assert "cannot be created" in err
    # not enough space for one checkpoint (the estimate, from the transformer config, is > 0)
    assert trainer.estimate_checkpoint_bytes(parse_args("wan", _argv(assets, tmp_path / "o"))) > 0
    real = shutil.disk_usage
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    err = _main_error(capsys, _argv(assets, tmp_path / "full"))
    assert "free" in err and "one checkpoint needs about" in err


def test_prompt_cache_checked_against_the_model(assets, tmp_path, capsys, monkeypatch):
    import json

    import blade.distill.trainer as trainer

    monkeypatch.setattr(trainer, "load_pipeline", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    cases = {
        "family": (lambda ix: {**ix, "family": "cogvideox"}, "encoded for 'cogvideox'"),
        "width": (lambda ix: {**ix, "prompts": [{**e, "shape": [e["shape"][0], 64]} for e in ix["prompts"]],
                              "negative": {**ix["negative"], "shape": [ix["negative"]["shape"][0], 64]}},
                  "64-wide text embeddings"),
        "dtype": (lambda ix: {**ix, "prompts": [{**ix["prompts"][0], "dtype": "torch.bfloat16"}, *ix["prompts"][1:]]},
                  "mixes dtypes"),
    }
    for name, (edit, message) in cases.items():
        cache = _copy_cache(assets, tmp_path / name)
        index = json.loads((cache / "index.json").read_text())
        (cache / "index.json").write_text(json.dumps(edit(index)))
        err = _main_error(capsys, _argv(assets, tmp_path / f"o_{name}", prompts=cache))
        assert message in err and str(cache) in err, (name, err)


def _overwrite_tensor_bytes(file: Path, value: float) -> None:
    """Overwrite every float32 of a safetensors file with `value`, keeping its header and size."""
    import struct

    data = file.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    body = struct.pack("<f", value) * ((len(data) - header) // 4)
    file.write_bytes(data[:header] + body)


def test_garbage_embeddings_stop_training_before_a_checkpoint(assets, tmp_path, capsys):
    # NaN bytes: the cache refuses the file itself, naming it
    cache = _copy_cache(assets, tmp_path / "nan")
    shard = next(cache.glob("shard-*.safetensors"))
    _overwrite_tensor_bytes(shard, float("nan"))
    err = _main_error(capsys, _argv(assets, tmp_path / "o_nan", "--max_train_steps", "2", prompts=cache))
    assert str(shard) in err and "non-finite" in err
    # huge but finite bytes: training goes non-finite; it stops at step 1, before checkpoint-1, naming the cause
    cache = _copy_cache(assets, tmp_path / "huge")
    _overwrite_tensor_bytes(next(cache.glob("shard-*.safetensors")), 3e38)
    out = tmp_path / "o_huge"
    err = _main_error(capsys, _argv(assets, out, "--max_train_steps", "2", "--checkpointing_steps", "1",
                                    prompts=cache))
    assert "step 1" in err and "non-finite" in err and "prompt embeddings" in err
    assert not list(out.glob("checkpoint-*")) and not (out / "pytorch_lora_weights.safetensors").exists()


def test_failed_save_and_corrupt_checkpoints_name_the_file(assets, tmp_path, capsys, monkeypatch):
    import errno
    import stat

    import blade.distill.trainer as trainer

    out = tmp_path / "run"
    real_write = trainer._write_checkpoint_files

    def full_disk_at_step_2(tmp, step, *a, **k):
        if step == 2:
            (tmp / "optimizer.pt").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(tmp, step, *a, **k)

    monkeypatch.setattr(trainer, "_write_checkpoint_files", full_disk_at_step_2)
    err = _main_error(capsys, _argv(assets, out, "--max_train_steps", "3", "--checkpointing_steps", "1"))
    assert "checkpoint-2" in err and "no space left" in err and f"{out / 'checkpoint-1'} is intact" in err
    assert not (out / "checkpoint-2.tmp").exists() and (out / "checkpoint-1" / "COMPLETE").is_file()
    monkeypatch.setattr(trainer, "_write_checkpoint_files", real_write)

    # files are readable by others (0666 minus the umask), not safetensors' 0600
    umask = os.umask(0)
    os.umask(umask)
    for f in (out / "checkpoint-1").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f

    # resume completes the run; then corrupt the latest checkpoint's files one at a time
    assert train(_args(assets, out, "--max_train_steps", "2", "--checkpointing_steps", "1", "--validation_steps",
                       "0", "--report_to", "none", "--resume_from_checkpoint", "latest"))["global_step"] == 2
    latest = out / "checkpoint-2"
    for name in ("pytorch_lora_weights.safetensors", "fake_lora.safetensors", "rng_state_0.pt", "optimizer.pt"):
        good = (latest / name).read_bytes()
        (latest / name).write_bytes(good[: len(good) // 2])  # truncated
        err = _main_error(capsys, _argv(assets, out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"))
        assert str(latest) in err and name in err and f"--resume_from_checkpoint {out / 'checkpoint-1'}" in err, err
        (latest / name).write_bytes(good)
    # the suggested previous checkpoint resumes
    assert train(_args(assets, tmp_path / "other", "--max_train_steps", "2", "--validation_steps", "0",
                       "--report_to", "none", "--resume_from_checkpoint", str(out / "checkpoint-1")))["global_step"] \
        == 2


@pytest.mark.parametrize("preset, present, absent", [
    ("attn_ffn", ["blocks.0.ffn.net.0.proj", "blocks.1.ffn.net.2", "blocks.0.attn2.to_k"], ["proj_out", "time_proj"]),
    ("all", ["blocks.0.ffn.net.2", "condition_embedder.time_proj", "proj_out"], []),
])
def test_lora_targets_reach_the_saved_lora_and_a_stock_pipeline(assets, tmp_path, preset, present, absent):
    """--lora_targets widens the student's (and fake's) LoRA beyond the attention projections; the saved file holds
    those layers, loads into a stock pipeline with the same weights, and a checkpoint of another preset is refused."""
    out = tmp_path / preset
    train(_args(assets, out, "--max_train_steps", "2", "--checkpointing_steps", "2", "--validation_steps", "0",
                "--report_to", "none", "--lora_targets", preset))
    saved = _lora(out)
    from blade.config import BladeConfig

    assert BladeConfig.load(out).lora_targets == preset  # the choice is named in blade_config.json too
    layers = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in saved}
    assert all(name in layers for name in present) and not any(name in layers for name in absent)
    pipe = build_tiny_wan_pipeline(seed=0)
    pipe.load_lora_weights(str(out))
    module = pipe.transformer.get_submodule(present[1])
    key = f"transformer.{present[1]}.lora_B.weight"
    assert saved[key].abs().sum() > 0  # the generator's first update (step 2) moved it away from B = 0
    assert torch.equal(module.lora_B[module.active_adapters[0]].weight, saved[key])
    with pytest.raises(CheckpointError, match="lora_targets"):
        train(_args(assets, tmp_path / "other", "--max_train_steps", "3", "--validation_steps", "0", "--report_to",
                    "none", "--resume_from_checkpoint", str(out / "checkpoint-2"), "--lora_targets", "attn"))


def test_asa_max_keep_sets_the_trained_and_saved_sparsity(assets, tmp_path):
    """256x256, 9 frames: 3 x 16 x 16 = 768 video tokens = 6 key blocks. The family default keeps at most
    ceil(0.17 x 6) = 2 of them per query block (sparsity 4/6), --asa_max_keep 0.5 at most 3 (sparsity >= 3/6); the
    value is written to blade_config.json, which inference reads."""
    from blade.config import BladeConfig

    size = ["--height", "256", "--width", "256", "--use_sparsity", "--max_train_steps", "1", "--validation_steps", "0",
            "--report_to", "none"]
    default = train(_args(assets, tmp_path / "d", *size))
    wider = train(_args(assets, tmp_path / "w", *size, "--asa_max_keep", "0.5"))
    assert default["sparsity"] == pytest.approx(4 / 6, abs=1e-6)
    assert 3 / 6 - 1e-6 <= wider["sparsity"] < default["sparsity"]
    saved = BladeConfig.load(tmp_path / "w").asa_config()
    assert saved.max_keep == 0.5 and BladeConfig.load(tmp_path / "d").asa_config().max_keep == 0.17


def test_asa_block_size_and_dense_fake_train_and_are_saved(assets, tmp_path):
    """--asa_block_size 64 at 256x256, 9 frames: 768 video tokens = 12 key blocks of 64, of which ASA keeps at most
    ceil(0.17 x 12) = 3 per query block (sparsity >= 9/12, against 4/6 with the family's 128); the size and
    --asa_pool_size 8 are written to blade_config.json, which inference reads. --fake_attention dense trains beside
    it (its effect on the fake's forward is tested in test_study_options)."""
    from blade.config import BladeConfig

    out = tmp_path / "b64"
    logs = train(_args(assets, out, "--height", "256", "--width", "256", "--use_sparsity", "--asa_block_size", "64",
                       "--asa_pool_size", "8", "--fake_attention", "dense", "--max_train_steps", "2",
                       "--validation_steps", "0", "--report_to", "none"))
    assert 9 / 12 - 1e-6 <= logs["sparsity"] < 1.0
    saved = BladeConfig.load(out).asa_config()
    assert saved.block_size == 64 and saved.max_keep == 0.17 and saved.pool_size == 8


def test_per_sample_step_draws_train_and_resume_exactly(assets, tmp_path, capsys):
    """--step_draw sample (TDM's and BLADE's draw): 2+2 steps from checkpoint-2 give the 4-step run's weights bit for
    bit (the draws come from the checkpointed generator); with --dense_steps it is refused before the model loads."""
    common = ("--max_train_steps", "4", "--checkpointing_steps", "2", "--validation_steps", "0", "--report_to",
              "none", "--step_draw", "sample", "--train_batch_size", "4")
    full = tmp_path / "full"
    logs = train(_args(assets, full, *common))
    assert logs["global_step"] == 4 and math.isfinite(logs["loss_g"])
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    train(_args(assets, resumed, *common, "--resume_from_checkpoint", "latest"))
    a, b = _lora(full), _lora(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit):
        parse_args("wan", _argv(assets, tmp_path / "o", "--use_sparsity", "--dense_steps", "1", "--step_draw",
                                "sample"))
    assert "--step_draw sample cannot go with --dense_steps" in capsys.readouterr().err


def test_shift_defaults_to_the_folders_flow_shift_and_resume_refuses_another(assets, tmp_path, capsys, monkeypatch):
    """No --shift: the folder's scheduler flow_shift (the tiny Wan folder ships UniPC with 3.0, as Wan2.1 does), saved
    in blade_config.json; --shift wins. A checkpoint trained with another shift is refused before the model loads."""
    import json as json_module

    import blade.distill.trainer as trainer
    from blade.families import folder_flow_shift

    scheduler_config = json_module.loads((assets / "pipe" / "scheduler" / "scheduler_config.json").read_text())
    assert folder_flow_shift(assets / "pipe") == scheduler_config["flow_shift"] == 3.0
    assert parse_args("wan", _argv(assets, tmp_path / "a")).shift == 3.0
    assert parse_args("wan", _argv(assets, tmp_path / "a", "--shift", "1")).shift == 1.0
    assert not hasattr(parse_args("cogvideox", _argv(assets, tmp_path / "a")), "shift") or \
        parse_args("cogvideox", _argv(assets, tmp_path / "a")).shift is None

    out = tmp_path / "s1"
    train(_args(assets, out, "--shift", "1", "--max_train_steps", "1", "--checkpointing_steps", "1",
                "--validation_steps", "0", "--report_to", "none"))
    saved = json_module.loads((out / "checkpoint-1" / "blade_config.json").read_text())
    assert saved["shift"] == 1.0

    def no_load(*a, **k):
        raise AssertionError("the model loaded before the checkpoint's recipe was checked")

    monkeypatch.setattr(trainer, "load_pipeline", no_load)
    err = _main_error(capsys, _argv(assets, out, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"))
    assert "--shift 1.0 (this run: 3.0)" in err and "Pass --shift 1.0" in err
    # the target's guidance likewise (Wan's --cfg default moved from 5.0 to 3.5 on 2026-12-06): trained at SMALL's 3.0
    err = _main_error(capsys, _argv(assets, out, "--max_train_steps", "2", "--resume_from_checkpoint", "latest",
                                    "--shift", "1", "--cfg", "5.0"))
    assert "--cfg 3.0 (this run: 5.0)" in err and "Pass --cfg 3.0 to resume" in err and "--shift" not in err
