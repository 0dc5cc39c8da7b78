"""Where the test data lives, and the model ids the tests' catalog names."""

from __future__ import annotations

import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA = REPO_ROOT / "tests" / "data"
TEST_MODELS = DATA / "models.json"  # the sandbox's catalog in the process tests
TEE = "deepseek-ai/DeepSeek-V3.2-TEE"
NON_TEE = "deepseek-ai/DeepSeek-V3"
CONFIDENTIAL = frozenset(m["id"] for m in json.loads(TEST_MODELS.read_text())["models"])
