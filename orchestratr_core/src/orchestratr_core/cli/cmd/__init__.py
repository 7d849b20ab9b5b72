"""The core's command groups, one module each (tox 4's ``session/cmd`` layout);
a backend adds its own through :func:`~orchestratr_core.plugin.spec.orchestratr_cli_commands`."""
