"""Offline builders of tiny random Wan2.1 / Wan2.2 (two-expert A14B and TI2V layouts) / CogVideoX pipelines (tests,
examples, CPU smoke runs).

Every component is a real diffusers / transformers class with a miniature config, built from a fixed seed and
without any network access: the tokenizer is a word-level ``tokenizers`` model wrapped in
``PreTrainedTokenizerFast``, the text encoders are randomly initialised UMT5 / T5 encoders. The pipelines save and
reload with ``save_pretrained`` / ``from_pretrained`` like real checkpoints, and the schedulers are the ones the real
pipelines ship with (Wan: UniPC flow prediction with shift 3; CogVideoX-5B: DDIM v-prediction, zero-SNR, trailing).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

TEXT_DIM = 32  # d_model of the tiny text encoders == text_dim / text_embed_dim of the tiny transformers

# A small closed vocabulary; anything else maps to <unk>.
_WORDS = (
    "a an the of in on at to and with is are over under near from into left right up down red green blue "
    "yellow white black orange purple small big large tiny ball cube square circle triangle box car cat dog bird "
    "fish man woman person tree house sky water river mountain road moves moving slowly quickly jumps runs walks "
    "flies rolls spins still stays across background foreground video photo scene bright dark light day night "
    "low quality blurry static worst"
).split()

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG for the duration of the block without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_word_tokenizer(max_length: int = 512) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: ids 0/1/2 = <pad>/</s>/<unk> (T5 conventions), lowercase, whitespace split, "$A </s>"."""
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for word in _WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, model_max_length=max_length
    )


def _encoder_config_kwargs(vocab_size: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
    )


def tiny_wan_transformer(seed: int = 0, **config_overrides: Any) -> WanTransformer3DModel:
    """Tiny ``WanTransformer3DModel`` (2 heads x 16, 2 layers, Wan2.1 layout: patch (1,2,2), QK RMS norm, RoPE)."""
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        text_dim=TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    config.update(config_overrides)
    with _seeded(seed):
        return WanTransformer3DModel(**config).eval()


def tiny_cogvideox_transformer(seed: int = 0, **config_overrides: Any) -> CogVideoXTransformer3DModel:
    """Tiny ``CogVideoXTransformer3DModel`` in the 5B layout (rotary embeddings: head_dim must be a multiple of 16)."""
    config = dict(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=TEXT_DIM,
        num_layers=2,
        sample_width=8,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
        use_rotary_positional_embeddings=True,
    )
    config.update(config_overrides)
    with _seeded(seed):
        return CogVideoXTransformer3DModel(**config).eval()


def tiny_wan_scheduler(**overrides: Any) -> UniPCMultistepScheduler:
    """The scheduler Wan2.1-T2V ships: UniPC, flow prediction, flow sigmas, shift 3.0 (480p)."""
    config = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000)
    config.update(overrides)
    return UniPCMultistepScheduler(**config)


def tiny_cogvideox_scheduler(**overrides: Any) -> CogVideoXDDIMScheduler:
    """The scheduler CogVideoX-5B ships: DDIM, v-prediction, zero-terminal-SNR rescale, trailing spacing."""
    config = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        snr_shift_scale=1.0,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
    )
    config.update(overrides)
    return CogVideoXDDIMScheduler(**config)


def _split_overrides(overrides: dict[str, Any], components: tuple[str, ...]) -> tuple[dict, dict]:
    given = {name: overrides.pop(name) for name in components if name in overrides}
    return given, overrides


def _given_or_seeded(given: dict[str, Any], name: str, seed: int, build: Callable[[], Any]) -> Any:
    """The caller's component ``name`` if given, else ``build()`` under a fixed seed (deterministic pipelines)."""
    if name in given:
        return given[name]
    with _seeded(seed):
        return build()


def build_tiny_wan_pipeline(seed: int = 0, **overrides: Any) -> WanPipeline:
    """Tiny random ``WanPipeline``, fully offline and deterministic for ``seed``.

    Keyword arguments named like a pipeline component (``transformer``, ``vae``, ``text_encoder``, ``tokenizer``,
    ``scheduler``) replace that component; any other keyword overrides the tiny transformer's config.
    Spatial compression 8, temporal 4: a 16x16, 9-frame video has a 3x2x2 latent and 3x1x1 tokens.
    """
    given, transformer_overrides = _split_overrides(
        dict(overrides), ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    )
    tokenizer = given.get("tokenizer") or build_word_tokenizer(max_length=512)
    text_encoder = _given_or_seeded(
        given, "text_encoder", seed + 1,
        lambda: UMT5EncoderModel(UMT5Config(**_encoder_config_kwargs(len(tokenizer)))).eval(),
    )
    vae = _given_or_seeded(
        given, "vae", seed + 2,
        lambda: AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        ).eval(),
    )
    transformer = given.get("transformer") or tiny_wan_transformer(seed=seed, **transformer_overrides)
    scheduler = given.get("scheduler") or tiny_wan_scheduler()
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )


def build_tiny_cogvideox_pipeline(seed: int = 0, **overrides: Any) -> CogVideoXPipeline:
    """Tiny random ``CogVideoXPipeline`` (5B layout: RoPE, v-prediction DDIM), fully offline and deterministic.

    Keyword arguments named like a pipeline component replace it; any other keyword overrides the tiny transformer's
    config. Spatial compression 8, temporal 4, patch 2: a 32x32, 9-frame video has 3 latent frames of 2x2 tokens.
    """
    given, transformer_overrides = _split_overrides(
        dict(overrides), ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    )
    tokenizer = given.get("tokenizer") or build_word_tokenizer(max_length=226)
    text_encoder = _given_or_seeded(
        given, "text_encoder", seed + 1,
        lambda: T5EncoderModel(T5Config(**_encoder_config_kwargs(len(tokenizer)))).eval(),
    )
    vae = _given_or_seeded(
        given, "vae", seed + 2,
        lambda: AutoencoderKLCogVideoX(
            block_out_channels=(8, 8, 8, 8),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=2,
            temporal_compression_ratio=4,
            scaling_factor=0.7,
        ).eval(),
    )
    transformer = given.get("transformer") or tiny_cogvideox_transformer(seed=seed, **transformer_overrides)
    scheduler = given.get("scheduler") or tiny_cogvideox_scheduler()
    return CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def tiny_wan22_vae(seed: int = 0) -> AutoencoderKLWan:
    """Tiny Wan2.2-layout ``AutoencoderKLWan``: 48 latent channels, 16x16 spatial (patchify 2 x three 2x
    downsamples, residual up/down blocks), 4x temporal; latent statistics 0 / 1 (48 values each)."""
    with _seeded(seed):
        return AutoencoderKLWan(
            base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
            out_channels=12, scale_factor_spatial=16, scale_factor_temporal=4,
            latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
        ).eval()  # fmt: skip


def build_tiny_pipeline(family: str, seed: int = 0, **overrides: Any):
    """The tiny random pipeline of a family (``build_tiny_wan_pipeline`` / ``build_tiny_cogvideox_pipeline``)."""
    builders = {"wan": build_tiny_wan_pipeline, "cogvideox": build_tiny_cogvideox_pipeline}
    if family not in builders:
        raise ValueError(f"no tiny builder for family {family!r}; known: {sorted(builders)}")
    return builders[family](seed=seed, **overrides)


def build_tiny_wan22_a14b_pipeline(seed: int = 0, boundary_ratio: float = 0.875, **overrides: Any) -> WanPipeline:
    """Tiny random two-expert ``WanPipeline`` in the Wan2.2-T2V-A14B layout: ``transformer`` (high noise, t >=
    ``boundary_ratio`` x 1000) and ``transformer_2`` (low noise), each a tiny Wan transformer with its own weights
    (seeds ``seed`` and ``seed + 10``), the Wan2.1-layout tiny VAE. Keywords as ``build_tiny_wan_pipeline`` (plus
    ``transformer_2``)."""
    given, transformer_overrides = _split_overrides(dict(overrides), ("transformer_2",))
    transformer_2 = given.get("transformer_2") or tiny_wan_transformer(seed=seed + 10, **{
        k: v for k, v in transformer_overrides.items()
        if k not in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    })
    base = build_tiny_wan_pipeline(seed=seed, **transformer_overrides)
    return WanPipeline(
        tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, scheduler=base.scheduler,
        transformer=base.transformer, transformer_2=transformer_2, boundary_ratio=boundary_ratio,
    )  # fmt: skip


def build_tiny_wan22_ti2v_pipeline(seed: int = 0, **overrides: Any) -> WanPipeline:
    """Tiny random ``WanPipeline`` in the Wan2.2-TI2V-5B layout: Wan2.2-layout VAE (48 latent channels, 16x16
    spatial), a transformer with 48 input/output channels, ``expand_timesteps=True``. A 128x128, 9-frame video has
    a 3x8x8 latent and 3x4x4 = 48 tokens. Keywords as ``build_tiny_wan_pipeline``."""
    overrides = dict(overrides)
    if "vae" not in overrides:
        overrides["vae"] = tiny_wan22_vae(seed=seed + 2)
    if "transformer" not in overrides:
        extra = {k: overrides.pop(k) for k in list(overrides)
                 if k not in ("vae", "text_encoder", "tokenizer", "scheduler")}
        overrides["transformer"] = tiny_wan_transformer(seed=seed, **{"in_channels": 48, "out_channels": 48, **extra})
    base = build_tiny_wan_pipeline(seed=seed, **overrides)
    return WanPipeline(
        tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, scheduler=base.scheduler,
        transformer=base.transformer, expand_timesteps=True,
    )  # fmt: skip


def save_with_prompt_cache(pipe: Any, root: Any, prompts: list[str], max_length: int = 8) -> Any:
    """Save a tiny Wan-architecture `pipe` to ``root/pipe`` and encode `prompts` with it into ``root/prompts`` (the
    trainer's prompt cache, one validation prompt), through the same CLI as ``utils/process_prompts_wanx.py``;
    returns `root` (a ``pathlib.Path``)."""
    from blade.prompt_cli import WAN
    from blade.prompt_cli import main as encode_main

    pipe.save_pretrained(root / "pipe")
    (root / "p.txt").write_text("\n".join(prompts) + "\n")
    code = encode_main(WAN, ["--input_file", str(root / "p.txt"), "--output_dir", str(root / "prompts"),
                             "--model_path", str(root / "pipe"), "--max_length", str(max_length),
                             "--num_validation", "1"])
    if code != 0:
        raise RuntimeError(f"encoding the prompts of {root} failed with exit code {code}")
    return root
