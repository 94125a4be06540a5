"""TinyWorld training prompt lists (blade/tinyworld/prompts.py) against the grammar counted by hand."""

import pytest

from blade.tinyworld.prompts import all_scene_prompts, main, sample_prompts
from blade.tinyworld.world import parse_prompt, read_prompts


def test_the_grammar_is_enumerated_exactly():
    # one object: 2 sizes x 3 shapes x 5 motions x (7 colours on gray + 8 on black) = 30 x 15
    # two objects (ordered, colours differ): 30 x 7 x 30 x 6 on gray + 30 x 8 x 30 x 7 on black
    one, two = all_scene_prompts(1), all_scene_prompts(2)
    assert len(one) == len(set(one)) == 30 * 15
    assert len(two) == len(set(two)) == 900 * 42 + 900 * 56
    for p in one[:7] + two[::9973]:
        assert parse_prompt(p).prompt == p
    assert "a small white circle moves left on a gray background" not in one


def test_sample_is_distinct_deterministic_excludes_and_keeps_the_share():
    held_out = ["a large yellow circle moves right on a gray background"] + all_scene_prompts(2)[:500]
    a = sample_prompts(3000, seed=1, two_object_share=0.78, exclude=held_out)
    assert a == sample_prompts(3000, seed=1, two_object_share=0.78, exclude=held_out)
    assert a != sample_prompts(3000, seed=2, two_object_share=0.78, exclude=held_out)
    assert len(set(a)) == 3000 and not set(a) & set(held_out)
    # 3000 x 0.22 = 660 one-object prompts asked, 449 exist outside the excluded: all of them, the rest two-object
    assert sum(len(parse_prompt(p).objects) == 1 for p in a) == 449
    c = sample_prompts(1000, seed=1, two_object_share=0.78, exclude=held_out)
    assert sum(len(parse_prompt(p).objects) == 2 for p in c) == 780
    # more one-object prompts than exist: all of them (minus the excluded one), the rest from two-object scenes
    b = sample_prompts(1000, seed=0, two_object_share=0.0, exclude=held_out)
    assert sum(len(parse_prompt(p).objects) == 1 for p in b) == 449
    with pytest.raises(ValueError, match="only 88149"):
        sample_prompts(88150, seed=0, exclude=held_out)


def test_cli_writes_the_list_and_refuses_bad_input(tmp_path, capsys):
    ex = tmp_path / "ex.txt"
    ex.write_text("# held out\na small red square moves up on a black background\n")
    out = tmp_path / "p.txt"
    assert main(["--count", "40", "--seed", "3", "--exclude", str(ex), "--out", str(out)]) == 0
    lines = [text for text, _ in read_prompts(out)]
    assert lines == sample_prompts(40, 3, 0.78, ["a small red square moves up on a black background"])
    ex.write_text("a purple dog\n")
    assert main(["--count", "4", "--exclude", str(ex), "--out", str(tmp_path / "q.txt")]) == 2
    assert "purple" in capsys.readouterr().err and not (tmp_path / "q.txt").exists()
