"""Generated gRPC stubs for engine.v1 (scripts/gen_protos.py). Do not edit."""
