"""The front of the engine in the HTTP process: the client of the engine core process and
the per-request output processing it does there. Torch-free."""
