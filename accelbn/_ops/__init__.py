"""One module per operation: its functions, checked once and dispatched to one backend, and its layer."""
