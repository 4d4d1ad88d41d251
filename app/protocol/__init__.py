"""Pydantic models of the OpenAI requests and responses, one module per endpoint."""
