"""Where dpo keeps what it builds: the bottom of the package, importing nothing of dpo."""
import os
from pathlib import Path


def cache_root() -> Path:
    """Where dpo keeps what it builds once and reuses (demo assets, reference log-probs,
    tokenized pairs): ``$DPO_CACHE_DIR``, else ``~/.cache/dpo``."""
    return Path(os.environ.get("DPO_CACHE_DIR") or Path.home() / ".cache" / "dpo")
