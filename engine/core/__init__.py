"""The engine loop and its host-side bookkeeping (plain Python/numpy: scheduler, block manager, requests)."""
