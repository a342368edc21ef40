"""BCC: compile, load, attach (or adopt a kept set), read the rings and maps, detach.  Imports the layers
below (base, kernel, probes); never tracer.recording, its sibling."""
