"""Example treebench plug-in (docs/PLUGINS.md): ``BestOfGroup`` (an algorithm) and ``Redness`` (a reward)."""
