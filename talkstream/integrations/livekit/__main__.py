"""``python -m talkstream.integrations.livekit``: run one avatar worker (see :mod:`.cli`)."""

import sys

from talkstream.integrations.livekit.cli import main

sys.exit(main())
