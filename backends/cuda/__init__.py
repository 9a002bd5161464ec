"""The CUDA backend for CuPy arrays: :mod:`.launcher` compiles CUDA sources with NVRTC through
``cupy.RawModule`` and launches their kernels; each operation has a ``.cu`` source (sharing
``common.cuh``: type conversions, packs, strides, block reductions) and a module of the same name
that hands its source and kernel names to the launcher."""
