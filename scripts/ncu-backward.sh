#!/usr/bin/env bash
# Nsight Compute report of the CUDA attention kernels, by default at the main shape (12 heads x
# 49152 tokens, 77 of 768 tiles, D=128, bf16): one forward and one backward, profiled after a
# warm-up call.  Needs an installed vsa_nd (scripts/gpu-check.sh installs it) and ncu.
#
#   [KERNELS=regex SKIP=n COUNT=n NCU_GRID=T,H,W NCU_HEADS=n NCU_HEAD_DIM=d NCU_TOPK=k] \
#       bash scripts/ncu-backward.sh [extra ncu arguments...]
#
# NCU_GRID, NCU_HEADS, NCU_HEAD_DIM and NCU_TOPK pick another shape (4x4x4 tiles), e.g. Wan2.1
# 480p with 24 heads of 64: NCU_GRID=21,30,52 NCU_HEADS=24 NCU_HEAD_DIM=64 NCU_TOPK=78.
#
# Report on stdout.  KERNELS picks kernels by name (default: the sm_90a forward and both backward
# passes), of whose launches ncu skips SKIP and profiles COUNT (default 3 and 3).  The driver
# makes a VSA forward, then two rounds of a block-sparse forward and a backward; a backward that
# hands dS over launches its two passes once per chunk (one head per chunk at the benchmark
# shapes: 12 or 24 launches of each), so count the launches to skip for the kernels wanted, e.g.
# KERNELS=dkdv SKIP=1 COUNT=1 for one dK/dV launch of the second backward when it is one chunk.
set -u -o pipefail
cd "$(dirname "$0")/.."
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
KERNELS=${KERNELS:-sm90}
SKIP=${SKIP:-3}
COUNT=${COUNT:-3}
export NCU_GRID=${NCU_GRID:-12,64,64} NCU_HEADS=${NCU_HEADS:-12} NCU_HEAD_DIM=${NCU_HEAD_DIM:-128} NCU_TOPK=${NCU_TOPK:-77}
DRIVER=$(mktemp /tmp/vsa_nd-ncu.XXXXXX.py)
trap 'rm -f "$DRIVER"' EXIT
cat > "$DRIVER" <<'PY'
import os
import cupy, numpy as np
import vsa_nd
from vsa_nd._xp import BFLOAT16
from vsa_nd.backends import cuda_attention

grid = tuple(int(n) for n in os.environ["NCU_GRID"].split(","))
heads, head_dim, topk = (int(os.environ[n]) for n in ("NCU_HEADS", "NCU_HEAD_DIM", "NCU_TOPK"))
plan = vsa_nd.tile_plan(grid, device="cuda:0")
rng = cupy.random.default_rng(1)
shape = (1, heads, plan.padded_len, head_dim)
q, k, v, dout = (rng.standard_normal(shape, dtype=np.float32).astype(BFLOAT16) for _ in range(4))
out, ctx = vsa_nd.video_sparse_attn(q, k, v, topk, plan.variable_block_sizes, return_context=True)
print("ncu driver:", grid, heads, "heads, D =", head_dim, ", top", topk, "of", plan.num_blocks)
for _ in range(2):  # the first call compiles and warms up; ncu skips its launches
    vsa_nd.block_sparse_attn(q, k, v, plan.variable_block_sizes, ctx.q2k_idx, ctx.q2k_num, check_indices=False)
    cuda_attention.block_sparse_bwd(dout, q, k, v, ctx.out, ctx.lse, ctx.q2k_idx, ctx.q2k_num, ctx.q_block_sizes,
                                    ctx.kv_block_sizes, ctx.scale, ctx.coarse, None, None, None, None)
cupy.cuda.runtime.deviceSynchronize()
PY
"$NCU" --kernel-name regex:"$KERNELS" --launch-skip "$SKIP" --launch-count "$COUNT" \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
    --section WarpStateStats --section Occupancy --section LaunchStats --section InstructionStats \
    "$@" python3 "$DRIVER"
