"""flowlog-shipper: conntrack flow records attributed to Kubernetes pods."""

__version__ = "0.1.0"
