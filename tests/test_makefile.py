"""`make check` deselects slow tests by name (Makefile CHECK_SLOW): a renamed or removed test there would
silently come back into the fast tier, so every entry must still name a test module or a test in it."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_check_slow_entry_names_an_existing_module_or_test():
    text = (ROOT / "Makefile").read_text()
    block = re.search(r"^CHECK_SLOW := ((?:.*\\\n)*.*)$", text, re.M)
    assert block, "Makefile has no CHECK_SLOW list"
    entries = block.group(1).replace("\\\n", " ").split()
    assert len(entries) >= 10
    stale = []
    for entry in entries:
        path, _, test = entry.partition("::")
        module = ROOT / path
        if not module.is_file() or (test and not re.search(rf"^def {re.escape(test)}\(", module.read_text(), re.M)):
            stale.append(entry)
    assert not stale, f"CHECK_SLOW names what no longer exists (rename it there too): {stale}"
