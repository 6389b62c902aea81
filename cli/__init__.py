"""The `dlsr` console script: wires the packages' subcommands together."""
