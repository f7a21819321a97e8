"""The test suite; its layout mirrors the packages, its shared helpers live in tests/_support."""
