"""The self-contained demo and the embedded development servers (Tansu broker, private Redis)."""
