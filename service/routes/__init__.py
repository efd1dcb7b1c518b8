"""One router per resource: ``rerank`` (the work), ``health`` (probes), ``metrics`` (Prometheus)."""
