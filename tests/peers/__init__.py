"""DICOM peers written for the tests (see DESIGN.md, "Test peers")."""

from .pacs import MisbehavingPacs

__all__ = ["MisbehavingPacs"]
