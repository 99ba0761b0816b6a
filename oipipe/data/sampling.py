"""The seeded sampling key of the data stages: download's per-class cap and prepare's re-split
both order images by it, so a sample depends on the seed and the image alone."""

from __future__ import annotations

import hashlib


def rank(seed: int, image_id: str, purpose: str = "") -> str:
    """A seeded, order-independent sampling key: adding a class or an image never reshuffles the
    others. `purpose` keeps two uses of one seed independent (`"split"`: prepare's split)."""
    salt = f"{purpose}:" if purpose else ""
    return hashlib.sha256(f"{salt}{seed}:{image_id}".encode()).hexdigest()
