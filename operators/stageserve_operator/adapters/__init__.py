"""The only modules that import a client library (kubernetes, HTTP to Prometheus)."""
