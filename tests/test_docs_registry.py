"""Documentation that lists every algorithm stays in step with the registry and the classes."""

import re
from pathlib import Path

from bench.registry import ALGORITHMS, algorithm_class

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_sweeps_doc_lists_every_algorithms_search_space_with_its_defaults_in_bold():
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (\w+) \| (.*) \|$", (DOCS / "SWEEPS.md").read_text(), re.M)}
    for name in ALGORITHMS:
        cls = algorithm_class(name)
        assert name in rows, f"docs/SWEEPS.md has no search-space row for {name}"
        bold = set(re.findall(r"\*\*(\w+)", rows[name]))
        listed = set(re.findall(r"(?:^|, |\*\*)(\w+)", rows[name]))
        assert bold == set(cls.search_default), (name, bold)
        assert set(cls.search_space) <= listed, (name, set(cls.search_space) - listed)
