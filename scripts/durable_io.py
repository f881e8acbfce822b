"""fsync helpers, so that a file or directory a script reports as written survives a crash or power loss."""
from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """Makes the directory's entries (a file created or renamed into it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsyncs every file and directory under `root` (deepest first), then `root` itself."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(folder)
