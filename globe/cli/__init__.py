"""`globe` command-line interface: one module per subcommand, dispatched by `globe.cli.main`; `eval_options` holds
the options `eval` and `bench` share. Each module turns its arguments into a run config of globe.run, calls the
run, and prints what it returns."""
