"""``teegate doctor``'s checks: a setup examined the way a support engineer would.

Each check is a small function returning a :class:`~teegate.doctor.report.Check` (a name, a
status, what was found, and the fix when something is wrong). The environment, the clock, the
programs on ``PATH`` and the HTTP transport are parameters, so every check is tested with
temporary files and fake environments, never with this machine's own state.

Two halves: the gateway's side (configuration, upstream and catalog, per-model verdicts,
listeners, the egress CA the listener presents) and a client's side (its trust stores and proxy
variables). A machine that only runs the gateway need not pass the second half; ``--client``
says this one also runs the apps, and makes it required.
"""
