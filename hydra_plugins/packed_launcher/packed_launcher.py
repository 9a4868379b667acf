"""Hydra registers launchers only from the ``hydra_plugins`` package, under the module that defines them: this
is the class ``hydra/launcher=packed`` names. Everything it does is in ``runners.pack.PackedLauncherBase``."""

from runners.pack import PackedLauncherBase


class PackedLauncher(PackedLauncherBase):
    """Hydra launcher: every job of the sweep in this process, as members of packs (runners/pack.py)."""
