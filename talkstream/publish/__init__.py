"""Publishing an avatar into a real SFU, once, whatever the audience.

- :mod:`talkstream.publish.janus`: a client of the Janus HTTP API and its VideoRoom plugin
  (session, handles, keepalives, long-polled events; publisher and subscriber requests);
- :mod:`talkstream.publish.whip`: a WHIP client (RFC 9725): POST the offer, take the answer and
  the resource, DELETE to stop, Bearer tokens, ICE servers from ``Link`` headers;
- :mod:`talkstream.publish.publisher`: an aiortc peer that sends one :class:`AvatarStream`
  (rendered and encoded once) to Janus or to any WHIP ingest, and an aiortc subscriber;
- :mod:`talkstream.publish.push`: a published presenter's push API (speech in, stats out);
- :mod:`talkstream.publish.viewer`: a viewer page that watches a feed through Janus;
- :mod:`talkstream.publish.local`: Janus and simple-whip-server run on loopback from a
  generated configuration (tests, benchmarks, ``tools/sfu.py``);
- :mod:`talkstream.publish.cli`: the ``talkstream publish`` command.

Light at import: aiohttp and aiortc load only in the modules that need them.
"""
