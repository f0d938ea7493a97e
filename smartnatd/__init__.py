"""smartnatd: a NAT appliance daemon for Kubernetes Mappings (drop-in for SmartNat)."""

__version__ = "0.1.0"
