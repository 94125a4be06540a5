"""Student and fake-score LoRA adapters on one shared, frozen base transformer.

TDM needs three networks of the same architecture: the frozen dense teacher, the student and the fake score. All
three share the base weights here: the student and the fake are two PEFT LoRA adapters ("student", "fake") on the
same transformer, switched with `set_adapter`, and the teacher is that transformer with adapters disabled (and ASA
off). This keeps one copy of the base weights in memory instead of three.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

STUDENT = "student"
FAKE = "fake"
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
# Which Linear layers carry the LoRA (`--lora_targets`). "attn" is the released recipe (every attention projection,
# self and cross); "attn_ffn" adds both feed-forward Linears of every block (`ffn.net.*` in Wan, `ff.net.*` in
# CogVideoX: PEFT matches a target against the end of the module name); "all" is every Linear of the transformer
# (also the time/text embedders, the per-block modulation input and the output projection).
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": DEFAULT_TARGET_MODULES,
    "attn_ffn": DEFAULT_TARGET_MODULES + ("net.0.proj", "net.2"),
}
ALL_LINEAR = "all"


def target_modules(transformer: torch.nn.Module, preset: str) -> tuple[str, ...]:
    """The module-name suffixes of a `--lora_targets` preset; "all" lists every Linear of this transformer."""
    if preset == ALL_LINEAR:
        return tuple(sorted(name for name, module in transformer.named_modules()
                            if isinstance(module, torch.nn.Linear)))
    if preset not in TARGET_PRESETS:
        raise ValueError(f"unknown LoRA target preset {preset!r}; choose one of {[*TARGET_PRESETS, ALL_LINEAR]}")
    return TARGET_PRESETS[preset]


def is_target(name: str, targets: tuple[str, ...]) -> bool:
    """PEFT's rule for a list of target names: the module's full name, or its ending after a dot."""
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_config(rank: int = 64, alpha: int = 64, target_modules=DEFAULT_TARGET_MODULES) -> LoraConfig:
    """Gaussian-initialised LoRA (B = 0, so each adapter starts as the identity on the base model)."""
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))


def add_student_and_fake(transformer: torch.nn.Module, rank: int = 64, alpha: int = 64,
                         target_modules=DEFAULT_TARGET_MODULES) -> None:
    """Freeze the base, add the "student" and "fake" adapters and make the fake an exact copy of the student.

    The released code took `deepcopy(student)` after adding the LoRA, so the fake score starts identical to the
    student (including its random A matrices); copying the adapter weights reproduces that without a second model.
    """
    transformer.requires_grad_(False)
    transformer.add_adapter(lora_config(rank, alpha, target_modules), adapter_name=STUDENT)
    transformer.add_adapter(lora_config(rank, alpha, target_modules), adapter_name=FAKE)
    copy_adapter(transformer, STUDENT, FAKE)
    activate(transformer, STUDENT)  # not bare set_adapter: it would freeze the fake adapter


def lora_layers(transformer: torch.nn.Module) -> Iterator[LoraLayer]:
    for module in transformer.modules():
        if isinstance(module, LoraLayer):
            yield module


@torch.no_grad()
def copy_adapter(transformer: torch.nn.Module, src: str, dst: str) -> None:
    """Copy every LoRA A/B weight of adapter `src` into adapter `dst`."""
    for layer in lora_layers(transformer):
        for mats in (layer.lora_A, layer.lora_B):
            mats[dst].weight.copy_(mats[src].weight)


def adapter_parameters(transformer: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters of one adapter, in a fixed (module) order."""
    params = []
    for layer in lora_layers(transformer):
        params.append(layer.lora_A[name].weight)
        params.append(layer.lora_B[name].weight)
    if not params:
        raise ValueError(f"transformer has no LoRA adapter named {name!r}")
    return params


def activate(transformer: torch.nn.Module, name: str) -> None:
    """Make `name` the only active adapter, keeping requires_grad on both trainable adapters.

    PEFT's `set_adapter` freezes the inactive adapters; the optimizers hold both, so it is restored here (gradients
    still reach only the active adapter, the other simply gets none).
    """
    transformer.set_adapter(name)
    for other in (STUDENT, FAKE):
        for p in adapter_parameters(transformer, other):
            p.requires_grad_(True)


@contextmanager
def adapters_disabled(transformer: torch.nn.Module) -> Iterator[None]:
    """Run the bare base model (the teacher) inside the block."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def adapter_state_dict(transformer: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """PEFT state dict of one adapter, keys like `blocks.0.attn1.to_q.lora_A.weight` (no adapter name)."""
    return get_peft_model_state_dict(transformer, adapter_name=name)


def load_adapter_state_dict(transformer: torch.nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    """Load weights saved by `adapter_state_dict` into adapter `name` (strict on missing LoRA keys)."""
    own = adapter_state_dict(transformer, name)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"LoRA state for adapter {name!r} does not match the model: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); was it trained with another "
            "--rank or model?"
        )
    set_peft_model_state_dict(transformer, state, adapter_name=name)


def cast_lora_to(transformer: torch.nn.Module, dtype: torch.dtype) -> None:
    """Keep the trainable LoRA weights in `dtype` (fp32) while the frozen base runs in bf16."""
    for name in (STUDENT, FAKE):
        for p in adapter_parameters(transformer, name):
            p.data = p.data.to(dtype)
