"""TinyWorld model: builders of the miniature Wan2.1-family pipeline (diffusers `WanPipeline` layout).

The miniature keeps every component type of Wan2.1-T2V so that the same code paths (pipeline, ASA patching, LoRA,
TDM distillation) run on it unchanged:

- tokenizer: a word-level tokenizer over the world's grammar, built offline with the `tokenizers` library and
  wrapped in `PreTrainedTokenizerFast` (appends `</s>` like T5; pad id 0);
- text encoder: a small `UMT5EncoderModel` (d_model 128, 2 layers), trained jointly with the teacher;
- VAE: `AutoencoderKLWan` with 4x spatial and 4x temporal compression (17 x 128 x 128 RGB -> 16 x 5 x 32 x 32);
- transformer: `WanTransformer3DModel` with patch size (1, 1, 1), so a latent of 5 x 32 x 32 is 5,120 video tokens
  (40 blocks of 128 tokens: enough for block sparsity to matter);
- scheduler: `UniPCMultistepScheduler` with flow sigmas and shift 3.0, as Wan2.1 ships it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from diffusers.utils import logging as diffusers_logging
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

TINYWORLD_DEFAULTS: dict[str, Any] = {
    "height": 128,
    "width": 128,
    "num_frames": 17,
    "fps": 8,
    "max_sequence_length": 32,  # prompts are <= 20 words; Wan's 512 would only add zero-padded text tokens
    "num_inference_steps": 50,  # teacher
    "guidance_scale": 5.0,  # teacher (Wan2.1's default)
    "student_steps": 8,
    "student_guidance_scale": 1.0,
}

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 (T5 convention: pad 0, eos 1, unk 2)
GLUE_WORDS = ("a", "and", "on", "background")  # grammar words that carry no attribute
TEXT_VOCAB_SIZE = 64  # fixed so the text encoder's shape does not depend on the exact grammar

VAE_CONFIG: dict[str, Any] = {
    "base_dim": 32,
    "z_dim": 16,
    "dim_mult": [1, 2, 2],  # two downsamples: 4x spatial; 64 channels at the bottom keep the bundle small
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [True, True],  # 4x temporal: 17 frames -> 5 latent frames
    "dropout": 0.0,
    "latents_mean": [0.0] * 16,  # replaced by statistics of encoded training data after VAE training
    "latents_std": [1.0] * 16,
    "scale_factor_spatial": 4,  # WanPipeline sizes latents from these two, not from dim_mult
    "scale_factor_temporal": 4,
}

TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": TEXT_VOCAB_SIZE,
    "d_model": 128,
    "d_kv": 32,
    "d_ff": 256,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 64,
    "dropout_rate": 0.0,
    "feed_forward_proj": "gated-gelu",
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}

TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": (1, 1, 1),
    "num_attention_heads": 4,
    "attention_head_dim": 64,
    "in_channels": VAE_CONFIG["z_dim"],
    "out_channels": VAE_CONFIG["z_dim"],
    "text_dim": TEXT_ENCODER_CONFIG["d_model"],
    "freq_dim": 256,
    "ffn_dim": 1024,
    "num_layers": 4,  # 4 x 256-wide layers: a 50-step CFG teacher video stays under 3 min on 2 CPU cores
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 64,
}


def _video_tokens() -> int:
    """Video tokens of one transformer forward at the default size: latent frames x latent side / patch, squared."""
    frames = (TINYWORLD_DEFAULTS["num_frames"] - 1) // VAE_CONFIG["scale_factor_temporal"] + 1
    patch_t, patch_h, patch_w = TRANSFORMER_CONFIG["patch_size"]
    spatial = VAE_CONFIG["scale_factor_spatial"]
    return (frames // patch_t) * (TINYWORLD_DEFAULTS["height"] // spatial // patch_h) * (
        TINYWORLD_DEFAULTS["width"] // spatial // patch_w)


VIDEO_TOKENS = _video_tokens()  # 5 x 32 x 32 = 5,120: 40 blocks of 128

SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "solver_order": 2,
}


def _grammar_words() -> list[str]:
    from blade.tinyworld.world import all_words

    return list(all_words())


def build_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the grammar's vocabulary (lower-cased, whitespace split, `</s>` appended).

    Args:
        words: the vocabulary; defaults to `blade.tinyworld.world.all_words()` plus the glue words.
    """
    words = _grammar_words() if words is None else list(words)
    vocab_words = sorted(set(w.lower() for w in words) | set(GLUE_WORDS))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in vocab_words:
        vocab.setdefault(word, len(vocab))
    if len(vocab) > TEXT_VOCAB_SIZE:
        raise ValueError(f"grammar has {len(vocab)} tokens, more than the text encoder's {TEXT_VOCAB_SIZE}")

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
        padding_side="right",
    )


def build_text_encoder(seed: int = 0) -> UMT5EncoderModel:
    """Small UMT5 encoder (d_model 128, 2 layers, 4 heads), randomly initialized with `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UMT5EncoderModel(UMT5Config(**TEXT_ENCODER_CONFIG)).eval()


def build_vae(seed: int = 0, **overrides: Any) -> AutoencoderKLWan:
    """`AutoencoderKLWan` with 4x spatial / 4x temporal compression and z_dim 16, randomly initialized."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLWan(**{**VAE_CONFIG, **overrides}).eval()


def build_transformer(seed: int = 0, **overrides: Any) -> WanTransformer3DModel:
    """`WanTransformer3DModel` of ~4.7M parameters (4 layers, 4 heads x 64, patch 1x1x1), randomly initialized."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**{**TRANSFORMER_CONFIG, **overrides}).eval()


def build_scheduler() -> UniPCMultistepScheduler:
    """Wan2.1's sampler: UniPC on flow sigmas with shift 3.0."""
    return UniPCMultistepScheduler(**SCHEDULER_CONFIG)


def build_pipeline(
    tokenizer: PreTrainedTokenizerFast | None = None,
    text_encoder: UMT5EncoderModel | None = None,
    vae: AutoencoderKLWan | None = None,
    transformer: WanTransformer3DModel | None = None,
    scheduler: UniPCMultistepScheduler | None = None,
) -> WanPipeline:
    """Assemble a `WanPipeline`; every missing component is built fresh (random weights)."""
    return WanPipeline(
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        text_encoder=text_encoder if text_encoder is not None else build_text_encoder(),
        vae=vae if vae is not None else build_vae(),
        transformer=transformer if transformer is not None else build_transformer(),
        scheduler=scheduler if scheduler is not None else build_scheduler(),
    )


def encode_prompt_tokens(
    tokenizer: PreTrainedTokenizerFast, prompts: list[str], max_sequence_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize as `WanPipeline._get_t5_prompt_embeds` does. Returns `input_ids, attention_mask`, both [B, S]."""
    max_len = max_sequence_length or TINYWORLD_DEFAULTS["max_sequence_length"]
    out = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_len,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return out.input_ids, out.attention_mask


def text_embeddings(text_encoder: UMT5EncoderModel, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Prompt embeddings exactly as `WanPipeline` builds them: encoder states with padded positions zeroed.

    Args:
        input_ids, mask: [B, S] token ids and attention mask.

    Returns:
        [B, S, d_model]; rows past each prompt's length are 0 (the pipeline pads with zeros, not encoder states).
    """
    hidden = text_encoder(input_ids, mask).last_hidden_state
    return hidden * mask.unsqueeze(-1).to(hidden.dtype)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def save_pipeline(pipe: WanPipeline, path: str | Path, dtype: torch.dtype = torch.bfloat16) -> int:
    """Save `pipe` with weights cast to `dtype` (bf16 keeps the bundle small) and its `blade_defaults.json`
    (TinyWorld's video size, text length and grammar flag). Returns the weights' size in bytes.

    The pipeline's modules are left untouched (a cast copy is saved).
    """
    path = Path(path)
    cast = {name: copy.deepcopy(getattr(pipe, name)).to(dtype) for name in ("text_encoder", "vae", "transformer")}
    out = WanPipeline(tokenizer=pipe.tokenizer, scheduler=pipe.scheduler, **cast)
    with _quiet():
        out.save_pretrained(path, safe_serialization=True)
    # the folder's own video size and grammar flag, read by the inference scripts and the trainer
    from blade.pipelines.hints import MODEL_HINTS_FILE, tinyworld_hints

    (path / MODEL_HINTS_FILE).write_text(json.dumps(tinyworld_hints(), indent=2) + "\n")
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def bundled_pipeline_path() -> Path:
    """Path of the bundled trained pipeline, `assets/tinyworld/pipeline` at the repository root."""
    return Path(__file__).resolve().parents[2] / "assets" / "tinyworld" / "pipeline"


def load_pipeline(path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> WanPipeline:
    """Load a TinyWorld pipeline folder (default: the bundled one) offline, with a clear error if it is missing."""
    from blade.pipelines.loading import check_model_folder

    path = Path(path) if path is not None else bundled_pipeline_path()
    check_model_folder("wan", path, hint=(  # ModelFolderError (a FileNotFoundError) naming what is missing
        "No TinyWorld pipeline there: train one with `python -m blade.tinyworld.train all --out runs/tw` and copy "
        "runs/tw/pipeline there, or pass the folder explicitly."
    ))
    with _quiet():
        return WanPipeline.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)


@contextlib.contextmanager
def _quiet():
    """Silence diffusers' bf16-cast notices and the `torch_dtype` rename warning (newer diffusers say `dtype`)."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch_dtype.*")
            yield
    finally:
        diffusers_logging.set_verbosity(level)
        diffusers_logging.enable_progress_bar()
