"""The requests-based SDK (``PeerInferClient``) and the ``client.py`` command line."""

from peerinfer.client.sdk import PeerInferClient, StreamStats, TextStream

__all__ = ["PeerInferClient", "StreamStats", "TextStream"]
