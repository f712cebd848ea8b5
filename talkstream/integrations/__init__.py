"""Adapters that put talkstream inside voice-agent frameworks (pipecat, LiveKit Agents).

Each integration lives behind its own extra (``pip install 'talkstream[pipecat]'``,
``'talkstream[livekit]'``) and is imported only by the user's agent code: the engine, the CLI and
the server never import anything from this package, so talkstream runs without any framework
installed.
"""
