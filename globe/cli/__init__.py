"""`globe` command-line interface: one module per subcommand, dispatched by `globe.cli.main`."""
