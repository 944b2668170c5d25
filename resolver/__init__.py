"""A DNS filtering resolver: date-activated blocklists, a sinkhole, and a forwarding cache."""

__version__ = "0.1.0"
