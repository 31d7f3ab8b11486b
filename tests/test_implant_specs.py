"""``persguard implant``'s subject specs: the forms that parse, and one clear line for each that does not."""
from __future__ import annotations

import pytest

from persguard_jax.implant.specs import SpecError, parse_protected, parse_subjects, parse_unprotected


def test_world_and_folder_forms(tmp_path):
    s = parse_protected("world:dog_03:pattern")
    assert (s.is_world, s.name, s.class_name, s.type, s.protected) == (True, "dog_03", None, "pattern", True)
    assert parse_protected("world:cat_00:erasure").with_class("cat").class_name == "cat"
    folder = tmp_path / "alice photos"
    folder.mkdir()
    s = parse_protected(f"{folder}:person:target")
    assert (s.is_world, s.name, s.class_name, s.type, s.folder) == (False, "alice photos", "person", "target", folder)
    u = parse_unprotected(f"{folder}:person")
    assert (u.protected, u.class_name, u.name) == (False, "person", "alice photos")
    assert parse_unprotected("world:bird_01").name == "bird_01"
    # a folder whose path holds a colon: fields are split from the right
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert parse_protected(f"{odd}:dog:erasure").folder == odd


@pytest.mark.parametrize("spec, message", [
    ("", "empty"),
    ("world:dog_03", "no backdoor type"),
    ("world:dog_03:glitter", "unknown backdoor type 'glitter'"),
    ("world::pattern", "expected"),
    ("world:dog_03:pattern:extra", "expected"),
    ("NOPE:dog:pattern", "no folder NOPE"),
    (":dog:pattern", "expected"),
])
def test_bad_protected_specs_name_the_spec(spec, message):
    with pytest.raises(SpecError, match=message) as e:
        parse_protected(spec)
    assert "\n" not in str(e.value) and (repr(spec) in str(e.value) or spec == "")


def test_bad_unprotected_specs(tmp_path):
    with pytest.raises(SpecError, match="has no backdoor type"):
        parse_unprotected("world:dog_03:pattern")
    with pytest.raises(SpecError, match="expected"):
        parse_unprotected("world")
    (tmp_path / "f").write_text("x")
    with pytest.raises(SpecError, match="is not a folder"):
        parse_unprotected(f"{tmp_path / 'f'}:dog")


def test_subject_lists(tmp_path):
    prot, unprot = parse_subjects(["world:dog_00:pattern", "world:cat_00:target"], ["world:dog_01"])
    assert [s.name for s in prot] == ["dog_00", "cat_00"] and [s.name for s in unprot] == ["dog_01"]
    with pytest.raises(SpecError, match="at least one protected"):
        parse_subjects([], ["world:dog_01"])
    with pytest.raises(SpecError, match="the same subject"):
        parse_subjects(["world:dog_00:pattern"], ["world:dog_00"])
    a, b = tmp_path / "x" / "same", tmp_path / "y" / "same"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    with pytest.raises(SpecError, match="two subjects named 'same'"):
        parse_subjects([f"{a}:dog:pattern"], [f"{b}:dog"])
