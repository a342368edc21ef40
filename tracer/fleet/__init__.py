"""Many recordings as one dataset (Parquet parts under a manifest) and the engines that query it.
Imports the layers below, up to tracer.analysis; never tracer.live, its sibling."""
