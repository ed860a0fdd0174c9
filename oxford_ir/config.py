"""Where the Hydra configs live: ``conf/`` at the repository root (``OXFORD_IR_CONFIG_DIR`` overrides).

Entry points pass this absolute path to ``hydra.main``: a relative ``config_path`` would make
Hydra look for an importable ``conf`` package when the code runs as a console script.
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_DIR = Path(os.environ.get("OXFORD_IR_CONFIG_DIR") or Path(__file__).resolve().parents[1] / "conf")
