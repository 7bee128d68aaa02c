"""Shared by every test: pytest inserts this folder into ``sys.path`` (the rootdir conftest), so
test files import ``helpers``."""
