"""The ``remat`` command line: one module per subcommand, wired together in :mod:`remat.cli.main`."""
