"""The project's copies of ``../shared`` material stay true to it.

``tests/data/SHARED-COPIES.sha256`` records, in ``sha256sum`` format, the hash of every shared
original at the time it was copied (paths relative to ``../shared``). Two checks use it:

* always, with or without ``../shared``: every copy in the repository hashes as its original
  did, so a copy edited by hand fails on a fresh machine too;
* where ``../shared`` is present (CI lays it beside the clone): every original still hashes as
  recorded, so a change upstream in ``shared/`` is noticed instead of silently diverging.
  Under CI its absence is a failure, never a skip.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
MANIFEST = REPO / "tests" / "data" / "SHARED-COPIES.sha256"


def _manifest() -> dict[str, str]:
    rows = (line.split(maxsplit=1) for line in MANIFEST.read_text().splitlines() if line)
    return {path.strip(): digest for digest, path in rows}


def _copies(original: str) -> list[Path]:
    """Where the repository keeps verbatim copies of one shared file."""
    if original == "tee-models.json":
        return [REPO / "sandbox" / "data" / "tee-models.json"]
    if original.startswith("tdx-vectors/"):
        return [REPO / "tests" / "data" / "tdx" / original.removeprefix("tdx-vectors/")]
    if original.startswith("gpu-vectors/roots/"):
        # The pinned NVIDIA roots ship with the package too (catalog/attestation/nvidia_roots).
        shipped = REPO / "catalog" / "attestation" / "nvidia_roots" / Path(original).name
        return [REPO / "tests" / "data" / original, shipped]
    if original.startswith("gpu-vectors/"):
        return [REPO / "tests" / "data" / original]
    raise AssertionError(f"no copy known for {original}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("original", sorted(_manifest()))
def test_copy_hashes_as_its_original_did(original: str) -> None:
    for copy in _copies(original):
        assert _sha256(copy) == _manifest()[original], f"{copy.relative_to(REPO)} changed"


def test_every_copied_vector_is_in_the_manifest() -> None:
    listed = _manifest()
    for path in (REPO / "tests" / "data" / "tdx").rglob("*"):
        if path.is_file() and path.name != "SOURCE.md":  # SOURCE.md is ours: where they came from
            assert f"tdx-vectors/{path.relative_to(REPO / 'tests' / 'data' / 'tdx')}" in listed
    for path in (REPO / "tests" / "data" / "gpu-vectors").rglob("*"):
        if path.is_file():
            assert str(path.relative_to(REPO / "tests" / "data")) in listed


def test_test_catalog_is_the_shipped_one_plus_test_models() -> None:
    shipped = json.loads((REPO / "sandbox" / "data" / "tee-models.json").read_text())["models"]
    tests = json.loads((REPO / "tests" / "data" / "models.json").read_text())["models"]
    assert [m for m in tests if not m["id"].startswith("test/")] == shipped


def test_shared_originals_unchanged_since_copied() -> None:
    if not SHARED.exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI must have ../shared beside the clone ({SHARED} is missing)")
        pytest.skip("no ../shared beside this checkout (the copies were still checked above)")
    for original, digest in _manifest().items():
        assert _sha256(SHARED / original) == digest, f"shared/{original} changed: copy it again"
    for folder in ("tdx-vectors", "gpu-vectors"):
        on_disk = {str(p.relative_to(SHARED)) for p in (SHARED / folder).rglob("*") if p.is_file()}
        assert on_disk <= set(_manifest()), f"new files in shared/{folder}: copy and list them"
