"""ptm: pretrain and fine-tune transformer language models from composed YAML configs."""

__version__ = "0.1.0"
