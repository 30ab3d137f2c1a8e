"""Launch and tuning parameters of the compiled backends: the one place (as stumpy's config.py).

The facades read these at each call, so assigning one here (``_config.NUMBA_PARALLEL = "off"``,
or ``monkeypatch.setattr`` in a test) takes effect at the next call. None of them changes a
result beyond the rounding of a differently blocked product; each is measured where it is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# ---- cython (_backend_cython.py)
#: the per-step products of blocks of SMM_MIN_ROWS..SMM_MAX_ROWS rows use the kernels' own small
#: matrix product (as _common_cy.pxd's use_smm decides: the same numbers, compiled in there), which
#: reads the weights transposed; so does a block of one row where the instruction-set clones are
#: built (_backend_cython.smm_rows)
CYTHON_SMM_MIN_ROWS, CYTHON_SMM_MAX_ROWS = 4, 64
#: rows per block below which the recurrences are not split over threads
CYTHON_MIN_ROWS_PER_THREAD = 4
#: the per-position policy passes are split from this many score entries (T·B·V) on
CYTHON_PARALLEL_MIN_ENTRIES = 1 << 17
#: the stacked heads are padded with zero rows to a multiple of this (aligned rows of logits; BLAS
#: runs faster on them)
CYTHON_HEAD_PAD = 16

# ---- numba (_backend_numba.py)
#: the input projection goes through the (V, 4H) table when B·T ≥ this × V
NUMBA_TABLE_MIN_POSITIONS = 1.0
#: the training passes compute (and backpropagate through) only the table rows of the tokens the batch
#: reads when they are at most this fraction of the vocabulary (B = 1, T = 64, V = 64 reads ~40)
NUMBA_TABLE_ROWS_FRACTION = 0.75
#: "auto": the recurrences (rollout, LSTM forward and backward) run row blocks on Numba's threads
#: when there are ≥ 2 of them and the BLAS thread count can be held to 1 meanwhile; "on" also
#: without that control; "off": one block (BLAS threads each product). Env RLHF_REF_NUMBA_PARALLEL.
NUMBA_PARALLEL = os.environ.get("RLHF_REF_NUMBA_PARALLEL", "auto")
#: (min, max): the per-step products of blocks of min..max rows (and ≥ 64 columns) use the kernels'
#: own register-tiled product (``_lstm_nb.smm``) instead of BLAS, which packs the weights on every call.
#: Measured float32, 1 thread (GFLOP/s, smm vs OpenBLAS): 2 rows 60 vs 105; 16 × 128 × 576: 97 vs 55;
#: 64 × 256 × 1152: 105 vs 87; 256 × 512 × 2304: 106 vs 97–101; 1024 × 128 × 576: 89 vs 102
#: (``_lstm_nb.use_smm`` also asks for a full 64-column tile and rows·K ≤ 2^18)
NUMBA_SMM_ROWS = (4, 256)
#: the rollout's [W_hhᵀ | Wcᵀ] is padded to a width that is a multiple of this: OpenBLAS's B = 1
#: product is then ~30% faster (measured)
NUMBA_ROLLOUT_WIDTH_PAD = 16


# ---- cuda (_rollout_cuda.py)
@dataclass
class CudaConfig:
    """Launch sizes. 0 means "decide from the batch and the device"; env vars override when set."""
    tpb: int = 0            # threads per block (RLHF_REF_CUDA_TPB); default 128
    rows: int = 0           # rows per block (RLHF_REF_CUDA_ROWS); default: about 4 blocks per SM, ≤ 8 rows
    max_blocks: int = 0     # cap on the grid; the kernel strides over the remaining tiles (RLHF_REF_CUDA_MAX_BLOCKS)


#: the CUDA kernels' launch sizes (``_rollout_cuda.launch_config`` reads it)
CUDA = CudaConfig()
