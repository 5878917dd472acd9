"""Disk space: how much a folder's disk has left, and the errors that mean it has none.

The journal (exit 3 when its disk is full) and the after-arrival steps (they wait for
room) both ask; neither says a path in its messages beyond what the user configured.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})  # a full disk or quota: wait for room, not a failure


def free_bytes(folder: Path) -> int | None:
    """Bytes free for us on the disk holding `folder` (or its nearest existing parent); None if unknown."""
    for place in (folder, *folder.parents):
        try:
            return shutil.disk_usage(place).free
        except FileNotFoundError:
            continue
        except OSError:
            return None
    return None
