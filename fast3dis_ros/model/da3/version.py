"""The one DA3 version the transcription in this package is checked against, and the import-time check.

``backbone.py`` re-states parts of ``depth_anything_3``'s forward line by line (so it can split the ViT
at a block and share the prefix between the two passes). Those lines are only right for the version
they were read from; another version could compute something else silently, so importing the backbone
with any other version fails with this message instead.
"""

from __future__ import annotations

from importlib import metadata

#: ``pip install depth-anything-3==0.1.1`` (requirements pin it too).
DA3_VERSION = "0.1.1"
DA3_DISTRIBUTION = "depth-anything-3"


class DA3VersionError(ImportError):
    """The installed depth_anything_3 is not the version the transcription was written for."""


def check_da3_version(installed: str | None = None) -> str:
    """Return the installed version, or raise :class:`DA3VersionError` saying what to install."""
    if installed is None:
        try:
            installed = metadata.version(DA3_DISTRIBUTION)
        except metadata.PackageNotFoundError as e:
            raise DA3VersionError(f"{DA3_DISTRIBUTION} is not installed; fast3dis_ros needs "
                                  f"{DA3_DISTRIBUTION}=={DA3_VERSION}") from e
    if installed != DA3_VERSION:
        raise DA3VersionError(
            f"{DA3_DISTRIBUTION} {installed} is installed, but fast3dis_ros.model.da3 transcribes DA3's forward "
            f"from {DA3_VERSION}: install {DA3_DISTRIBUTION}=={DA3_VERSION} (or re-check backbone.py, "
            f"internals.py and the fast path against the new version and update DA3_VERSION)")
    return installed
