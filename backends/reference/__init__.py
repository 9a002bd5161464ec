"""The NumPy reference backend: each operation written for clarity in float64, one module per
operation, with the interface of the fast backends and no attempt at speed."""
