"""benchmarks/mutation.py: its mutation list stays valid as the code changes (cheap, runs no mutation)."""
import sys
from collections import Counter

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import mutation  # noqa: E402


def test_every_mutation_applies_exactly_once_and_compiles():
    """Each original snippet occurs exactly once in its file (else: re-anchor the mutation in
    benchmarks/mutation.py), and the list keeps its coverage: >= 48, >= 6 per method script, >= 8 in common.py."""
    mutation.check(mutation.MUTATIONS)
    per_file = Counter(m.file for m in mutation.MUTATIONS)
    assert len(mutation.MUTATIONS) >= 48 and per_file["common.py"] >= 8
    assert {s: per_file[s] for s in mutation.SCRIPTS if per_file[s] < 6} == {}


def test_every_covering_test_exists():
    for m in mutation.MUTATIONS:
        for arg in m.tests:
            if arg.startswith("tests/"):
                path, _, name = arg.partition("::")
                assert (ROOT / path).is_file(), (m.name, arg)
                if name:
                    assert f"\ndef {name.split('[')[0]}(" in (ROOT / path).read_text(), (m.name, arg)


def test_check_refuses_a_stale_or_ambiguous_snippet():
    good = mutation.MUTATIONS[0]
    stale = good._replace(name="stale", old="this text is in no file")
    twice = good._replace(name="twice", file="dacs.py", old="import")
    broken = good._replace(name="broken", new="p.add_argument((")
    with pytest.raises(ValueError) as exc:
        mutation.check([good, stale, twice, broken, good])
    text = str(exc.value)
    assert "stale: dacs.py holds the original snippet 0 times" in text and "twice: dacs.py holds" in text
    assert "broken: the mutated dacs.py does not compile" in text and f"{good.name}: duplicate name" in text
