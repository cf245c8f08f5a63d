"""On-call views for the captioner: Prometheus and Alertmanager with the project's rules
(`make monitor`, monitor.run), the configuration they run with (monitor.config), the
Grafana dashboard as code (monitor.dashboard). The rules themselves are
deploy/monitoring/rules/captioner.rules.yml; docs/monitoring.md says how it fits."""
