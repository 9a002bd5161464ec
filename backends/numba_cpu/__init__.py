"""The Numba CPU backend: parallel loops over NumPy arrays.

Shared machinery, below every operation:

- :mod:`.runtime`: compile options and Numba's on-disk cache, the threading layer, thread counts,
  the serial twins of the parallel kernels, and the entry-point wrapper that picks one of them.
- :mod:`.lines`: LLVM intrinsics for whole-cache-line element kernels (streaming stores) and column
  sums in registers; :mod:`.scalars`: per-channel formulas compiled for kernels, dtype conversions;
  :mod:`.reductions`: fixed-order sums, moments and merges; :mod:`.elements`: the affine and
  gradient element passes and their parameter tables.
- :mod:`.tiling`: how work is cut (chunks, segments, blocks) and which path a shape takes.

Per operation, an entry module named after it (:mod:`.batch_norm`) and its loop files beside it
(``batch_norm_channels_first``, ``batch_norm_short_rows``, ``batch_norm_channels_last``).
"""
