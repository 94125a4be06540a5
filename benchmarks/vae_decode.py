"""VAE decode speed: Wan's stock one-latent-frame-per-call decode against decoding N latent frames per call, and
the compiled decoder (Wan, CogVideoX).

Full-size VAEs with random weights from the published configs (Wan2.1's for Wan2.1-1.3B / 14B / Wan2.2-A14B; Wan2.2's
for TI2V-5B), each at its model's default video, in bf16 (the BLADE arms' VAE dtype), cuDNN autotuning on, optionally
channels-last-3D convolutions. Every arm decodes the same latents once to warm up, then `--repeats` times measured;
the table gives the median seconds, the speed-up over the stock decode, the peak memory and the largest pixel
difference from the stock decode of the same run (rounding only: the chunked decode computes the same video).
``--compile_chunks N ...`` adds arms with the decoder compiled (inductor) at those chunks; their warm-up (two decodes:
the graphs for the first chunks, the steady state and a ragged last chunk) is reported as ``warmup_s``. CogVideoX-5B's
VAE (49 x 480 x 720) decodes in its own batches of two latent frames: `--chunks` does not apply to it, and any
`--compile_chunks` value adds its compiled arm.

    python benchmarks/vae_decode.py --models wan2.1-t2v-1.3b --chunks 2 4 7 10 20 --out vae.json
    python benchmarks/vae_decode.py --models cogvideox-5b --compile_chunks 1 --out vae_cog.json
    python benchmarks/vae_decode.py --tiny   # CPU smoke test (tiny random VAE)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blade.families import get_family, get_model  # noqa: E402
from blade.speed import compile_vae_decoder, conv3d_channels_last_, decode_latent_frames_in_chunks  # noqa: E402
from blade.testing import full_size, tiny  # noqa: E402

VAE_MODELS = ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-ti2v-5b", "cogvideox-5b")


def latent_shape(vae, num_frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
    """[1, C, T, H, W] of a video: 4x temporal, the VAE's spatial factor (8 for Wan2.1 and CogVideoX, 16 for
    Wan2.2); C is Wan's z_dim or CogVideoX's latent_channels."""
    spatial = int(vae.config.get("scale_factor_spatial", 8) or 8)
    channels = vae.config.get("z_dim") or vae.config.latent_channels
    return (1, channels, (num_frames - 1) // 4 + 1, height // spatial, width // spatial)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_decode(vae, z: torch.Tensor, repeats: int, warmups: int = 1) -> tuple[list[float], torch.Tensor, float]:
    """(measured seconds, the last output, warm-up seconds)."""
    _sync(z.device)
    start = time.perf_counter()
    for _ in range(warmups):  # cuDNN autotuning, allocator growth, compilation
        vae.decode(z)
    _sync(z.device)
    warmup = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        _sync(z.device)
        start = time.perf_counter()
        out = vae.decode(z).sample
        _sync(z.device)
        times.append(time.perf_counter() - start)
    return times, out, warmup


def run_model(name: str, args, device: torch.device) -> list[dict[str, Any]]:
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        vae = tiny.build_tiny_wan_pipeline(seed=0).vae.to(device, dtype)
        video = {"num_frames": 21, "height": 64, "width": 64}
    else:
        vae = full_size.build_vae(name, device, dtype)
        video = get_model(name).video_defaults()
    vae.eval()
    if args.channels_last:
        conv3d_channels_last_(vae)
    shape = latent_shape(vae, video["num_frames"], video["height"], video["width"])
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    rows, reference = [], None
    family = get_family(get_model(name).family)
    arms = [(1, False), *((c, False) for c in args.chunks), *((c, True) for c in args.compile_chunks)]
    if not family.vae_decode_chunks:  # CogVideoX: its own frame batches; stock and (if asked) compiled
        arms = [(1, False)] + ([(1, True)] if args.compile_chunks else [])
    for chunk, compiled in arms:
        if family.vae_decode_chunks:
            decode_latent_frames_in_chunks(vae, chunk)
        if compiled:
            torch._dynamo.reset()
            compile_vae_decoder(vae)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            times, out, warmup = time_decode(vae, z, args.repeats, warmups=2 if compiled else 1)
        except torch.OutOfMemoryError as err:
            rows.append({"model": name, "chunk": chunk, "compiled": compiled,
                         "error": f"OutOfMemoryError: {str(err).splitlines()[0]}"})
            torch.cuda.empty_cache()
            continue
        if reference is None:
            reference = out.float()
        row = {
            "model": name, "chunk": chunk, "compiled": compiled, "latents": list(shape), "video_frames": out.shape[2],
            "seconds": statistics.median(times), "all_seconds": times, "warmup_s": warmup,
            "max_abs_diff_vs_stock": (out.float() - reference).abs().max().item(),
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        }  # fmt: skip
        rows.append(row)
        print(f"{name} chunk {chunk:>2}{' compiled' * compiled}: {row['seconds']:.3f} s (warm-up {warmup:.1f} s), "
              f"diff {row['max_abs_diff_vs_stock']:.2e}", flush=True)
        del out
    base = next((r["seconds"] for r in rows if r["chunk"] == 1 and not r["compiled"] and "seconds" in r), None)
    for r in rows:
        if base and "seconds" in r:
            r["speedup_vs_stock"] = base / r["seconds"]
    del vae, z, reference
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | latent frames per call | decode (s) | vs stock | peak mem (GB) | max pixel diff vs stock "
             "| warm-up (s) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['chunk']} | {r['error'][:80]} | | | | |")
            continue
        mem = "-" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f}"
        label = f"{r['chunk']}" + (" compiled" if r["compiled"] else " (stock)" if r["chunk"] == 1 else "")
        lines.append(f"| {r['model']} | {label} | {r['seconds']:.3f} | {r.get('speedup_vs_stock', 0):.2f}x | {mem} "
                     f"| {r['max_abs_diff_vs_stock']:.2e} | {r['warmup_s']:.1f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["wan2.1-t2v-1.3b"], choices=VAE_MODELS,
                        help="whose VAE and default video (default: wan2.1-t2v-1.3b, 81x480x832)")
    parser.add_argument("--chunks", nargs="+", type=int, default=[2, 4, 7, 10, 20],
                        help="latent frames per decoder call to time beside the stock 1 (default: 2 4 7 10 20)")
    parser.add_argument("--compile_chunks", nargs="+", type=int, default=[],
                        help="chunks to time again with the decoder compiled (inductor) (default: none)")
    parser.add_argument("--repeats", type=int, default=3, help="measured decodes per arm (median reported)")
    parser.add_argument("--channels_last", action="store_true", help="channels-last-3D VAE convolutions")
    parser.add_argument("--recompile_limit", type=int, default=None,
                        help="dynamo's recompile limit for the compiled arms (torch 2.11 needs ~31 graphs for a "
                             "chunked Wan decoder, over its default 8: the rest would run eager)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random VAE in float32 (CPU smoke test)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.chunks + args.compile_chunks):
        parser.error(f"--chunks must be >= 1, got {args.chunks}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.recompile_limit is not None:
        torch._dynamo.config.recompile_limit = args.recompile_limit
    rows: list[dict[str, Any]] = []
    for name in args.models[:1] if args.tiny else args.models:
        rows.extend(run_model(name, args, device))
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "args": {k: v for k, v in vars(args).items() if k != "out"},
        "results": rows, "table": markdown_table(rows),
    }  # fmt: skip
    print(report["table"], flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
