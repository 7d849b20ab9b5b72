"""Conformance suites for backend authors (shipped with the core).

Subclass a suite in your own tests and provide its fixture::

    from orchestratr_core.testing import StorageConformance

    class TestMyStorage(StorageConformance):
        @pytest.fixture
        async def storage(self):
            s = MyStorage(...)
            await s.open()
            yield s
            await s.close()

See ``docs/plugins.md``.
"""
