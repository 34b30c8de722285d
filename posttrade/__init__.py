"""posttrade: post-trade stream processing on NATS JetStream."""

__version__ = "0.1.0"
