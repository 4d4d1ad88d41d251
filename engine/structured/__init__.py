"""Constrained decoding (structured outputs, forced tool calls) over llguidance.

``grammar`` is torch-free (the HTTP layer validates constraints with it before a request reaches
the engine); ``compiler`` and ``matchers`` live with the engine core; the device side of the
token mask is ``engine.sampling.grammar_mask``.
"""
