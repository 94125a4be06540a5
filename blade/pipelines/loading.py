"""Load local diffusers pipeline folders and BLADE LoRAs, with errors that say what is wrong and how to fix it.

Nothing here touches the network: pipelines load with `local_files_only=True`, and a missing or incomplete folder
is a `ModelFolderError` naming what is missing, what to download and where to put it. A BLADE LoRA is a diffusers
LoRA file (`pytorch_lora_weights.safetensors`) plus an optional `blade_config.json` beside it; every LoRA key must
find a module of the right shape in the transformer, or loading stops with a `LoraMismatchError`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from blade.config import CONFIG_NAME, BladeConfig, BladeConfigError
from blade.families import FAMILIES, Family, get_family

__all__ = [
    "FAMILIES",
    "BLADE_CONFIG_NAME",
    "LORA_WEIGHT_NAME",
    "LORA_WEIGHT_NAME_2",
    "FamilySpec",
    "LoraError",
    "LoraMismatchError",
    "LoraNotFoundError",
    "ModelFolderError",
    "check_lora_finite",
    "check_lora_keys",
    "check_model_folder",
    "empty_transformer",
    "expert_lora_files",
    "family_of_transformer",
    "load_blade_lora_weights",
    "load_pipeline",
    "read_component_config",
    "read_lora_state_dict",
    "resolve_lora",
    "video_size_rules",
]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# A two-expert student (Wan2.2-A14B) keeps the low-noise expert's LoRA beside the first one; both files are in the
# diffusers format (`transformer.`-prefixed keys): `WanPipeline.load_lora_weights(..., load_into_transformer_2=True)`
# reads the second into `transformer_2`.
LORA_WEIGHT_NAME_2 = "pytorch_lora_weights_transformer_2.safetensors"
BLADE_CONFIG_NAME = CONFIG_NAME


# The model families (what the loaders and the inference CLI need to know about each): blade.families.
FamilySpec = Family


class ModelFolderError(FileNotFoundError):
    """The model folder is missing, incomplete, or holds another model family."""


class LoraError(ValueError):
    """A LoRA file or its blade_config.json cannot be used."""


class LoraNotFoundError(LoraError, FileNotFoundError):
    """The LoRA path does not exist or holds no .safetensors file."""


class LoraMismatchError(LoraError):
    """LoRA keys that find no module (or a module of another shape) in the transformer."""


def _family(family: str) -> FamilySpec:
    return get_family(family)


def family_of_transformer(transformer: torch.nn.Module) -> str:
    """`"wan"` or `"cogvideox"` from the transformer's class (subclasses included)."""
    for spec in FAMILIES.values():
        if isinstance(transformer, spec.transformer_cls()):
            return spec.name
    raise TypeError(
        f"{type(transformer).__name__} is not a supported transformer; expected one of "
        f"{[spec.transformer_class for spec in FAMILIES.values()]}"
    )


# ----------------------------------------------------------------------------------------------------------------
# Model folders
# ----------------------------------------------------------------------------------------------------------------


def _missing_weights(folder: Path) -> str | None:
    """Why a model component folder cannot load, or None: config.json plus weights (sharded index complete)."""
    if not (folder / "config.json").is_file():
        return f"{folder.name}/config.json"
    for index in folder.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return f"{folder.name}/{index.name} (unreadable)"
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            more = f" and {len(missing) - 1} more shard(s)" if len(missing) > 1 else ""
            return f"{folder.name}/{missing[0]}{more}"
        return None
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        return f"{folder.name}/*.safetensors (no weights)"
    return None


def _component_problem(root: Path, name: str, class_name: str) -> str | None:
    folder = root / name
    if not folder.is_dir():
        return f"{name}/"
    if class_name.endswith("Scheduler"):
        return None if (folder / "scheduler_config.json").is_file() else f"{name}/scheduler_config.json"
    if "Tokenizer" in class_name:
        return None if any(folder.iterdir()) else f"{name}/ (empty)"
    return _missing_weights(folder)


def check_model_folder(family: str, model_path: str | os.PathLike, *, hint: str | None = None) -> dict[str, Any]:
    """Check that `model_path` is a complete local diffusers folder of `family`, without loading any weight.

    Args:
        family: "wan" or "cogvideox".
        model_path: the pipeline folder (holding model_index.json).
        hint: what to tell the user to download; defaults to the family's Hugging Face checkpoint.

    Returns:
        The parsed model_index.json.

    Raises:
        ModelFolderError: naming the missing piece and what to download.
    """
    spec = _family(family)
    hint = hint or spec.download_hint()
    root = Path(model_path)
    if not root.is_dir():
        raise ModelFolderError(
            f"Model folder {root} does not exist (expected a diffusers pipeline folder with model_index.json). {hint}"
        )
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise ModelFolderError(f"{root} is not a diffusers pipeline folder (no model_index.json). {hint}")
    try:
        index = json.loads(index_file.read_text())
    except ValueError as err:
        raise ModelFolderError(f"{index_file} is not valid JSON ({err}). {hint}") from None
    if index.get("_class_name") != spec.pipeline_class:
        raise ModelFolderError(
            f"{root} holds a {index.get('_class_name')!r} pipeline, not a {spec.pipeline_class} ({family}). {hint}"
        )
    problems = []
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            continue  # config values and optional components saved as [null, null]
        problem = _component_problem(root, name, entry[1])
        if problem:
            problems.append(problem)
    if problems:
        raise ModelFolderError(f"Model folder {root} is incomplete: missing {', '.join(problems)}. {hint}")
    return index


def read_component_config(model_path: str | os.PathLike, component: str) -> dict[str, Any]:
    """The config.json of one component folder (e.g. "vae", "transformer"), read without loading weights."""
    path = Path(model_path) / component / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelFolderError(f"cannot read {path}: {err}") from None


def load_pipeline(
    family: str,
    model_path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    hint: str | None = None,
):
    """Load a local diffusers pipeline folder of `family` (never from the network) and move it to `device`.

    Raises:
        ModelFolderError: when the folder is missing or incomplete (checked before any weight is read).
    """
    spec = _family(family)
    check_model_folder(family, model_path, hint=hint)
    pipe = spec.pipeline_cls().from_pretrained(str(model_path), **_dtype_kwarg(dtype), local_files_only=True)
    return pipe.to(device)


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """`dtype=` where diffusers takes it (0.4x deprecates `torch_dtype=`), else the older `torch_dtype=`."""
    from diffusers.pipelines import pipeline_utils

    return {"dtype": dtype} if hasattr(pipeline_utils, "_resolve_dtype") else {"torch_dtype": dtype}


# ----------------------------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------------------------


def resolve_lora(path: str | os.PathLike) -> tuple[Path, BladeConfig | None]:
    """Find the LoRA weights file and read the blade_config.json beside it.

    Args:
        path: the .safetensors file, or its folder (holding `pytorch_lora_weights.safetensors`, or exactly one
            .safetensors file).

    Returns:
        `(safetensors_file, blade_config)`; the config (a `blade.config.BladeConfig`) is None when there is no
        blade_config.json.

    Raises:
        LoraNotFoundError: nothing at `path`, or no unambiguous .safetensors file in the folder.
        LoraError: the file is not a readable safetensors file, holds no tensor, or the JSON is invalid (not JSON,
            not an object, or a value BladeConfig refuses).
    """
    path = Path(path)
    if path.is_dir():
        default = path / LORA_WEIGHT_NAME
        candidates = [default] if default.is_file() else sorted(
            f for f in path.glob("*.safetensors") if f.name != LORA_WEIGHT_NAME_2
        )
        if len(candidates) != 1:
            found = ", ".join(c.name for c in candidates) or "none"
            raise LoraNotFoundError(
                f"LoRA folder {path} should hold {LORA_WEIGHT_NAME} (or exactly one .safetensors file); found: {found}"
            )
        weights = candidates[0]
    elif path.is_file():
        weights = path
    else:
        raise LoraNotFoundError(f"LoRA not found: {path} (pass the .safetensors file or the folder holding it)")
    if weights.suffix != ".safetensors":
        raise LoraError(f"LoRA weights must be a .safetensors file, got {weights}")
    _check_safetensors_readable(weights)
    return weights, _read_blade_config(weights)


def _check_safetensors_readable(file: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise LoraError(f"LoRA file {file} is not a readable safetensors file (corrupt or truncated?): {err}") from None
    if not keys:
        raise LoraError(f"LoRA file {file} holds no tensors")


def _read_blade_config(weights: Path) -> BladeConfig | None:
    path = weights.parent / BLADE_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        return BladeConfig.load(path)
    except (OSError, BladeConfigError) as err:
        raise LoraError(f"{BLADE_CONFIG_NAME} beside {weights} is invalid: {err}") from None


def read_lora_state_dict(family: str, weights: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The LoRA state dict as the family's pipeline will load it (diffusers' key conversions applied) + metadata."""
    weights = Path(weights)
    state_dict, metadata = (
        _family(family)
        .pipeline_cls()
        .lora_state_dict(
            str(weights.parent),
            weight_name=weights.name,
            use_safetensors=True,
            local_files_only=True,
            return_lora_metadata=True,
        )
    )
    return state_dict, metadata


# "transformer.<module>.lora_A.weight" (optionally with an adapter name before "weight", as PEFT names them).
_LORA_KEY = re.compile(
    r"^transformer\.(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_magnitude_vector)(?:\.[^.]+)?\.(?P<param>weight|bias)$"
)


def _module_in_out(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a module a LoRA can target (Linear, Conv), else None."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return module.in_channels, module.out_channels
    return None


def _key_problem(transformer: torch.nn.Module, key: str, tensor: torch.Tensor) -> str | None:
    """Why one LoRA key cannot be applied to `transformer`, or None."""
    match = _LORA_KEY.match(key)
    if match is None:
        return f"{key} {tuple(tensor.shape)}: not a transformer LoRA key"
    try:
        module = transformer.get_submodule(match["module"])
    except AttributeError:
        return f"{key} {tuple(tensor.shape)}: no module {match['module']!r} in the transformer"
    # A LoRA-wrapped module (already loaded adapter) exposes the original layer as `base_layer`.
    module = getattr(module, "base_layer", module)
    dims = _module_in_out(module)
    if dims is None:
        return f"{key}: {match['module']} is a {type(module).__name__}, not a Linear/Conv layer"
    in_features, out_features = dims
    kind, shape = match["kind"], tuple(tensor.shape)
    if kind == "lora_A" and match["param"] == "weight" and shape[1] != in_features:
        return f"{key} {shape}: the module takes {in_features} input features"
    if kind == "lora_B" and shape[0] != out_features:
        return f"{key} {shape}: the module has {out_features} output features"
    return None


def check_lora_keys(transformer: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, show: int = 4) -> None:
    """Raise `LoraMismatchError` unless every key targets an existing Linear/Conv of a matching shape.

    `transformer` may live on the meta device (built from its config with `accelerate.init_empty_weights`), so the
    check can run before any weight is loaded.
    """
    problems = [p for key, tensor in state_dict.items() if (p := _key_problem(transformer, key, tensor))]
    if problems:
        shown = "\n  ".join(problems[:show])
        more = f"\n  ... and {len(problems) - show} more" if len(problems) > show else ""
        raise LoraMismatchError(
            f"{len(problems)} of {len(state_dict)} LoRA keys do not match the {type(transformer).__name__} "
            f"(a LoRA trained for another model or model size?):\n  {shown}{more}"
        )


def check_lora_finite(state_dict: dict[str, torch.Tensor], file: str | os.PathLike) -> None:
    """Raise `LoraError` naming `file` when a LoRA tensor holds NaN or Inf.

    A LoRA saved from a diverged run loads without complaint and renders all-black videos; refuse it instead.
    """
    bad = [k for k, v in state_dict.items() if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())]
    if bad:
        raise LoraError(
            f"LoRA file {file} holds non-finite values (NaN/Inf) in {len(bad)} of {len(state_dict)} tensors (e.g. "
            f"{bad[0]}): it comes from a diverged or corrupted training run; use an earlier checkpoint's "
            "pytorch_lora_weights.safetensors"
        )


def empty_transformer(family: str, model_path: str | os.PathLike) -> torch.nn.Module:
    """The folder's transformer with meta-device weights (no memory, no file read but config.json): for checks."""
    from accelerate import init_empty_weights

    cls = _family(family).transformer_cls()
    with init_empty_weights():
        return cls.from_config(read_component_config(model_path, "transformer"))


def _modules_with_adapter(transformer: torch.nn.Module, adapter_name: str) -> set[str]:
    return {
        name
        for name, module in transformer.named_modules()
        if adapter_name in getattr(module, "lora_A", {}) or adapter_name in getattr(module, "lora_magnitude_vector", {})
    }


def expert_lora_files(weights: str | os.PathLike) -> dict[str, Path]:
    """The LoRA file of each expert: ``{"transformer": weights}``, plus ``"transformer_2"`` when the low-noise
    expert's file (`LORA_WEIGHT_NAME_2`) lies beside a `LORA_WEIGHT_NAME` (a two-expert Wan2.2-A14B student)."""
    weights = Path(weights)
    files = {"transformer": weights}
    second = weights.parent / LORA_WEIGHT_NAME_2
    if weights.name == LORA_WEIGHT_NAME and second.is_file():
        files["transformer_2"] = second
    return files


def load_blade_lora_weights(
    pipe, weights: str | os.PathLike, *, adapter_name: str = "blade", expert: str = "transformer"
) -> None:
    """Load a LoRA file into `pipe.transformer` (or `pipe.transformer_2` with `expert="transformer_2"`), checking
    that every key lands on a module.

    The keys are checked against the transformer before loading (shapes included); after loading, every module the
    keys name must carry the adapter (diffusers only warns about keys it could not place).
    """
    transformer = getattr(pipe, expert, None)
    if transformer is None:
        raise LoraMismatchError(f"{Path(weights).name} is a LoRA for `{expert}`, which {type(pipe).__name__} lacks")
    family = family_of_transformer(transformer)
    weights = Path(weights)
    state_dict, _ = read_lora_state_dict(family, weights)
    check_lora_finite(state_dict, weights)
    check_lora_keys(transformer, state_dict)
    extra = {"load_into_transformer_2": True} if expert == "transformer_2" else {}
    pipe.load_lora_weights(
        str(weights.parent), weight_name=weights.name, adapter_name=adapter_name, local_files_only=True, **extra
    )
    expected = {_LORA_KEY.match(k)["module"] for k in state_dict}
    missing = sorted(expected - _modules_with_adapter(transformer, adapter_name))
    if missing:
        raise LoraMismatchError(
            f"{len(missing)} LoRA target modules received no adapter after loading {weights}: {missing[:4]}"
        )


def video_size_rules(family: str, model_path: str | os.PathLike) -> tuple[int, int, int]:
    """What sizes the folder's model takes, read from the component configs (no weights).

    Returns:
        `(height_multiple, width_multiple, frame_step)`: height and width must be multiples of the first two
        (VAE spatial compression x transformer patch), and the frame count must be `frame_step * k + 1` (VAE
        temporal compression).
    """
    vae = read_component_config(model_path, "vae")
    transformer = read_component_config(model_path, "transformer")
    return _family(family).size_rules(vae, transformer)
