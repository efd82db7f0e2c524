"""Where jobs run: `local` (subprocesses on this machine, the default) or `kubernetes`."""
