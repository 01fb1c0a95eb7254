"""2:4 prefill through cuSPARSELt (``torch._cslt_*``), the backend behind ``to_sparse_semi_structured``.

The weight is compressed once (``_cslt_compress``); with ``search=True`` the best algorithm is searched
once per power-of-two bucket of token counts (``_cslt_sparse_mm_search``), so a call pays only
``_cslt_sparse_mm``. The search is off by default: on an H100 it left the CUDA context in an
illegal-instruction state (kernels/README.md), and the whole path is opt-in until its GPU test passes. Calling the ops directly skips the tensor-subclass dispatch of
``SparseSemiStructuredTensor`` and never picks CUTLASS (which refuses sm_90); the cuSPARSELt plan
setup that torch does inside every ``_cslt_sparse_mm`` call remains.
"""

from __future__ import annotations

import torch

_HALF = (torch.float16, torch.bfloat16)


def available() -> bool:
    return torch.cuda.is_available() and torch.backends.cusparselt.is_available()


def supports(shape: tuple[int, int], dtype: torch.dtype) -> bool:
    """cuSPARSELt wants fp16/bf16 weights with both dimensions multiples of 16 (torch's constraint)."""
    return dtype in _HALF and shape[0] % 16 == 0 and shape[1] % 16 == 0


class CusparseltWeight:
    """A 2:4 ``[N, K]`` CUDA weight compressed for cuSPARSELt, with algorithm ids cached per token count."""

    def __init__(self, dense: torch.Tensor, search: bool = False) -> None:
        self.packed = torch._cslt_compress(dense)
        self.shape = tuple(dense.shape)
        self.search = search
        self.alg_ids: dict[int, int] = {}

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [M, K] @ W.T + bias`` -> ``[M, N]``; M is padded to a multiple of 8 as cuSPARSELt needs."""
        m = x.shape[0]
        pad = -m % 8
        xp = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x
        # One search per power-of-two bucket of M, so varying prompt lengths do not each pay for one.
        bucket = 1 << (m + pad - 1).bit_length()
        alg = self.alg_ids.get(bucket)
        if alg is None:
            alg = 0
            if self.search and not torch.cuda.is_current_stream_capturing():
                try:
                    alg = torch._cslt_sparse_mm_search(self.packed, xp.t(), bias=bias, transpose_result=True)
                except RuntimeError:  # no search in this torch/cuSPARSELt build: default algorithm
                    pass
                self.alg_ids[bucket] = alg
        # cuSPARSELt computes W @ xp.T; transpose_result returns it as [M, N] without a copy.
        try:
            y = torch._cslt_sparse_mm(self.packed, xp.t(), bias=bias, transpose_result=True, alg_id=alg)
        except RuntimeError:
            if alg == 0:
                raise
            self.alg_ids[bucket] = 0  # an id searched at another M of the bucket may not exist at this M
            y = torch._cslt_sparse_mm(self.packed, xp.t(), bias=bias, transpose_result=True, alg_id=0)
        return y[:m] if pad else y
