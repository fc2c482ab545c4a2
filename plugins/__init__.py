"""swarmfly.plugins: the plugin API and the built-in sources, strategies and evaluators."""
