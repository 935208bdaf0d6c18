"""Pydantic models of the HTTP API, with OpenAI's field names."""
