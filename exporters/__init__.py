"""Renderers of what analysis built: the text report, Prometheus metrics and textfiles, Perfetto timelines,
compare's table and plot, the fleet's tables.  Imports tracer's layers up to tracer.live; only tracer.service
and tracer.cli import them."""
