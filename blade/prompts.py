"""Prompt-embedding cache: write it once (preprocessing), read it many times (TDM training).

TDM distillation is data-free: the only inputs are text prompts. Encoding them with a 5B-parameter T5 inside the
training loop would waste memory and time, so `utils/process_prompts_*.py` encode every prompt once with the
pipeline's own tokenizer + text encoder (`pipe.encode_prompt`) and store the exact tensors the pipeline would feed
the transformer. Layout of a cache folder:

    index.json                  metadata + one entry per prompt (text, hash, file, key, shape, dtype)
    embeds/<hash>.safetensors   one file per prompt (--save_separate), key "prompt_embeds"
    shard-00000.safetensors     or shards of N prompts, one key per prompt hash
    negative.safetensors        the negative / empty-prompt embedding (teacher CFG), key "prompt_embeds"
    validation.safetensors      the fixed validation set, one key per prompt hash

Every stored embedding has shape [L, D] (L = max_length tokens, D = text encoder width).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from blade.outputs import make_readable

INDEX_NAME = "index.json"
NEGATIVE_NAME = "negative.safetensors"
VALIDATION_NAME = "validation.safetensors"
EMBED_KEY = "prompt_embeds"
INDEX_VERSION = 1


class PromptCacheError(RuntimeError):
    """A prompt folder or prompt file that cannot be used (missing, empty, undecodable...)."""


def prompt_hash(text: str) -> str:
    """Stable 16-hex-digit id of a prompt (sha256 of its UTF-8 bytes)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# Reading prompt text files
# ----------------------------------------------------------------------------------------------------------------


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Read one prompt per line (UTF-8); blank lines are skipped, surrounding whitespace stripped.

    Raises `PromptCacheError` for a missing file, undecodable bytes (naming the line) or a file without prompts.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptCacheError(f"prompt file not found: {path}")
    prompts = []
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise PromptCacheError(
                    f"{path}: line {line_no} is not valid UTF-8 ({err.reason} at byte {err.start}); fix or remove it"
                ) from None
            line = line.strip()
            if line:
                prompts.append(line)
    if not prompts:
        raise PromptCacheError(f"prompt file {path} contains no prompts (one prompt per line expected)")
    return prompts


def deduplicate(prompts: Sequence[str]) -> tuple[list[str], int]:
    """Drop repeated prompts, keeping the first occurrence and the order. Returns (unique prompts, removed count)."""
    unique = list(dict.fromkeys(prompts))
    return unique, len(prompts) - len(unique)


# ----------------------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------------------


def token_lengths(tokenizer, prompts: Sequence[str]) -> list[int]:
    """Number of tokens (special tokens included) of each prompt, without truncation."""
    ids = tokenizer(list(prompts), add_special_tokens=True, truncation=False)["input_ids"]
    return [len(x) for x in ids]


@torch.no_grad()
def encode_batch(
    pipe, prompts: Sequence[str], max_length: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Encode prompts exactly as the pipeline does before calling its transformer.

    Uses `pipe.encode_prompt` (Wan: umT5 states zero-padded after the real tokens; CogVideoX: T5 states of the
    max-length padded sequence), without CFG. Returns [N, max_length, D].
    """
    embeds, _ = pipe.encode_prompt(
        prompt=list(prompts),
        do_classifier_free_guidance=False,
        num_videos_per_prompt=1,
        max_sequence_length=max_length,
        device=device,
        dtype=dtype,
    )
    return embeds


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def _fsync_write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=1, ensure_ascii=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    make_readable(tmp)  # safetensors creates files 0600: others on a shared machine could not read the cache
    os.replace(tmp, path)


@dataclass
class PromptCacheWriter:
    """Incrementally fills a cache folder; a rerun keeps what is there and only adds new prompts (by hash)."""

    out_dir: Path
    meta: dict
    entries: list[dict] = field(default_factory=list)

    @staticmethod
    def read_existing(out_dir: str | os.PathLike, meta: dict, negative_prompt: str | None = None) -> dict | None:
        """The index of an existing cache in `out_dir` (None if there is none), checked against `meta`.

        One cache holds one setting: mixing dtypes, text lengths, families or CFG negatives in one cache would feed
        the trainer inconsistent inputs. Keys missing from `meta` (or from an old index) are not compared; callers
        may check before the text encoder loads with what they know by then.

        Raises:
            PromptCacheError: naming the setting, its value in the cache and the new one.
        """
        index_path = Path(out_dir) / INDEX_NAME
        if not index_path.is_file():
            return None
        try:
            old = json.loads(index_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise PromptCacheError(
                f"{index_path} is corrupt ({err}): delete {out_dir} and rerun, or use another --output_dir"
            ) from None
        flags = {"max_length": "--max_length", "model_path": "--model_path", "dtype": "--dtype",
                 "family": "the model family"}
        for key, flag in flags.items():
            if key in old and key in meta and str(old[key]) != str(meta[key]):
                raise PromptCacheError(
                    f"{out_dir} was encoded with {key}={old[key]!r}, now {meta[key]!r} ({flag}): one cache holds "
                    f"one setting; rerun with {key}={old[key]!r} or use another --output_dir"
                )
        old_negative = (old.get("negative") or {}).get("prompt")
        if negative_prompt is not None and old_negative is not None and old_negative != negative_prompt:
            raise PromptCacheError(
                f"{out_dir} was encoded with --negative_prompt {old_negative[:60]!r}, now {negative_prompt[:60]!r}: "
                "the teacher's CFG would change mid-cache; pass the same --negative_prompt or use another --output_dir"
            )
        return old

    @classmethod
    def open(cls, out_dir: str | os.PathLike, meta: dict, negative_prompt: str | None = None) -> PromptCacheWriter:
        """Open (create) a cache folder; an existing cache must match `meta` and `negative_prompt`."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        entries: list[dict] = []
        old = cls.read_existing(out_dir, meta, negative_prompt)
        if old is not None:
            # Keep only entries whose file is still there, so a half-written earlier run is simply redone.
            entries = [e for e in old.get("prompts", []) if (out_dir / e["file"]).is_file()]
            meta = {**old, **meta}
        return cls(out_dir=out_dir, meta=meta, entries=entries)

    def known_hashes(self) -> set[str]:
        return {e["hash"] for e in self.entries}

    def _next_shard_name(self) -> str:
        used = {e["file"] for e in self.entries}
        i = 0
        while f"shard-{i:05d}.safetensors" in used or (self.out_dir / f"shard-{i:05d}.safetensors").exists():
            i += 1
        return f"shard-{i:05d}.safetensors"

    def add(self, prompts: Sequence[str], embeds: torch.Tensor, separate: bool) -> None:
        """Store `embeds` [N, L, D] for `prompts` (one file each, or one shard for the N of them)."""
        if separate:
            (self.out_dir / "embeds").mkdir(exist_ok=True)
            for prompt, emb in zip(prompts, embeds):
                h = prompt_hash(prompt)
                name = f"embeds/{h}.safetensors"
                _save_tensors(self.out_dir / name, {EMBED_KEY: emb})
                self.entries.append(_entry(prompt, h, name, EMBED_KEY, emb))
        else:
            name = self._next_shard_name()
            hashes = [prompt_hash(p) for p in prompts]
            _save_tensors(self.out_dir / name, dict(zip(hashes, embeds)))
            self.entries.extend(_entry(p, h, name, h, e) for p, h, e in zip(prompts, hashes, embeds))
        self.flush()  # the index follows every write: an interrupted run resumes where it stopped

    def set_negative(self, prompt: str, embed: torch.Tensor) -> None:
        """The negative-prompt ([L, D]) embedding the teacher uses for CFG."""
        _save_tensors(self.out_dir / NEGATIVE_NAME, {EMBED_KEY: embed})
        self.meta["negative"] = _entry(prompt, prompt_hash(prompt), NEGATIVE_NAME, EMBED_KEY, embed)

    def set_validation(self, prompts: Sequence[str], embeds: torch.Tensor) -> None:
        """The fixed validation prompts and their embeddings [N, L, D]."""
        hashes = [prompt_hash(p) for p in prompts]
        _save_tensors(self.out_dir / VALIDATION_NAME, dict(zip(hashes, embeds)))
        self.meta["validation"] = [
            _entry(p, h, VALIDATION_NAME, h, e) for p, h, e in zip(prompts, hashes, embeds)
        ]

    def flush(self) -> None:
        _fsync_write_json(self.out_dir / INDEX_NAME, {**self.meta, "version": INDEX_VERSION, "prompts": self.entries})


def _entry(prompt: str, h: str, file: str, key: str, emb: torch.Tensor) -> dict:
    return {"prompt": prompt, "hash": h, "file": file, "key": key, "shape": list(emb.shape), "dtype": str(emb.dtype)}


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


class PromptEmbeddingCache(Dataset):
    """Read side of a cache folder written by `utils/process_prompts_*.py`.

    `cache[i]` is the [L, D] embedding of prompt i (float, the dtype it was stored in); `cache.prompt(i)` its text;
    `negative()` the [L, D] negative embedding; `validation()` a list of (prompt, [L, D]) pairs. It is itself a
    `torch.utils.data.Dataset`; `as_dataset()` gives a view yielding (index, embedding) pairs for DataLoaders.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index_path = self.directory / INDEX_NAME
        if not self.directory.is_dir():
            raise PromptCacheError(
                f"prompt-embedding folder not found: {self.directory}. Create it with "
                "utils/process_prompts_wanx.py or utils/process_prompts_cogvideox.py (--output_dir)."
            )
        if not index_path.is_file():
            raise PromptCacheError(
                f"{self.directory} holds no {INDEX_NAME}: it is not a prompt-embedding folder (or its preprocessing "
                "never finished). Run utils/process_prompts_*.py with --output_dir pointing at it."
            )
        try:
            self.index = json.loads(index_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise PromptCacheError(f"{index_path} is corrupt ({err}); rerun the preprocessing") from None
        self.entries: list[dict] = self.index.get("prompts", [])
        if not self.entries:
            raise PromptCacheError(f"{self.directory} contains no encoded prompts; rerun the preprocessing")
        self._handles: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._load(self.entries[i])

    def prompt(self, i: int) -> str:
        return self.entries[i]["prompt"]

    @property
    def max_length(self) -> int | None:
        return self.index.get("max_length")

    def negative(self) -> torch.Tensor:
        entry = self.index.get("negative")
        if entry is None:
            raise PromptCacheError(f"{self.directory} holds no negative-prompt embedding; rerun the preprocessing")
        return self._load(entry)

    def validation(self) -> list[tuple[str, torch.Tensor]]:
        return [(e["prompt"], self._load(e)) for e in self.index.get("validation", [])]

    def as_dataset(self) -> Dataset:
        return _IndexedView(self)

    def _load(self, entry: dict) -> torch.Tensor:
        path = self.directory / entry["file"]
        if not path.is_file():
            raise PromptCacheError(f"embedding file missing: {path} (listed in {self.directory / INDEX_NAME})")
        # Handles are opened lazily per process (DataLoader workers each get their own after fork).
        try:
            handle = self._handles.get(entry["file"])
            if handle is None:
                handle = safe_open(str(path), framework="pt", device="cpu")
                self._handles[entry["file"]] = handle
            tensor = handle.get_tensor(entry["key"])
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise PromptCacheError(
                f"embedding file {path} is corrupt or truncated ({err}). {self._redo(path)}"
            ) from None
        # Garbage bytes of the right size load "fine" as NaN/Inf: training would silently produce NaN LoRAs.
        if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all()):
            raise PromptCacheError(
                f"embedding file {path} holds non-finite values (NaN/Inf) for {entry.get('prompt', '')[:60]!r}: "
                f"it is corrupt. {self._redo(path)}"
            )
        return tensor

    def _redo(self, path: Path) -> str:
        """What to do about a bad file: the prompt CLI re-encodes exactly the prompts whose file is missing."""
        return (f"Delete {path} and re-run utils/process_prompts_*.py with --output_dir {self.directory} (it "
                "re-encodes only the missing prompts).")

    @property
    def family(self) -> str | None:
        """The model family the cache was encoded for ("wan" / "cogvideox"), None for caches that predate it."""
        return self.index.get("family")

    def __getstate__(self):  # safetensors handles do not pickle (spawned DataLoader workers)
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state


class _IndexedView(Dataset):
    """(index, [L, D] embedding) pairs, so a training loop knows which prompt it got."""

    def __init__(self, cache: PromptEmbeddingCache):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, self.cache[i]
