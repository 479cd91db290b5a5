"""``python -m ezpq_mgr.server --embedded``: the private server of an
embedded queue, started by ``client/embedded.py`` (see ``main.embedded_main``)."""

import sys

from .main import embedded_main

if "--embedded" in sys.argv:
    embedded_main()
