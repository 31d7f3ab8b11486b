"""The research workflows, each a config plus a loss plus data on the one engine."""
