"""The core the operations share: array libraries, argument checks, dtypes, strided views, the
backend registry and the layer base class."""
