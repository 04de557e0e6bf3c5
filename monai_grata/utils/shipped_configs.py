"""MONAI's "a config runs code" notice, left out for the configs this package ships.

``python -m monai.bundle run --config_file FILE`` warns, before it reads FILE, that a bundle config is code
(any ``_target_`` is imported and called, any ``$`` value is evaluated) and should only be run when trusted.
For the two bundles shipped in this repository (``bundles/grata``, ``bundles/spinalcord_gm``) the user has
already trusted that code by installing the package, so the notice is noise on every run of the main job. It is
printed before any config is read, so nothing in a bundle can filter it: the package installs a one-line
``.pth`` file (:data:`PTH_NAME`, written by ``setup.py``) that adds :func:`ignore_shipped_config_notice`'s filter
at interpreter start. The filter matches the notice only when every config file given is a ``.json``/``.yaml``
file under ``bundles/grata/configs/`` or ``bundles/spinalcord_gm/configs/``; any other config, or a list that
mixes one in, still prints it. Uninstalling the package removes the ``.pth`` file.

This module imports only the standard library: ``setup.py`` loads it to write the ``.pth`` line.
"""

from __future__ import annotations

import warnings

__all__ = ["PTH_NAME", "SHIPPED_CONFIG_NOTICE", "ignore_shipped_config_notice", "pth_line"]

PTH_NAME = "monai_grata-shipped-configs.pth"
"""File name of the ``.pth`` file installed into site-packages."""

_SHIPPED_CONFIG = r"[^,'\"\[\]]*bundles[/\\]+(?:grata|spinalcord_gm)[/\\]+configs[/\\]+[\w.-]+\.(?:json|ya?ml)"
_QUOTED = rf"['\"]{_SHIPPED_CONFIG}['\"]"
SHIPPED_CONFIG_NOTICE = rf"parsing config_file (?:{_SHIPPED_CONFIG}|\[{_QUOTED}(?:, {_QUOTED})*\]): any"
"""Regular expression (``warnings.filterwarnings`` matches it at the start of the message) for MONAI's notice
about one shipped config file, or a list of them (``--config_file "['a.json','b.json']"``)."""


def ignore_shipped_config_notice() -> None:
    """Ignore MONAI's config notice for the shipped bundles' configs in this process (what the ``.pth`` does)."""
    warnings.filterwarnings("ignore", message=SHIPPED_CONFIG_NOTICE, category=UserWarning)


def pth_line() -> str:
    """The line of the installed ``.pth`` file: ``site`` runs it at interpreter start (stdlib only, no imports
    of torch or MONAI)."""
    return (
        f"import warnings; warnings.filterwarnings('ignore', message={SHIPPED_CONFIG_NOTICE!r}, category=UserWarning)\n"
    )
