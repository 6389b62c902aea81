"""DLSR refit service."""
