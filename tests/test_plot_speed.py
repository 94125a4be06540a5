"""benchmarks/plot_speed.py: the stages chart from one or several end_to_end.py JSONs of one card."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("plot_speed", ROOT / "benchmarks" / "plot_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(family: str, device: str = "H100") -> dict:
    stages = {"text_encoding_s": 0.1, "denoising_s": 2.0, "vae_decode_s": 1.0, "postprocess_s": 0.3}
    rows = []
    for arm, scale in (("baseline", 20.0), ("blade", 1.0)):
        row_stages = {k: v * scale for k, v in stages.items()}
        row_stages["total_s"] = sum(row_stages.values())
        rows.append({"family": family, "arm": arm, "stages": row_stages, "extrapolated": arm == "baseline"})
    return {"device": device, "results": rows}


def test_reports_of_one_card_merge_into_one_panel_per_model_and_draw(tmp_path):
    module = _module()
    merged = module.merge_end_to_end([_report("wan"), _report("cogvideox")])
    assert merged["device"] == "H100" and [r["family"] for r in merged["results"]] == ["wan"] * 2 + ["cogvideox"] * 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    module.plot_end_to_end(merged, tmp_path / "stages.png", plt)
    assert (tmp_path / "stages.png").stat().st_size > 10_000


def test_a_model_in_two_reports_or_two_cards_is_refused():
    module = _module()
    with pytest.raises(ValueError, match="wan is in two JSONs"):
        module.merge_end_to_end([_report("wan"), _report("wan")])
    with pytest.raises(ValueError, match="different cards"):
        module.merge_end_to_end([_report("wan"), _report("cogvideox", device="H200")])
