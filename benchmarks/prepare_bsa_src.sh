#!/usr/bin/env bash
# Lay out mit-han-lab's Block-Sparse-Attention source (and the CUTLASS headers it pins) in third_party/bsa_src/,
# an ignored folder, so that a GPU call can carry it (`carry: ["third_party/bsa_src"]`) and build it there with
# benchmarks/build_bsa.sh. Run it on the CPU machine, from the repository root:
#
#     bash benchmarks/prepare_bsa_src.sh
#
# Sources: two bare git directories holding the upstream history (BSA_GITDIR, CUTLASS_GITDIR; the defaults are
# where this workplace's snapshot tool puts them; a plain `git clone --bare` of each repository works too).
# Pinned commits: Block-Sparse-Attention 49d6c39 and the CUTLASS commit it pins as its csrc/cutlass submodule
# (a75b4ac). Nothing from these trees goes into our package: they are only built, as upstream's own library.
#
# What is taken (their licences travel with them):
#   Block-Sparse-Attention: block_sparse_attn/ (the Python package), csrc/block_sparse_attn/ (kernels + binding),
#     setup.py, README.md, LICENSE (assets/ and block_sparse_tests/ are left out);
#   CUTLASS: include/ (cute/ + cutlass/, header-only, ~10 MiB) and LICENSE.txt. FlashAttention-2-based code needs
#     nothing else from CUTLASS (no tools/, no library sources).
set -euo pipefail

BSA_COMMIT="${BSA_COMMIT:-49d6c39}"
CUTLASS_COMMIT_PINNED="a75b4ac483166189a45290783cb0a18af5ff0ea5"
BSA_GITDIR="${BSA_GITDIR:-/work/.mirror/mit-han-lab+Block-Sparse-Attention/repo}"
CUTLASS_GITDIR="${CUTLASS_GITDIR:-/work/.mirror/NVIDIA+cutlass/repo}"
DEST="${DEST:-third_party/bsa_src}"

cd "$(git rev-parse --show-toplevel)"

for d in "$BSA_GITDIR" "$CUTLASS_GITDIR"; do
    if ! git -C "$d" rev-parse --git-dir >/dev/null 2>&1; then
        echo "error: $d is not a git directory. Set BSA_GITDIR / CUTLASS_GITDIR to clones of" >&2
        echo "  mit-han-lab/Block-Sparse-Attention and NVIDIA/cutlass (bare clones are fine)." >&2
        exit 1
    fi
done

bsa_full="$(git -C "$BSA_GITDIR" rev-parse --verify "${BSA_COMMIT}^{commit}")" || {
    echo "error: commit $BSA_COMMIT is not in $BSA_GITDIR" >&2; exit 1; }

# The CUTLASS commit comes from the submodule entry of the BSA tree itself (gitlink), not from a hard-coded hash.
cutlass_pin="$(git -C "$BSA_GITDIR" ls-tree "$bsa_full" csrc/cutlass | awk '$2 == "commit" {print $3}')"
if [[ -z "$cutlass_pin" ]]; then
    echo "warning: no csrc/cutlass gitlink in $BSA_COMMIT; using $CUTLASS_COMMIT_PINNED" >&2
    cutlass_pin="$CUTLASS_COMMIT_PINNED"
fi
if ! git -C "$CUTLASS_GITDIR" cat-file -e "${cutlass_pin}^{commit}" 2>/dev/null; then
    echo "error: the pinned CUTLASS commit $cutlass_pin is not in $CUTLASS_GITDIR" >&2
    echo "  (fetch a newer snapshot, or set CUTLASS_GITDIR to a clone holding it)" >&2
    exit 1
fi

# The folder must be ignored: it is carried to the GPU machine, never committed.
if ! git check-ignore -q "$DEST/setup.py"; then
    echo "error: $DEST is not ignored by git; add '/third_party/' to .gitignore first" >&2
    exit 1
fi

rm -rf "$DEST"
mkdir -p "$DEST/csrc/cutlass"
git -C "$BSA_GITDIR" archive --format=tar "$bsa_full" \
    block_sparse_attn csrc/block_sparse_attn setup.py README.md LICENSE | tar -x -C "$DEST"
# A snapshot may lack the large blobs of CUTLASS's media/ folder; git archive then complains about them although
# only include/ is asked for. Drop that one message and check below that every header arrived.
git -C "$CUTLASS_GITDIR" archive --format=tar "$cutlass_pin" include LICENSE.txt \
    2> >(grep -v "^error: invalid object .* for 'media/" >&2) | tar -x -C "$DEST/csrc/cutlass"
want="$(git -C "$CUTLASS_GITDIR" ls-tree -r --name-only "$cutlass_pin" include | wc -l)"
got="$(find "$DEST/csrc/cutlass/include" -type f | wc -l)"
if [[ "$want" != "$got" ]]; then
    echo "error: $got of $want CUTLASS headers extracted" >&2; exit 1
fi

cat >"$DEST/SOURCE.txt" <<EOF
mit-han-lab/Block-Sparse-Attention $bsa_full
NVIDIA/cutlass $cutlass_pin (csrc/cutlass, include/ only)
laid out by benchmarks/prepare_bsa_src.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF

echo "Block-Sparse-Attention: $bsa_full"
echo "CUTLASS (pinned gitlink): $cutlass_pin ($(git -C "$CUTLASS_GITDIR" log -1 --no-walk --format='%ci %s' "$cutlass_pin" 2>/dev/null))"
echo "kernel instantiation files upstream: $(ls "$DEST"/csrc/block_sparse_attn/src/*.cu | wc -l)"
du -sh "$DEST/csrc/cutlass/include/cute" "$DEST/csrc/cutlass/include/cutlass" "$DEST/csrc/block_sparse_attn" \
    "$DEST/block_sparse_attn"
echo "total: $(du -sh "$DEST" | cut -f1) in $(find "$DEST" -type f | wc -l) files (carry limit: 64 MiB with the tree)"
