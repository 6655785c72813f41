"""Kept so that code written against the flat layout (`from harden.loading import load_model`) still imports;
the code lives in `harden.io.loading`."""

from harden.io.loading import load_model

__all__ = ["load_model"]
