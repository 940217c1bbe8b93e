"""The `vhusniff` command: subcommands dispatched from main; the analysis views in analysis."""
