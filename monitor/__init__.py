"""DLSR Monitor streaming service."""
