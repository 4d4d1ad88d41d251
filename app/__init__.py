"""The HTTP service: OpenAI-compatible routes over an EngineClient. Imports no torch."""

__version__ = "0.1.0"
