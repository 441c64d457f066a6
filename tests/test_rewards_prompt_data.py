"""Shipped real-model prompt sets: every MANIFEST.json entry's file exists, hashes and counts match,
its licence text is shipped, and its source is pinned to a commit."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

DIR = Path(__file__).resolve().parents[1] / "bench" / "data" / "prompts"
MANIFEST = json.loads((DIR / "MANIFEST.json").read_text())
LICENCES = {"partiprompts": "Apache-2.0", "geneval": "MIT", "t2i-compbench-train": "MIT", "t2i-compbench-val": "MIT"}


def test_required_sets_present():
    assert set(LICENCES) <= set(MANIFEST)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_manifest_entry(name):
    e = MANIFEST[name]
    raw = (DIR / e["file"]).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == e["sha256"]
    lines = [ln for ln in raw.decode("utf-8").splitlines() if ln.strip()]
    if e["file"].endswith(".jsonl"):
        rows = [json.loads(ln) for ln in lines]
        assert all(isinstance(r.get("prompt"), str) and r["prompt"].strip() for r in rows)
    assert len(lines) == e["count"]
    assert e["licence"] == LICENCES.get(name, e["licence"])
    assert (DIR / e["licence_file"]).is_file()
    assert e["source"]["repo"].startswith("https://github.com/") and len(e["source"]["commit"]) == 40


def test_known_sizes():
    assert MANIFEST["partiprompts"]["count"] == 1632
    assert MANIFEST["geneval"]["count"] == 553
    assert MANIFEST["t2i-compbench-val"]["count"] == 8 * 300
