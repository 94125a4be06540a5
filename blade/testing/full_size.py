"""Full-size pipelines with random weights, for speed measurements: Wan2.1-T2V-1.3B ("wan") and CogVideoX-5B
("cogvideox"), and by model name Wan2.1-T2V-14B ("wan2.1-t2v-14b"), Wan2.2-T2V-A14B ("wan2.2-t2v-a14b": two experts,
`transformer` + `transformer_2`, boundary_ratio 0.875) and Wan2.2-TI2V-5B ("wan2.2-ti2v-5b": Wan2.2 VAE, 48 latent
channels, `expand_timesteps`). Where the values of the new configs come from: blade/configs/NOTES.md.

Speed depends on tensor shapes, not on weight values, so the published component configurations (kept as one
diffusers / transformers `config.json` per component under `blade/configs/<model>/`) are enough to time the real
architectures without downloading anything. Weights are allocated directly on the target device in the target
dtype (parameters are first created on the meta device, so there is no slow CPU initialisation of ~7-11B
parameters) and filled with small random normal values: never zeros, so kernels see ordinary data.

The tokenizer is an offline word-level tokenizer with the real one's special-token ids and maximum length (512 for
umT5, 226 for T5); prompts are padded to that length exactly as the real pipelines do. Its vocabulary is tiny and
irrelevant to speed; the text encoder keeps the published vocabulary size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DiffusionPipeline,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

from blade.families import FAMILIES, MODELS, get_family

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"

# family -> folder name under blade/configs (named after the published checkpoints)
FAMILY_DIRS = {"wan": "wan2.1-t2v-1.3b", "cogvideox": "cogvideox-5b"}
# every packaged model, by its registry name (blade.families.MODELS) == its folder under blade/configs
MODEL_DIRS = {name: name for name in MODELS if (CONFIG_ROOT / name).is_dir()}
COMPONENTS = ("transformer", "vae", "text_encoder", "scheduler")

_DIFFUSERS_CLASSES = {
    ("wan", "transformer"): WanTransformer3DModel,
    ("wan", "vae"): AutoencoderKLWan,
    ("wan", "scheduler"): UniPCMultistepScheduler,
    ("cogvideox", "transformer"): CogVideoXTransformer3DModel,
    ("cogvideox", "vae"): AutoencoderKLCogVideoX,
    ("cogvideox", "scheduler"): CogVideoXDDIMScheduler,
}
_TEXT_ENCODERS = {"wan": (UMT5Config, UMT5EncoderModel), "cogvideox": (T5Config, T5EncoderModel)}
PIPELINE_CLASSES = {"wan": WanPipeline, "cogvideox": CogVideoXPipeline}

# Maximum prompt length of the published tokenizers (Wan: umT5, 512; CogVideoX: T5, 226), from the registry.
MAX_SEQUENCE_LENGTH = {name: family.text_max_length for name, family in FAMILIES.items()}


def default_vae_dtype(family: str, dtype: torch.dtype) -> torch.dtype:
    """The documented VAE dtype: Wan's model card loads its VAE in float32; CogVideoX runs the VAE in the
    pipeline's dtype (its decode does not cast the latents, so the two must match)."""
    return torch.float32 if get_family(family_of(family)).vae_float32 else dtype


# Standard deviation of the random weights: small enough that 24-42 random layers stay finite in bf16.
INIT_STD = 0.02


def _check_family(family: str) -> None:
    if family not in FAMILY_DIRS and family not in MODEL_DIRS:
        raise ValueError(
            f"Unknown family {family!r}; expected one of {sorted(FAMILY_DIRS)} or a model of {sorted(MODEL_DIRS)}."
        )


def family_of(name: str) -> str:
    """The family ("wan" | "cogvideox") of a family or model name."""
    _check_family(name)
    return name if name in FAMILY_DIRS else MODELS[name].family


def _folder(name: str) -> str:
    return FAMILY_DIRS.get(name) or MODEL_DIRS[name]


def experts(name: str) -> tuple[str, ...]:
    """The denoiser components of a family's or model's pipeline (`("transformer", "transformer_2")` for A14B)."""
    _check_family(name)
    return MODELS[_folder(name)].experts


def components(name: str) -> tuple[str, ...]:
    """Every packaged component of a family's or model's pipeline."""
    return (*experts(name), *COMPONENTS[1:])


def config_path(family: str, component: str) -> Path:
    """Path of the packaged `config.json` of one component of a family's (or model's) pipeline."""
    _check_family(family)
    if component not in components(family):
        raise ValueError(f"Unknown component {component!r}; expected one of {components(family)}.")
    return CONFIG_ROOT / _folder(family) / component / "config.json"


def pipeline_config(family: str) -> dict[str, Any]:
    """The pipeline's own config keys (`boundary_ratio`, `expand_timesteps`) from the model's model_index.json
    (empty for the folders without one: Wan2.1-1.3B, CogVideoX-5B)."""
    _check_family(family)
    path = CONFIG_ROOT / _folder(family) / "model_index.json"
    if not path.is_file():
        return {}
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def load_config(family: str, component: str) -> dict[str, Any]:
    """The published configuration of `component` of `family` ("wan" | "cogvideox") as a plain dict."""
    with open(config_path(family, component), encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------------------
# Random weights, allocated on the device
# ----------------------------------------------------------------------------------------------------------------


def _is_kept_in_fp32(param_name: str, keep_in_fp32: list[str]) -> bool:
    # Same rule as diffusers' `from_pretrained(torch_dtype=...)`: a name component matches a kept module.
    parts = param_name.split(".")
    return any(m in parts for m in keep_in_fp32)


@torch.no_grad()
def materialize_random_(
    model: torch.nn.Module,
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    keep_in_fp32: list[str] | None = None,
    std: float = INIT_STD,
    seed: int = 0,
) -> torch.nn.Module:
    """Give every (meta) parameter of `model` real storage on `device`, filled with N(0, std^2) values.

    Floating parameters take `dtype`, except those under a module named in `keep_in_fp32` (kept float32, as
    diffusers does when loading with `torch_dtype`). Tied parameters stay tied. Buffers, which `init_empty_weights`
    leaves real, are moved to `device` with their own dtype (e.g. Wan's float32/64 RoPE tables stay exact).
    """
    device = torch.device(device)
    keep_in_fp32 = keep_in_fp32 or []
    generator = torch.Generator(device=device).manual_seed(seed)
    replaced: dict[int, torch.nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in replaced:
                full_name = f"{module_name}.{name}" if module_name else name
                target = dtype
                if param.is_floating_point() and _is_kept_in_fp32(full_name, keep_in_fp32):
                    target = torch.float32
                elif not param.is_floating_point():
                    target = param.dtype
                data = torch.empty(param.shape, device=device, dtype=target)
                if data.is_floating_point():
                    data.normal_(0.0, std, generator=generator)
                else:
                    data.zero_()
                replaced[id(param)] = torch.nn.Parameter(data, requires_grad=False)
            module._parameters[name] = replaced[id(param)]
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = buf.to(device)
    return model.eval().requires_grad_(False)


def _diffusers_model(family: str, component: str, device, dtype, overrides: dict | None = None, seed: int = 0):
    kind = "transformer" if component in experts(family) else component
    cls = _DIFFUSERS_CLASSES[(family_of(family), kind)]
    config = {**load_config(family, component), **(overrides or {})}
    with init_empty_weights():  # parameters on meta, buffers real
        model = cls.from_config(config)
    keep = list(getattr(cls, "_keep_in_fp32_modules", None) or []) if dtype != torch.float32 else []
    return materialize_random_(model, device, dtype, keep_in_fp32=keep, seed=seed)


def build_transformer(
    family: str,
    device,
    dtype: torch.dtype = torch.bfloat16,
    *,
    num_layers: int | None = None,
    component: str = "transformer",
):
    """The family's (or model's) denoising transformer with random weights (`num_layers` overrides the depth, for
    CPU tests; `component="transformer_2"` gives Wan2.2-A14B's low-noise expert, other random values)."""
    overrides = {"num_layers": num_layers} if num_layers is not None else None
    seed = 1 + 3 * experts(family).index(component) if component in experts(family) else 1
    return _diffusers_model(family, component, device, dtype, overrides, seed=seed)


def build_vae(family: str, device, dtype: torch.dtype):
    """The family's video VAE with random weights, in `dtype`."""
    return _diffusers_model(family, "vae", device, dtype, seed=2)


def build_text_encoder(family: str, device, dtype: torch.dtype = torch.bfloat16, *, overrides: dict | None = None):
    """umT5-XXL (Wan) or T5-v1.1-XXL (CogVideoX) encoder with random weights; `overrides` shrink it for tests."""
    config_cls, model_cls = _TEXT_ENCODERS[family_of(family)]
    config = config_cls.from_dict({**load_config(family, "text_encoder"), **(overrides or {})})
    with init_empty_weights():
        model = model_cls(config)
    model.tie_weights()  # init_empty_weights gives tied modules separate meta parameters; tie them again
    # transformers keeps `_keep_in_fp32_modules` in float32 only for float16 loads; bf16 loads are all bf16.
    keep = list(getattr(model_cls, "_keep_in_fp32_modules", None) or []) if dtype == torch.float16 else []
    return materialize_random_(model, device, dtype, keep_in_fp32=keep, seed=3)


def build_scheduler(family: str):
    """The family's stock scheduler from its published config (Wan: UniPC flow; CogVideoX: DDIM v-prediction)."""
    return _DIFFUSERS_CLASSES[(family_of(family), "scheduler")].from_config(load_config(family, "scheduler"))


def build_tokenizer(family: str, vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """An offline word-level tokenizer standing in for the family's SentencePiece tokenizer.

    Same special-token ids as T5 / umT5 (pad 0, eos 1, unk 2), an `</s>` appended to every prompt and
    `model_max_length` equal to the real one, so `padding="max_length"` gives the real sequence length. Words are
    hashed onto `vocab_size` ids (default 1000) so different prompts give different ids.
    """
    family = family_of(family)
    vocab_size = vocab_size or 1000
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=MAX_SEQUENCE_LENGTH[family],
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="right",
    )


def build_full_size_pipeline(
    family: str,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    *,
    vae_dtype: torch.dtype | None = None,
    num_layers: int | None = None,
    text_encoder: bool = True,
    text_encoder_overrides: dict | None = None,
) -> DiffusionPipeline:
    """Build a `WanPipeline` ("wan") or `CogVideoXPipeline` ("cogvideox") of the published size, random weights.

    Args:
        family: "wan" (Wan2.1-T2V-1.3B) or "cogvideox" (CogVideoX-5B), or a model name of `MODEL_DIRS`
            ("wan2.1-t2v-14b", "wan2.2-t2v-a14b" with both experts, "wan2.2-ti2v-5b"); at full depth the 14B models
            need a GPU (tests build them with a few layers only).
        device: where every component is allocated.
        dtype: transformer and text-encoder dtype (bf16, as both model cards run them).
        vae_dtype: VAE dtype; default the documented one (Wan float32, CogVideoX `dtype`).
        num_layers: override of the transformer depth, of every expert (CPU tests).
        text_encoder: False leaves the text encoder out (pass `prompt_embeds` to the pipeline then).
        text_encoder_overrides: config overrides for the text encoder (e.g. `num_layers`, `d_ff`, `vocab_size`
            to make it small enough for a CPU test; `d_model` must stay 4096 to match the transformer).
    """
    _check_family(family)
    encoder = build_text_encoder(family, device, dtype, overrides=text_encoder_overrides) if text_encoder else None
    tokenizer_vocab = min(1000, encoder.config.vocab_size) if encoder is not None else None
    parts = {
        "tokenizer": build_tokenizer(family, tokenizer_vocab),
        "text_encoder": encoder,
        "vae": build_vae(family, device, vae_dtype or default_vae_dtype(family, dtype)),
        "scheduler": build_scheduler(family),
    }
    for expert in experts(family):
        parts[expert] = build_transformer(family, device, dtype, num_layers=num_layers, component=expert)
    return PIPELINE_CLASSES[family_of(family)](**parts, **pipeline_config(family))
