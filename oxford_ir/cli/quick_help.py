"""``--help`` in well under a second: Hydra's help lists config groups only when the help template shows them.

Hydra fills every placeholder of a help template before printing it, and two of them, the listings of all config
groups with their options (``$APP_CONFIG_GROUPS``, ``$HYDRA_CONFIG_GROUPS``), compose every option of every group:
about 150 compositions, seconds on a busy machine. The commands' own templates (conf/hydra/help/*.yaml) list their
groups themselves, so :func:`quick_help` makes Hydra fill a placeholder only when the template uses it; a template
that shows the listings (``--hydra-help``) gets them as before.
"""

from __future__ import annotations

import string
from typing import Any


class _OnDemand(dict):
    """The template's values, each computed when the template asks for it."""

    def __init__(self, **makers: Any) -> None:
        super().__init__()
        self.makers = makers

    def __missing__(self, key: str) -> str:
        value = self[key] = self.makers[key]()
        return value


def quick_help() -> None:
    """Patch Hydra's help rendering once per process (Hydra 1.3's ``Hydra.get_help``; a no-op when it is absent)."""
    try:
        from hydra._internal.hydra import Hydra
    except ImportError:
        return
    original = getattr(Hydra, "get_help", None)
    if original is None or getattr(original, "on_demand", False):
        return

    def get_help(self: Any, help_cfg: Any, cfg: Any, args_parser: Any, resolve: bool) -> str:
        from omegaconf import OmegaConf

        def groups(hydra_groups: bool):
            return lambda: self.format_config_groups(lambda x: (x.startswith("hydra/") or x == "hydra") == hydra_groups)

        values = _OnDemand(
            FLAGS_HELP=lambda: self.format_args_help(args_parser),
            HYDRA_CONFIG_GROUPS=groups(True),
            APP_CONFIG_GROUPS=groups(False),
            CONFIG=lambda: OmegaConf.to_yaml(cfg, resolve=resolve),
        )
        return string.Template(help_cfg.template).substitute(values)

    get_help.on_demand = True  # type: ignore[attr-defined]
    Hydra.get_help = get_help
