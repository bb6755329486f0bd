"""`python -m rollout.launch_server [--model-path DIR ...]`: start a rollout server (SGLang's command).

The command line lives in rollout/server/launch_server.py. Called as a function from Python,
`rollout.launch_server(model_path, **flags)` is instead the client's launcher: it starts that command in a
subprocess and returns a `LocalServer` (rollout/client/local_server.py).
"""

from __future__ import annotations

import sys
from typing import Any


class _CallableModule(type(sys)):
    """`rollout.launch_server` is both this module and, called, the Python launcher: importing a submodule
    rebinds the package attribute of the same name, so a plain function exported by rollout/__init__ would
    be shadowed once this module was imported. The client is imported only on a call, so the server
    process (which runs this module) never loads it."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from rollout.client.local_server import launch_server

        return launch_server(*args, **kwargs)


if __name__ == "__main__":
    from rollout.server.launch_server import main

    main()
else:
    sys.modules[__name__].__class__ = _CallableModule
