"""Kept so that code written against the flat layout (`from certify.engine import certify_model`) still imports;
the code lives in `certify.verdicts.dataset`."""

from certify.verdicts.dataset import certify_model

__all__ = ["certify_model"]
