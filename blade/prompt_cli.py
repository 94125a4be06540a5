"""Command line shared by `utils/process_prompts_wanx.py` and `utils/process_prompts_cogvideox.py`.

Encodes a prompt file once with the pipeline's own tokenizer + text encoder and writes a cache folder that
`blade.prompts.PromptEmbeddingCache` (and the TDM trainer) read. Exit status 2 with a one-line message for unusable
inputs (missing model folder, empty prompt file, undecodable bytes).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from blade.families import get_family
from blade.outputs import OutputLocationError, check_output_dir, describe_write_failure
from blade.prompts import (
    PromptCacheError,
    PromptCacheWriter,
    deduplicate,
    encode_batch,
    prompt_hash,
    read_prompt_file,
    token_lengths,
)

logger = logging.getLogger("blade.prompts")

@dataclass(frozen=True)
class FamilyDefaults:
    """What differs between the two preprocessing CLIs: the registry's text-encoding facts of one family."""

    family: str  # a blade.families name
    pipeline_class: str  # diffusers class name
    max_length: int  # the transformer's text length in the released models
    negative_prompt: str
    input_file: str | None

    @classmethod
    def of(cls, family: str) -> FamilyDefaults:
        spec = get_family(family)
        input_file = str(_REPO_ROOT / spec.prompt_list) if spec.prompt_list else None
        return cls(spec.name, spec.pipeline_class, spec.text_max_length, spec.negative_prompt, input_file)


_REPO_ROOT = Path(__file__).resolve().parents[1]
WAN = FamilyDefaults.of("wan")
COGVIDEOX = FamilyDefaults.of("cogvideox")
WAN_NEGATIVE_PROMPT = WAN.negative_prompt  # kept importable under its old name


class CLIError(RuntimeError):
    """A user error: printed as one line, exit status 2."""


def build_parser(defaults: FamilyDefaults) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=f"Encode training prompts for {defaults.family} TDM distillation into a safetensors cache.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--input_file", default=defaults.input_file, required=defaults.input_file is None,
                        help="UTF-8 text file, one prompt per line (blank lines ignored, duplicates removed).")
    parser.add_argument("--output_dir", required=True, help="Cache folder (index.json + safetensors files).")
    parser.add_argument("--model_path", required=True,
                        help="Local diffusers pipeline folder (model_index.json, tokenizer/, text_encoder/).")
    parser.add_argument("--batch_size", type=int, default=8, help="Prompts encoded per text-encoder call.")
    parser.add_argument("--save_separate", action="store_true",
                        help="One safetensors file per prompt (else shards of --shard_size prompts).")
    parser.add_argument("--shard_size", type=int, default=256, help="Prompts per shard without --save_separate.")
    parser.add_argument("--negative_prompt", default=defaults.negative_prompt,
                        help="Negative / unconditional prompt the teacher uses for CFG ('' = empty prompt).")
    parser.add_argument("--num_validation", type=int, default=4,
                        help="Size of the fixed validation set: the first N unique prompts (or of --validation_file).")
    parser.add_argument("--validation_file", default=None, help="Optional prompt file for the validation set.")
    parser.add_argument("--max_length", type=int, default=None,
                        help=f"Text tokens per prompt (default {defaults.max_length}, or smaller when the tokenizer's "
                        "model_max_length or the transformer's max_text_seq_length is smaller).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="Text-encoder dtype; auto = bfloat16 on CUDA, float32 on CPU.")
    return parser


def _resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def load_text_pipeline(model_path: str, defaults: FamilyDefaults, device: str, dtype: torch.dtype):
    """The family's pipeline with only tokenizer + text encoder loaded (no transformer, no VAE)."""
    import diffusers

    from blade.pipelines.loading import ModelFolderError, check_model_folder

    path = Path(model_path)
    try:
        check_model_folder(defaults.family, path)
    except ModelFolderError as err:
        raise CLIError(f"--model_path: {err}") from None
    cls = getattr(diffusers, defaults.pipeline_class)
    pipe = cls.from_pretrained(str(path), transformer=None, vae=None, torch_dtype=dtype, local_files_only=True)
    pipe.text_encoder.to(device)
    return pipe


def resolve_max_length(requested: int | None, defaults: FamilyDefaults, tokenizer, model_path: str) -> int:
    """--max_length, else the family default capped by the tokenizer and the transformer's text length."""
    if requested is not None:
        if requested < 1:
            raise CLIError(f"--max_length must be >= 1, got {requested}")
        return requested
    length = defaults.max_length
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < length:
        length = tok_max
    cfg_path = Path(model_path) / "transformer" / "config.json"
    if cfg_path.is_file():
        text_len = json.loads(cfg_path.read_text()).get("max_text_seq_length")
        if isinstance(text_len, int) and 0 < text_len < length:
            length = text_len  # CogVideoX: the transformer's text length is fixed
    return length


def warn_truncated(tokenizer, prompts: list[str], max_length: int) -> list[str]:
    """Prompts longer than `max_length` tokens (they will be truncated); logs a warning naming each."""
    too_long = [p for p, n in zip(prompts, token_lengths(tokenizer, prompts)) if n > max_length]
    for prompt in too_long:
        logger.warning("prompt longer than %d tokens, truncated: %r", max_length, prompt[:200])
    if too_long:
        logger.warning("%d prompt(s) truncated to %d tokens", len(too_long), max_length)
    return too_long


def _encode_all(pipe, prompts, max_length, batch_size, device, dtype, desc, on_batch) -> None:
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        batch = prompts[start : start + batch_size]
        on_batch(batch, encode_batch(pipe, batch, max_length, torch.device(device), dtype))


def run(args: argparse.Namespace, defaults: FamilyDefaults) -> dict:
    """Encode; returns a summary dict (counts) for callers and tests."""
    if args.batch_size < 1 or args.shard_size < 1:
        raise CLIError("--batch_size and --shard_size must be >= 1")
    prompts, removed = deduplicate(read_prompt_file(args.input_file))
    if removed:
        logger.warning("removed %d duplicate prompt(s)", removed)
    if args.validation_file:
        validation, _ = deduplicate(read_prompt_file(args.validation_file))
        validation = validation[: args.num_validation]
    else:
        validation = prompts[: args.num_validation]

    # Before the text encoder loads: a file / read-only / uncreatable folder is refused in a second.
    check_output_dir(args.output_dir)
    dtype = _resolve_dtype(args.dtype, args.device)
    early = {"family": defaults.family, "model_path": str(Path(args.model_path).resolve()), "dtype": str(dtype)}
    if args.max_length is not None:
        early["max_length"] = args.max_length
    PromptCacheWriter.read_existing(args.output_dir, early, args.negative_prompt)  # refuse a mismatch before loading
    pipe = load_text_pipeline(args.model_path, defaults, args.device, dtype)
    max_length = resolve_max_length(args.max_length, defaults, pipe.tokenizer, args.model_path)
    truncated = warn_truncated(pipe.tokenizer, prompts + [args.negative_prompt] + validation, max_length)

    meta = {"family": defaults.family, "model_path": str(Path(args.model_path).resolve()), "max_length": max_length,
            "dtype": str(dtype), "source_file": str(args.input_file)}
    writer = PromptCacheWriter.open(args.output_dir, meta, negative_prompt=args.negative_prompt)
    known = writer.known_hashes()
    todo = [p for p in prompts if prompt_hash(p) not in known]
    skipped = len(prompts) - len(todo)
    if skipped:
        logger.info("skipping %d prompt(s) already encoded in %s", skipped, args.output_dir)

    # Batches are encoded, then grouped into files: per prompt, or shards of --shard_size prompts.
    pending: list[tuple[str, torch.Tensor]] = []

    def store(batch, embeds):
        pending.extend(zip(batch, embeds))
        while len(pending) >= (1 if args.save_separate else args.shard_size):
            chunk = pending[: args.shard_size] if not args.save_separate else pending[:]
            del pending[: len(chunk)]
            writer.add([p for p, _ in chunk], torch.stack([e for _, e in chunk]), args.save_separate)

    _encode_all(pipe, todo, max_length, args.batch_size, args.device, dtype, "encoding prompts", store)
    if pending:
        writer.add([p for p, _ in pending], torch.stack([e for _, e in pending]), args.save_separate)

    writer.set_negative(args.negative_prompt, encode_batch(pipe, [args.negative_prompt], max_length,
                                                           torch.device(args.device), dtype)[0])
    if validation:
        writer.set_validation(validation, encode_batch(pipe, validation, max_length, torch.device(args.device), dtype))
    writer.flush()
    summary = {"encoded": len(todo), "skipped": skipped, "duplicates_removed": removed, "total": len(writer.entries),
               "truncated": len(truncated), "max_length": max_length, "validation": len(validation)}
    logger.info("prompt cache %s: %s", args.output_dir, summary)
    return summary


def main(defaults: FamilyDefaults, argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser(defaults).parse_args(argv)
    try:
        summary = run(args, defaults)
    except (CLIError, PromptCacheError, OutputLocationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a write failing mid-run (disk full, permissions changed): what is written stays valid
        why = describe_write_failure(err, args.output_dir)
        print(f"error: writing the prompt cache {args.output_dir} failed: {why}; the entries already in its "
              "index.json are intact, rerun to finish", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0
