"""The device step: the jitted model forward, sampling, weights on the mesh, multi-process following."""
