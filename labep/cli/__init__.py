"""The ``labep`` command line (:mod:`labep.cli.main`)."""
