"""What an operator watches: Prometheus metrics, quota gauges, garbage-collector tuning."""
