"""Renderers and exporters of luotrace reports: text now; Prometheus, Perfetto next."""
