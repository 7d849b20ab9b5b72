"""Helpers and fixtures shared by the test directories, one module per area.

Every module here is registered in ``tests/conftest.py`` through ``pytest_plugins``:
its fixtures are available to every test and its asserts are rewritten. Import the
helpers as ``from tests.support.<area> import ...``; a directory's ``conftest.py``
keeps only the fixtures that differ for that directory.
"""
