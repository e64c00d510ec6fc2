"""Helpers of the documentation build (not part of the library)."""
