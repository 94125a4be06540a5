"""The TinyWorld evaluation command on a small random pipeline of the TinyWorld architecture (CPU)."""

import json

import pytest
import torch

from blade.tinyworld import model as tw
from blade.tinyworld.evaluate import main, read_prompts
from blade.tinyworld.world import PromptError

PROMPT = "a large red circle moves right on a black background"


@pytest.fixture(scope="module")
def tiny_tinyworld(tmp_path_factory):
    """TinyWorld layout and video size, toy widths (random weights): evaluation plumbing, not quality."""
    path = tmp_path_factory.mktemp("tw") / "pipeline"
    pipe = tw.build_pipeline(
        vae=tw.build_vae(base_dim=8, num_res_blocks=1),
        transformer=tw.build_transformer(num_layers=1, num_attention_heads=2, attention_head_dim=16, ffn_dim=32,
                                         freq_dim=32),
    )
    tw.save_pipeline(pipe, path, dtype=torch.float32)
    return path


def _run(tmp_path, pipeline, *args):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"# a comment\n{PROMPT}\n\n")
    out = tmp_path / "report.json"
    code = main(["--prompts", str(prompts), "--seeds", "0", "--steps", "2", "--guidance", "1.0",
                 "--model", str(pipeline), "--device", "cpu", "--out", str(out), *args])
    return code, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.parametrize("mode", ["window", "random", "asa"])
def test_equal_sparsity_modes_report_requested_sparsity_and_dense_agreement(tmp_path, tiny_tinyworld, mode):
    code, report = _run(tmp_path, tiny_tinyworld, "--attention", mode, "--sparsity", "0.75", "--compare_dense")
    assert code == 0
    # 5 x 32 x 32 = 5120 tokens -> 40 blocks of 128: 10 kept per row = exactly 0.75 sparsity.
    assert report["sparsity"] == pytest.approx(0.75)
    for key in ("adherence", "stability", "fidelity", "psnr", "ssim"):
        assert key in report
    video = report["videos"][0]
    assert video["prompt"] == PROMPT and video["seed"] == 0
    assert 0.0 <= video["adherence"] <= 1.0 and video["ssim"] <= 1.0
    assert report["settings"]["attention"] == mode


def test_dense_matches_itself(tmp_path, tiny_tinyworld):
    code, report = _run(tmp_path, tiny_tinyworld, "--attention", "dense", "--compare_dense")
    assert code == 0
    assert report["sparsity"] == 0.0
    assert report["ssim"] == pytest.approx(1.0) and report["psnr"] == 100.0  # same seed, same model: identical video


def test_bad_prompt_is_rejected_with_the_word(tmp_path, tiny_tinyworld, capsys):
    prompts = tmp_path / "bad.txt"
    prompts.write_text(f"{PROMPT}\na large purple circle moves left on a black background\n")
    with pytest.raises(PromptError, match="purple"):
        read_prompts(prompts)
    code = main(["--prompts", str(prompts), "--model", str(tiny_tinyworld), "--out", str(tmp_path / "r.json")])
    assert code == 2 and "purple" in capsys.readouterr().err and not (tmp_path / "r.json").exists()


def test_window_and_random_need_a_sparsity(tmp_path, tiny_tinyworld):
    code, _ = _run(tmp_path, tiny_tinyworld, "--attention", "window")
    assert code == 2


def test_mask_reuse_steps_is_recorded_and_refused_where_it_cannot_apply(tmp_path, tiny_tinyworld):
    code, report = _run(tmp_path, tiny_tinyworld, "--attention", "asa", "--mask_reuse_steps", "2")
    assert code == 0 and report["settings"]["mask_reuse_steps"] == 2 and 0.0 < report["sparsity"] < 1.0
    assert _run(tmp_path, tiny_tinyworld, "--attention", "asa", "--mask_reuse_steps", "0")[0] == 2
    assert _run(tmp_path, tiny_tinyworld, "--attention", "window", "--sparsity", "0.75",
                "--mask_reuse_steps", "2")[0] == 2  # a static window has no prober masks to reuse


def test_table3_script_shares_dense_references_without_changing_the_scores(tmp_path, tiny_tinyworld):
    """benchmarks/tinyworld_table3.py renders each dense reference once; its scores equal the evaluation command's."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "tinyworld_table3.py"
    spec = importlib.util.spec_from_file_location("tinyworld_table3", script)
    table3 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table3)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n")
    table3.main(["--prompts", str(prompts), "--seeds", "0", "--sparsity", "0.75", "--steps", "2", "--guidance", "1.0",
                 "--model", str(tiny_tinyworld), "--out_dir", str(tmp_path / "t3"), "--mask_reuse_steps", "2"])
    for mode, extra in (("window", ()), ("random", ()), ("asa+reuse2", ("--mask_reuse_steps", "2"))):
        shared = json.loads((tmp_path / "t3" / f"table3_{mode}_0.75.json").read_text())
        attention = mode.split("+")[0]
        code, alone = _run(tmp_path, tiny_tinyworld, "--attention", attention, "--sparsity", "0.75", "--compare_dense",
                           *extra)
        assert code == 0 and shared["settings"]["mask_reuse_steps"] == alone["settings"]["mask_reuse_steps"]
        assert shared["psnr"] == pytest.approx(alone["psnr"]) and shared["ssim"] == pytest.approx(alone["ssim"])


def test_report_keeps_what_each_check_measured(tmp_path, tiny_tinyworld):
    """Every video's entry carries its objects' measurements (one per prompt object), as JSON."""
    code, report = _run(tmp_path, tiny_tinyworld, "--attention", "dense")
    assert code == 0
    [obj] = report["videos"][0]["objects"]  # PROMPT has one object
    assert 0.0 <= obj["found_fraction"] <= 1.0


@pytest.mark.parametrize("shape, fill", [("circle", 3.14159 / 4), ("square", 1.0), ("triangle", 0.5)])
def test_object_measurements_of_a_rendered_shape_give_its_fill_ratio(shape, fill):
    """On the world's own rendering the recorded fill ratio is the shape's area over its box's (pi/4, 1, 1/2)."""
    from blade.tinyworld.evaluate import _jsonable_objects
    from blade.tinyworld.metrics import score_video
    from blade.tinyworld.world import parse_prompt, render_prompt

    prompt = f"a large red {shape} stays still on a black background"
    score = score_video(render_prompt(prompt, 0), parse_prompt(prompt))
    [obj] = json.loads(json.dumps(_jsonable_objects(score["objects"])))
    assert obj["shape"] == shape and obj["fill_ratio"] == pytest.approx(fill, abs=0.08)


def test_guidance_interval_guides_each_step_at_its_scale(tmp_path, tiny_tinyworld, monkeypatch):
    """--guidance 1 --guidance_2 3.5 --guidance_boundary B: the scheduler receives the conditional prediction alone
    at timesteps >= B and uncond + 3.5 (cond - uncond) below. Read back per step from the transformer's own two
    outputs and the model output the scheduler steps with (a least-squares fit of the scale), not from the code's
    own bookkeeping; refused with a LoRA or half given."""
    from blade.tinyworld import evaluate as ev

    pipe = tw.load_pipeline(str(tiny_tinyworld))
    pipe.scheduler.set_timesteps(4)
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    boundary = (timesteps[1] + timesteps[2]) / 2  # two steps above, two below
    outputs, stepped = [], []
    pipe.transformer.register_forward_hook(lambda module, args, out: outputs.append(out[0].detach().clone()))
    real_step = type(pipe.scheduler).step

    def step(self, model_output, timestep, sample, *args, **kwargs):
        stepped.append((float(timestep), model_output.detach().clone()))
        return real_step(self, model_output, timestep, sample, *args, **kwargs)

    monkeypatch.setattr(type(pipe.scheduler), "step", step)
    monkeypatch.setattr(ev, "load_pipeline", lambda model: pipe)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    report = ev.evaluate(read_prompts(str(prompts)), [0], steps=4, guidance=1.0, model=str(tiny_tinyworld),
                         guidance_2=3.5, guidance_boundary=boundary)
    assert report["settings"]["guidance_2"] == 3.5 and report["settings"]["guidance_boundary"] == boundary
    assert len(stepped) == 4 and len(outputs) == 8  # cond and uncond at every step
    for i, (t, model_output) in enumerate(stepped):
        cond, uncond = outputs[2 * i], outputs[2 * i + 1]
        direction = (cond - uncond).double().flatten()
        scale = float(direction @ (model_output - uncond).double().flatten() / (direction @ direction))
        assert scale == pytest.approx(1.0 if t >= boundary else 3.5, abs=1e-3), (i, t)

    with pytest.raises(ValueError, match="for the teacher"):
        ev.evaluate(read_prompts(str(prompts)), [0], lora="x", guidance_2=3.5, guidance_boundary=boundary)
    with pytest.raises(ValueError, match="needs both"):
        ev.evaluate(read_prompts(str(prompts)), [0], guidance_2=3.5)


def test_guidance_interval_with_asa_patches_and_times_the_one_transformer_once(tmp_path, tiny_tinyworld):
    """The interval registers the transformer as WanPipeline's second stage too; it is still one denoiser: ASA is
    applied once (a second application would be refused) and every call is counted once (2 steps x cond/uncond)."""
    from blade import api
    from blade.families import pipeline_experts
    from blade.tinyworld.evaluate import configure_attention, set_guidance_interval

    pipe = tw.load_pipeline(str(tiny_tinyworld))
    set_guidance_interval(pipe, 500.0)
    assert pipe.transformer_2 is pipe.transformer
    assert [name for name, _ in pipeline_experts(pipe)] == ["transformer"]
    configure_attention(pipe, "asa", sparsity=0.75, dense_steps=0, lora_config=None)
    _, info = api.generate(pipe, PROMPT, seed=0, steps=2, guidance_scale=3.0, guidance_scale_2=2.0, num_frames=17,
                           height=128, width=128, max_sequence_length=32)
    assert info["transformer_calls"] == 4 and info["sparsity"] == pytest.approx(0.75)

    code, report = _run(tmp_path, tiny_tinyworld, "--attention", "asa", "--sparsity", "0.75", "--guidance_2", "2.0",
                        "--guidance_boundary", "500")
    assert code == 0 and report["sparsity"] == pytest.approx(0.75)
    assert report["settings"]["guidance_2"] == 2.0 and report["settings"]["guidance_boundary"] == 500.0


def test_pool_size_override_sets_the_global_window_and_is_refused_without_asa(tmp_path, tiny_tinyworld):
    """``--pool_size`` replaces the ASA config's global-token window (nothing else of it), and changes what ASA
    computes (its pooled fraction enters the reported sparsity, 1/pool of the keys); with dense attention it is
    refused before any loading (a missing model folder is not reached)."""
    from blade.models.wan import default_asa_config
    from blade.tinyworld.evaluate import configure_attention

    pipe = tw.load_pipeline(str(tiny_tinyworld))
    handle = configure_attention(pipe, "asa", sparsity=None, dense_steps=0, lora_config=None, pool_size=3)
    expected = default_asa_config()
    assert handle.config.pool_size == 3
    assert (handle.config.threshold, handle.config.max_keep) == (expected.threshold, expected.max_keep)
    with pytest.raises(ValueError, match="pool_size"):
        configure_attention(pipe, "dense", sparsity=None, dense_steps=0, lora_config=None, pool_size=3)
    pinned = configure_attention(pipe, "asa", sparsity=0.75, dense_steps=0, lora_config=None, pool_size=3)
    assert (pinned.config.pool_size, pinned.config.max_keep) == (3, 0.25)  # the pinned keep count drops no pool asked

    reports = {}
    for pool in ("4", "64"):
        code, reports[pool] = _run(tmp_path, tiny_tinyworld, "--attention", "asa", "--pool_size", pool)
        assert code == 0 and reports[pool]["settings"]["pool_size_override"] == int(pool)
    # same seed, same keep rule: only the global tokens differ, so the frames (hence scores) differ
    assert reports["4"]["videos"][0]["fidelity"] != reports["64"]["videos"][0]["fidelity"]

    (tmp_path / "report.json").unlink()
    code, report = _run(tmp_path, tmp_path / "no_such_model", "--attention", "dense", "--pool_size", "4")
    assert code == 2 and report is None


def test_max_keep_override_clamps_the_prober_and_the_paper_sparsity_subtracts_the_pool(tmp_path, tiny_tinyworld):
    """``--max_keep`` replaces the prober's upper clamp (min_keep lowered to it), is refused with dense attention or a
    pinned ``--sparsity`` (which sets both clamps); the report's ``sparsity_paper`` is the paper's
    ``1 - density - 1/n``, i.e. the block sparsity less the pooled keys' share 1/n, per video."""
    from blade.tinyworld.evaluate import configure_attention

    pipe = tw.load_pipeline(str(tiny_tinyworld))
    handle = configure_attention(pipe, "asa", sparsity=None, dense_steps=0, lora_config=None, max_keep=0.01)
    assert (handle.config.max_keep, handle.config.min_keep) == (0.01, 0.01)
    for mode, sparsity in (("dense", None), ("asa", 0.75)):
        with pytest.raises(ValueError, match="max_keep"):
            configure_attention(pipe, mode, sparsity=sparsity, dense_steps=0, lora_config=None, max_keep=0.5)

    # a clamp below one block keeps exactly one block a row: block sparsity 1 - 1/Nk, Nk an integer
    code, report = _run(tmp_path, tiny_tinyworld, "--attention", "asa", "--max_keep", "0.01", "--pool_size", "4")
    assert code == 0 and report["settings"]["max_keep_override"] == 0.01
    video = report["videos"][0]
    n_k = 1.0 / (1.0 - video["sparsity"])
    assert n_k >= 2 and n_k == pytest.approx(round(n_k), abs=1e-9)
    assert video["sparsity_paper"] == pytest.approx(max(0.0, video["sparsity"] - 1.0 / 4))
    assert report["sparsity_paper"] == pytest.approx(video["sparsity_paper"])

    (tmp_path / "report.json").unlink()
    code, report = _run(tmp_path, tmp_path / "no_such_model", "--attention", "dense", "--max_keep", "0.2")
    assert code == 2 and report is None


def test_samples_per_block_override_reaches_the_prober_and_the_report(tmp_path, tiny_tinyworld):
    """``--samples_per_block`` replaces the prober's sampled tokens per block in the config the handle runs with, is
    recorded in the report, and is refused with dense attention or a bad value before anything loads."""
    from blade.tinyworld.evaluate import configure_attention

    pipe = tw.load_pipeline(str(tiny_tinyworld))
    handle = configure_attention(pipe, "asa", sparsity=None, dense_steps=0, lora_config=None, samples_per_block=4)
    assert handle.config.samples_per_block == 4
    with pytest.raises(ValueError, match="samples_per_block"):
        configure_attention(pipe, "dense", sparsity=None, dense_steps=0, lora_config=None, samples_per_block=4)

    code, report = _run(tmp_path, tiny_tinyworld, "--attention", "asa", "--samples_per_block", "4")
    assert code == 0 and report["settings"]["samples_per_block_override"] == 4
    (tmp_path / "report.json").unlink()
    for args in (("--attention", "dense", "--samples_per_block", "4"),
                 ("--attention", "asa", "--samples_per_block", "0")):
        code, report = _run(tmp_path, tmp_path / "no_such_model", *args)  # refused before the (missing) model loads
        assert code == 2 and report is None
