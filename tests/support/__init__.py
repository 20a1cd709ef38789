"""Fakes and helpers shared by tests of several packages."""
