import os
import sys
from pathlib import Path

# The tests import `tests.unit.*` helpers and spawn ranks that re-import test modules by name.
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
