"""Releases: a recipe (`recipe`, `source`, `gates`) is built stage by stage (`stages`, `build`) into a
Hub repo with its model card (`card`), then published and browsed (`hub`)."""
