"""The recording file: its format, reader and writer, and its header.  Imports base, kernel and probes;
never tracer.attach, its sibling: a recording is read where BCC is not."""
