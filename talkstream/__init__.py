"""talkstream: a real-time streaming talking-avatar engine."""

__version__ = "0.1.0"
