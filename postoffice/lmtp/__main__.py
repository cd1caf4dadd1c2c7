"""``python -m postoffice.lmtp``: the same server as ``postoffice serve``, without the CLI.

``main`` lives in :mod:`postoffice.lmtp.server`, not here: the package
re-exports it, and a package that imports its own ``__main__`` makes
``python -m`` warn that the module is run twice.
"""

from __future__ import annotations

import sys

from postoffice.lmtp.server import main

if __name__ == "__main__":
    sys.exit(main())
