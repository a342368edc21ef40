"""Events to timelines, reports, anomalies, joins and compare statistics; no root, no BCC.  Imports the
layers below (base, kernel, probes, recording); never a renderer (exporters/)."""
