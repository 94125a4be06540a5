#!/usr/bin/env bash
# Build mit-han-lab's Block-Sparse-Attention (the paper's kernel, FlashAttention-2 based) on the GPU machine,
# pruned to what BLADE's benchmark needs: sm_90, bf16, head dims 64 and 128, non-causal, forward and backward
# (BSA_BACKWARD=0: forward only). Run from the repository root, after benchmarks/prepare_bsa_src.sh laid out
# third_party/bsa_src/ on the CPU machine and the call carried it:
#
#     run(command="bash benchmarks/build_bsa.sh && python3 benchmarks/attention.py ...",
#         carry=["third_party/bsa_src"])
#
# Result: build/bsa/lib/ holds block_sparse_attn/ (their Python package) and block_sparse_attn_cuda*.so; a .pth
# file in site-packages points at it (BSA_PTH=0 skips that; then use PYTHONPATH=build/bsa/lib), so
# `from block_sparse_attn import block_sparse_attn_func` works for every later python3 on that machine.
#
# Pruning: upstream's setup.py compiles 24 instantiation files (fwd/bwd x fp16/bf16 x hdim 32/64/128 x causal)
# for sm_80;90;100;110;120 + PTX. flash_api.cpp dispatches to all 24 specialisations, so the ones not built are
# defined in a generated stub file (build/bsa/bsa_pruned_stubs.cu) that raises a RuntimeError naming what this
# build lacks. Their sources are not modified (unless BSA_FIX_MASK_BOUNDS=1, below).
#
# Cost, measured by compiling these exact files with nvcc 13.0 for sm_90 on a 2-core Xeon (one job at a time, CPU
# seconds): fwd hdim128 ~230, fwd hdim64 ~170, bwd hdim128 ~140, bwd hdim64 ~140, flash_api.cpp ~45, stubs ~15;
# peak ~3.5 GB (fwd) / ~5 GB (bwd) RAM per job. In parallel on 16 cores the wall time is the hdim-128 forward:
# expect ~4 min (+ ~10 s setup and link), about 5 with a slower host.
#
# Environment:
#   BSA_SRC        source tree (default third_party/bsa_src)
#   BSA_BACKWARD   1 (default): also build the two bf16 non-causal backward files; they compile in parallel
#                  with the forward ones and are lighter than the hdim-128 forward, so they cost no wall time on
#                  16 cores. If the build fails with them, it is retried forward-only (ninja keeps the objects).
#                  0: forward only.
#   BSA_HDIMS      head dims to build, from 32 64 128 (default "64 128")
#   BSA_ARCH       CUDA arch, digits (default 90 -> -gencode arch=compute_90,code=sm_90)
#   BSA_CXX_STD    c++17 as upstream (set c++20 if a newer torch's headers demand it)
#   MAX_JOBS       parallel nvcc jobs (default: min(nproc, files to compile); each needs ~3-8 GB RAM)
#   BSA_FORCE      1: rebuild even if the extension is up to date
#   BSA_FIX_MASK_BOUNDS  1: apply the one-character fix of upstream's open PR #20 (mask_val treats max_block_idx
#                  as exclusive: `>` -> `>=` in csrc/block_sparse_attn/src/flash_blockmask.h) to the carried copy
#                  before building. Default 0 builds 49d6c39 as published: its iterators read one int past the
#                  end of a mask row when all of a row's blocks are kept; the value is discarded (the loop ends
#                  there), so results are the same either way, but for the last row of the last head that read
#                  can leave the allocation (PR #20 hit an illegal memory access, torch 2.11+cu130, CUDA 13.1).
#   BSA_EXTRA_NVCC_FLAGS  appended to nvcc's flags (e.g. "-Xptxas -v" to see registers and spills)
#   BSA_PTH        0: do not write the .pth file
#   OUT            if set (device tool), the built .so and build log are copied there when small enough
set -euo pipefail

T0=$(date +%s)
cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
ROOT="$PWD"
SRC="$ROOT/${BSA_SRC:-third_party/bsa_src}"
BUILD="$ROOT/build/bsa"
LIB="$BUILD/lib"
BSA_BACKWARD="${BSA_BACKWARD:-1}"
BSA_HDIMS="${BSA_HDIMS:-64 128}"
BSA_ARCH="${BSA_ARCH:-90}"
BSA_CXX_STD="${BSA_CXX_STD:-c++17}"
PY="${PYTHON:-python3}"

if [[ ! -f "$SRC/csrc/block_sparse_attn/flash_api.cpp" || ! -f "$SRC/csrc/cutlass/include/cute/tensor.hpp" ]]; then
    echo "error: $SRC is missing the Block-Sparse-Attention source or its CUTLASS headers." >&2
    echo "  On the CPU machine: bash benchmarks/prepare_bsa_src.sh; then carry third_party/bsa_src." >&2
    exit 1
fi
cat "$SRC/SOURCE.txt" 2>/dev/null || true

# torch.utils.cpp_extension runs $CUDA_HOME/bin/nvcc; a bare `which nvcc` can be a wrapper in /usr/local/bin.
if [[ -z "${CUDA_HOME:-}" ]]; then
    if [[ -x /usr/local/cuda/bin/nvcc ]]; then CUDA_HOME=/usr/local/cuda
    else CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"; fi
fi
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
echo "nvcc: $(nvcc --version | tail -1)   CUDA_HOME=$CUDA_HOME"
"$PY" -c "import torch, sys; print(f'python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})')"
command -v ninja >/dev/null || echo "warning: ninja not found; setuptools will compile serially" >&2

mkdir -p "$BUILD" "$LIB"
MASKH="$SRC/csrc/block_sparse_attn/src/flash_blockmask.h"
if [[ "${BSA_FIX_MASK_BOUNDS:-0}" == "1" ]]; then
    sed -i -E 's/(_idx) > max_block_idx \|\|/\1 >= max_block_idx ||/' "$MASKH"
    echo "BSA_FIX_MASK_BOUNDS=1: $(grep -c '_idx >= max_block_idx ||' "$MASKH") mask_val bounds made exclusive (PR #20)"
elif grep -q '_idx >= max_block_idx ||' "$MASKH"; then
    echo "note: $MASKH carries the PR #20 bounds fix (from an earlier BSA_FIX_MASK_BOUNDS=1)"
fi
export BSA_SRC_ABS="$SRC" BSA_BUILD_ABS="$BUILD" BSA_LIB_ABS="$LIB" BSA_BACKWARD BSA_HDIMS BSA_ARCH BSA_CXX_STD
export TORCH_CUDA_ARCH_LIST="${BSA_ARCH:0:1}.${BSA_ARCH:1}"

# ---------------------------------------------------------------------------------------------------------------
# The pruned build: our own small setup script (same compiler flags as upstream's setup.py, one arch, fewer files)
# and the stub file for the specialisations left out. gen_sources BACKWARD(0|1) writes build/bsa/sources.txt and
# build/bsa/bsa_pruned_stubs.cu.
gen_sources() {
BSA_BACKWARD="$1" "$PY" - <<'PYEOF'
import os
from pathlib import Path

src = Path(os.environ["BSA_SRC_ABS"])
build = Path(os.environ["BSA_BUILD_ABS"])
hdims = sorted({int(h) for h in os.environ["BSA_HDIMS"].split()})
assert set(hdims) <= {32, 64, 128}, hdims
directions = ["fwd"] + (["bwd"] if os.environ["BSA_BACKWARD"] == "1" else [])
kdir = src / "csrc/block_sparse_attn/src"

built, stubbed = [], []
for direction in ("fwd", "bwd"):
    for dtype, ctype in (("fp16", "cutlass::half_t"), ("bf16", "cutlass::bfloat16_t")):
        for hdim in (32, 64, 128):
            for causal in (False, True):
                name = f"flash_{direction}_block_hdim{hdim}_{dtype}_{'causal_' if causal else ''}sm80.cu"
                assert (kdir / name).is_file(), f"upstream file missing: {name}"
                keep = direction in directions and dtype == "bf16" and hdim in hdims and not causal
                (built if keep else stubbed).append((direction, ctype, dtype, hdim, causal, name))

lines = [
    "// Generated by benchmarks/build_bsa.sh: the kernel specialisations this pruned build leaves out.",
    '#include "namespace_config.h"',
    '#include "flash.h"',
    "#include <cutlass/numeric_types.h>",
    "#include <stdexcept>",
    "",
    "namespace FLASH_NAMESPACE {",
]
have = ", ".join(sorted({f"{d} bf16 hdim{h}" for d, _, _, h, _, _ in built}))
for direction, ctype, dtype, hdim, causal, _ in stubbed:
    what = f"{direction} {dtype} head dim {hdim}{' causal' if causal else ''}"
    lines += [
        "template<>",
        f"void run_mha_{direction}_block_<{ctype}, {hdim}, {'true' if causal else 'false'}>"
        f"(Flash_{direction}_params &, cudaStream_t) {{",
        f'    throw std::runtime_error("block_sparse_attn_cuda was built by benchmarks/build_bsa.sh without {what} '
        f'(built: {have}, non-causal)");',
        "}",
    ]
lines.append("}  // namespace FLASH_NAMESPACE")
stub = build / "bsa_pruned_stubs.cu"
text = "\n".join(lines) + "\n"
if not stub.is_file() or stub.read_text() != text:  # keep the mtime (and ninja's cache) when unchanged
    stub.write_text(text)

sources = [str(src / "csrc/block_sparse_attn/flash_api.cpp")] + [str(kdir / b[-1]) for b in built] + [str(stub)]
listing = build / "sources.txt"
if not listing.is_file() or listing.read_text() != "\n".join(sources) + "\n":
    listing.write_text("\n".join(sources) + "\n")
print(f"pruned build: {len(built)} kernel files + flash_api.cpp + stubs ({len(stubbed)} specialisations stubbed)")
for b in built:
    print("  compile", b[-1])
(build / "built_backward").write_text("1\n" if "bwd" in directions else "0\n")
PYEOF
}

cat >"$BUILD/setup_pruned.py" <<'PYEOF'
# Generated by benchmarks/build_bsa.sh: builds block_sparse_attn_cuda from the pruned source list.
import os
from pathlib import Path

from setuptools import setup
import torch.utils.cpp_extension as cpp_extension
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

if cpp_extension.CUDA_HOME is None and os.environ.get("CUDA_HOME"):  # a CPU-only torch (dry runs off the GPU)
    cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]

src = Path(os.environ["BSA_SRC_ABS"])
build = Path(os.environ["BSA_BUILD_ABS"])
arch = os.environ["BSA_ARCH"]
std = os.environ["BSA_CXX_STD"]
sources = (build / "sources.txt").read_text().split()
nvcc_flags = [
    "-O3", f"-std={std}",
    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
    "-gencode", f"arch=compute_{arch},code=sm_{arch}",
] + os.environ.get("BSA_EXTRA_NVCC_FLAGS", "").split()
setup(
    name="block_sparse_attn_pruned",
    ext_modules=[CUDAExtension(
        name="block_sparse_attn_cuda",
        sources=sources,
        include_dirs=[str(src / "csrc/block_sparse_attn"), str(src / "csrc/block_sparse_attn/src"),
                      str(src / "csrc/cutlass/include")],
        extra_compile_args={"cxx": ["-O3", f"-std={std}"], "nvcc": nvcc_flags},
    )],
    cmdclass={"build_ext": BuildExtension},
)
PYEOF

so_now() { ls "$LIB"/block_sparse_attn_cuda*.so 2>/dev/null | head -1 || true; }

# run_build: compile + link with ninja through setuptools; full log in build/bsa/build.log, one console line per
# ninja step ("[2/6] .../flash_fwd_block_hdim128_bf16_sm80.cu"). Returns the build's exit status.
run_build() {
    local n_files cores rc t1
    n_files=$(wc -l <"$BUILD/sources.txt")
    cores=$(nproc)
    export MAX_JOBS="${BSA_MAX_JOBS:-$(( n_files < cores ? n_files : cores ))}"
    echo "MAX_JOBS=$MAX_JOBS (cores: $cores, files: $n_files), TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
    t1=$(date +%s)
    set +e
    (cd "$BUILD" && "$PY" setup_pruned.py build_ext --build-lib "$LIB" --build-temp "$BUILD/temp" 2>&1) \
        | tee "$BUILD/build.log" \
        | { grep -E --line-buffered "^\[[0-9]+/[0-9]+\]|error|FAILED" \
            | sed -u -E 's/^(\[[0-9]+\/[0-9]+\]) .* -c ([^ ]+) -o .*/\1 \2/'; true; }
    rc=${PIPESTATUS[0]}
    set -e
    echo "compile + link: $(( $(date +%s) - t1 )) s (rc $rc)"
    if (( rc != 0 )); then
        echo "BUILD FAILED; full log: build/bsa/build.log, its end:" >&2
        tail -60 "$BUILD/build.log" >&2
        if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then cp "$BUILD/build.log" "$OUT/bsa_build.log"; fi
    fi
    return "$rc"
}

BSA_MAX_JOBS="${MAX_JOBS:-}"
gen_sources "$BSA_BACKWARD"
so="$(so_now)"
if [[ -n "$so" && "${BSA_FORCE:-0}" != "1" ]] \
    && [[ -z "$(find "$SRC/csrc" "$BUILD/bsa_pruned_stubs.cu" "$BUILD/sources.txt" -newer "$so" -type f | head -1)" ]]; then
    echo "up to date: $so"
elif ! run_build; then
    if [[ "$BSA_BACKWARD" == "1" ]]; then
        echo "retrying forward-only (the forward objects already built are reused)" >&2
        BSA_BACKWARD=0
        gen_sources 0
        run_build || exit 1
    else
        exit 1
    fi
fi
so="$(so_now)"
[[ -n "$so" ]] || { echo "error: no block_sparse_attn_cuda*.so in $LIB" >&2; exit 1; }
ls -la "$so"

# Their Python package beside the extension: one folder to put on the path.
rm -rf "$LIB/block_sparse_attn"
cp -r "$SRC/block_sparse_attn" "$LIB/block_sparse_attn"
if [[ "${BSA_PTH:-1}" == "1" ]]; then
    site="$("$PY" -c 'import site; print(site.getsitepackages()[0])')"
    if echo "$LIB" >"$site/blade_bsa_build.pth" 2>/dev/null; then
        echo "importable through $site/blade_bsa_build.pth -> $LIB"
    else
        echo "note: could not write to $site; use PYTHONPATH=$LIB" >&2
    fi
fi
export PYTHONPATH="$LIB${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
    cp "$BUILD/build.log" "$OUT/bsa_build.log" 2>/dev/null || true
    # Stripped (~13 MiB with the backward, under the 16 MiB a returned file may have): a later call can carry it
    # back instead of rebuilding (same image, same torch).
    if command -v strip >/dev/null && strip --strip-unneeded -o "$OUT/$(basename "$so")" "$so" \
        && (( $(stat -c %s "$OUT/$(basename "$so")") < 16000000 )); then
        echo "stripped copy for \$OUT: $(stat -c %s "$OUT/$(basename "$so")") bytes"
    else
        rm -f "$OUT/$(basename "$so")"
    fi
fi

# ---------------------------------------------------------------------------------------------------------------
# Import check and a small correctness smoke: [1, 2, 512, D] bf16 for each built head dim, a random 4x4 block mask
# with an empty query-block row, against a dense masked softmax in fp32 (forward, and dq/dk/dv when the backward
# was built); then the project's adapter, reported but not fatal (it is optional).
"$PY" - <<'PYEOF'
import math
import os
import sys
import time

import torch

t0 = time.time()
import block_sparse_attn_cuda  # noqa: F401
from block_sparse_attn import block_sparse_attn_func

print(f"import OK: {block_sparse_attn_cuda.__file__} ({time.time() - t0:.1f} s)")
assert torch.cuda.is_available(), "no GPU visible"
backward = open(os.path.join(os.environ["BSA_BUILD_ABS"], "built_backward")).read().strip() == "1"
dev = "cuda"
B, H, L, BS = 1, 2, 512, 128
nb = L // BS


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def reference(q, k, v, mask):
    """fp32 dense softmax over the kept 128x128 tiles; rows that keep nothing give zeros."""
    tok = mask.repeat_interleave(BS, -2).repeat_interleave(BS, -1)
    s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    has = tok.any(-1, keepdim=True)
    p = torch.softmax(torch.where(has, s.masked_fill(~tok, float("-inf")), torch.zeros_like(s)), -1) * has
    return p @ v.float()


ok = True
for D in sorted(int(h) for h in os.environ.get("BSA_HDIMS", "64 128").split()):
    g = torch.Generator(device="cpu").manual_seed(D)
    q, k, v, do = (torch.randn(B, H, L, D, generator=g).to(dev, torch.bfloat16) for _ in range(4))
    mask = torch.rand(B, H, nb, nb, generator=g) < 0.5
    mask[0, 0, 1] = False  # an empty query-block row: the kernel writes zeros there
    mask[0, 1, 2] = True   # a full row
    mask = mask.to(dev)
    leaves = [t.detach().clone().requires_grad_(backward) for t in (q, k, v)]
    # The library in its own layout: varlen [B*L, H, D]; head_mask_type 1 = block-sparse head (the library
    # numbers the ones 1..n itself, and head h then reads base_blockmask[:, h]); base_blockmask
    # [B, n_sparse_heads, ceil(Lq/128), ceil(Lk/128)] (0/1 or bool; converted by the library).
    unpad = lambda x: x.transpose(1, 2).reshape(B * L, H, D)  # noqa: E731
    cu = torch.arange(B + 1, device=dev, dtype=torch.int32) * L
    out = block_sparse_attn_func(*(unpad(t) for t in leaves), cu, cu,
                                 torch.ones(H, device=dev, dtype=torch.int32), None, mask, L, L, 0.0,
                                 deterministic=False, softmax_scale=None, is_causal=False)
    out = out.reshape(B, L, H, D).transpose(1, 2)
    ref_leaves = [t.detach().float().requires_grad_(backward) for t in (q, k, v)]
    ref = reference(*ref_leaves, mask)
    err = rel(out, ref)
    empty_max = out[0, 0, BS:2 * BS].abs().max().item()
    good = err < 2e-2 and empty_max == 0.0 and bool(torch.isfinite(out).all())
    line = f"smoke D={D}: fwd rel err {err:.2e}, empty row max |out| {empty_max:.1e}"
    if backward:
        grads = torch.autograd.grad(out, leaves, do)
        ref_grads = torch.autograd.grad(ref, ref_leaves, do.float())
        gerr = [rel(a, b) for a, b in zip(grads, ref_grads)]
        good &= max(gerr) < 2e-2
        line += ", bwd rel err dq/dk/dv " + "/".join(f"{e:.2e}" for e in gerr)
    ok &= good
    print(line + ("  OK" if good else "  MISMATCH"), flush=True)

sys.path.insert(0, os.getcwd())
try:
    from blade.attention.kernels.bsa import bsa_block_sparse_attention

    with torch.no_grad():
        a = bsa_block_sparse_attention(q, k, v, mask)
        err = rel(a, reference(q, k, v, mask))
    print(f"adapter bsa_block_sparse_attention D={D}: rel err {err:.2e}  {'OK' if err < 2e-2 else 'MISMATCH'}")
except Exception as exc:  # noqa: BLE001
    import traceback

    where = traceback.extract_tb(exc.__traceback__)[-1]
    print(f"adapter bsa_block_sparse_attention: FAILED {type(exc).__name__}: {exc} "
          f"(at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})")
sys.exit(0 if ok else 1)
PYEOF
echo "build_bsa.sh done in $(( $(date +%s) - T0 )) s"
