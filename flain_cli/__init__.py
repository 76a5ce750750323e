"""flain-cli: simulate backdoored federated learning and remove backdoors with FLAIN."""

__version__ = "0.1.0"
