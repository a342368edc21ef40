"""One live run on this host: the runner, signals, the state directory, the reference model run.
Imports the layers below, up to tracer.analysis; never tracer.fleet, its sibling."""
