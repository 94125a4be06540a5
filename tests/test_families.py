"""blade.families: the one registry of per-family facts, as the loaders, the trainer and the config read them."""

import pytest

from blade.families import FAMILIES, get_family


def test_registry_facts_and_lookups():
    from blade.distill.trainer import FAMILY_DEFAULTS
    from blade.pipelines.loading import FAMILIES as LOADER_FAMILIES

    assert LOADER_FAMILIES is FAMILIES and set(FAMILIES) == {"wan", "cogvideox"}
    assert FAMILY_DEFAULTS["wan"] == {"num_frames": 81, "height": 480, "width": 832, "fps": 16, "cfg": 5.0,
                                      "lambda_reg": 0.0}
    assert FAMILY_DEFAULTS["cogvideox"] == {"num_frames": 49, "height": 480, "width": 720, "fps": 8, "cfg": 3.5,
                                            "lambda_reg": 0.5}
    assert get_family("wan").size_rules({}, {}) == (16, 16, 4)
    assert get_family("cogvideox").size_rules({}, {}) == (16, 16, 4)
    assert get_family("cogvideox").prediction_type == "v_prediction" and not get_family("cogvideox").flow_shift
    assert get_family("wan").adapter().__name__ == "blade.models.wan"
    with pytest.raises(ValueError, match="unknown model family 'sora'"):
        get_family("sora")
