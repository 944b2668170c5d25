"""Deployment checks run without Docker, a cluster or systemd: the container image, Compose,
Kubernetes, systemd units and the observability files (Prometheus, Grafana)."""
