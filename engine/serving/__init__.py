"""The front ends: gRPC servicer, OpenAI-compatible HTTP API, their shared admission gate and request building."""
