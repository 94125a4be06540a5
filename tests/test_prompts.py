"""Prompt preprocessing (blade/prompt_cli.py, utils/process_prompts_*.py) and the cache reader (blade/prompts.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blade.prompt_cli import COGVIDEOX, WAN, main
from blade.prompts import PromptCacheError, PromptEmbeddingCache
from blade.testing.tiny import build_tiny_cogvideox_pipeline, build_tiny_wan_pipeline

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red ball moves left", "a big dog runs on the road", "a red ball moves left", "",
           "the car near the river at night", "a small cat"]



@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    pipe = build_tiny_wan_pipeline(seed=0)
    path = tmp_path_factory.mktemp("wan") / "pipe"
    pipe.save_pretrained(path)
    return pipe, path


def _write(path: Path, lines) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_wan_round_trip_rerun_and_duplicates(wan, tmp_path, capsys):
    pipe, model = wan
    src = _write(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / "cache"
    argv = ["--input_file", str(src), "--output_dir", str(out), "--model_path", str(model), "--max_length", "12",
            "--num_validation", "2", "--shard_size", "2", "--negative_prompt", "low quality"]
    assert main(WAN, argv) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["duplicates_removed"] == 1 and first["encoded"] == 4 and first["skipped"] == 0

    cache = PromptEmbeddingCache(out)
    unique = list(dict.fromkeys(p for p in PROMPTS if p))
    assert len(cache) == 4 and [cache.prompt(i) for i in range(4)] == unique
    with torch.no_grad():
        ref, neg_ref = pipe.encode_prompt(unique, negative_prompt=["low quality"] * 4,
                                          do_classifier_free_guidance=True, max_sequence_length=12)
    for i in range(4):
        assert torch.equal(cache[i], ref[i])  # exactly what the pipeline feeds its transformer
    # Wan zero-pads after the real tokens ("a small cat </s>" = 4 tokens)
    assert cache[3][4:].abs().sum() == 0 and cache[3][:4].abs().sum() > 0
    assert torch.equal(cache.negative(), neg_ref[0])
    val = cache.validation()
    assert [p for p, _ in val] == unique[:2] and torch.equal(val[1][1], ref[1])
    index = json.loads((out / "index.json").read_text())
    assert index["max_length"] == 12 and {e["shape"][0] for e in index["prompts"]} == {12}

    # rerun with two new prompts: the old ones are skipped by hash, the new ones appended
    _write(src, PROMPTS + ["a blue bird flies", "a green tree"])
    assert main(WAN, argv) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["skipped"] == 4 and second["encoded"] == 2 and second["total"] == 6
    cache = PromptEmbeddingCache(out)
    with torch.no_grad():
        ref2, _ = pipe.encode_prompt(["a blue bird flies"], do_classifier_free_guidance=False, max_sequence_length=12)
    assert torch.equal(cache[4], ref2[0])
    loader = torch.utils.data.DataLoader(cache.as_dataset(), batch_size=3)
    idx, emb = next(iter(loader))
    assert idx.tolist() == [0, 1, 2] and emb.shape == (3, 12, 32)


def test_cogvideox_separate_files_and_default_length(tmp_path):
    pipe = build_tiny_cogvideox_pipeline(seed=0)
    model = tmp_path / "cog"
    pipe.save_pretrained(model)
    src = _write(tmp_path / "p.txt", ["a red ball", "a dog runs"])
    assert main(COGVIDEOX, ["--input_file", str(src), "--output_dir", str(tmp_path / "c"), "--model_path",
                            str(model), "--save_separate"]) == 0
    cache = PromptEmbeddingCache(tmp_path / "c")
    # default length: 226 capped by the transformer's max_text_seq_length (16 in the tiny model)
    with torch.no_grad():
        ref, neg = pipe.encode_prompt(["a red ball", "a dog runs"], negative_prompt=["", ""], max_sequence_length=16,
                                      do_classifier_free_guidance=True)
    assert cache.max_length == 16 and torch.equal(cache[1], ref[1]) and torch.equal(cache.negative(), neg[0])
    assert len(list((tmp_path / "c" / "embeds").glob("*.safetensors"))) == 2


def test_truncation_warning_names_prompt(wan, tmp_path, caplog):
    long = " ".join(["red"] * 30)
    src = _write(tmp_path / "p.txt", ["a cat", long])
    argv = ["--input_file", str(src), "--output_dir", str(tmp_path / "c"), "--model_path", str(wan[1]),
            "--max_length", "8", "--negative_prompt", ""]
    assert main(WAN, argv) == 0
    assert any("truncated" in r.message and "red red" in r.getMessage() for r in caplog.records)


def test_bad_inputs_exit_2(wan, tmp_path, capsys):
    empty = _write(tmp_path / "empty.txt", ["", "   "])
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a good prompt\nbad \xff\xfe bytes\n")
    base = ["--output_dir", str(tmp_path / "c"), "--model_path", str(wan[1])]
    assert main(WAN, ["--input_file", str(empty), *base]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert main(WAN, ["--input_file", str(bad), *base]) == 2
    assert "line 2" in capsys.readouterr().err
    src = _write(tmp_path / "ok.txt", ["a cat"])
    assert main(WAN, ["--input_file", str(src), "--output_dir", str(tmp_path / "c"),
                      "--model_path", str(tmp_path / "nope")]) == 2
    assert "model_index.json" in capsys.readouterr().err
    # the real script's exit status
    proc = subprocess.run([sys.executable, str(REPO / "utils" / "process_prompts_wanx.py"), "--input_file",
                           str(empty), *base], capture_output=True, text=True)
    assert proc.returncode == 2 and "no prompts" in proc.stderr


def test_cache_reader_errors(tmp_path):
    with pytest.raises(PromptCacheError, match="not found"):
        PromptEmbeddingCache(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PromptCacheError, match="index.json"):
        PromptEmbeddingCache(tmp_path / "empty")
    (tmp_path / "empty" / "index.json").write_text(json.dumps({"prompts": []}))
    with pytest.raises(PromptCacheError, match="no encoded prompts"):
        PromptEmbeddingCache(tmp_path / "empty")


def test_prompt_lists_shipped():
    wan_prompts = (REPO / "utils" / "all_dimension_aug_wanx.txt").read_text(encoding="utf-8").splitlines()
    assert len(wan_prompts) >= 300 and len(set(wan_prompts)) == len(wan_prompts) and all(p.strip() for p in wan_prompts)
    tw = (REPO / "utils" / "tinyworld_train_prompts.txt").read_text(encoding="utf-8").splitlines()
    assert len(tw) == 2000 and len(set(tw)) == 2000
    from blade.tinyworld.world import parse_prompt

    for p in tw[:50]:
        assert parse_prompt(p).prompt == p


def test_cache_reuse_refuses_other_dtype_or_negative_and_bad_output_dirs(wan, tmp_path, capsys):
    """One cache = one dtype and one negative prompt; unusable output folders are one-line errors (exit 2)."""
    import os
    import stat

    src = _write(tmp_path / "p.txt", ["a cat", "a dog runs"])
    out = tmp_path / "c"
    base = ["--input_file", str(src), "--output_dir", str(out), "--model_path", str(wan[1]), "--max_length", "8",
            "--negative_prompt", ""]
    assert main(WAN, [*base, "--dtype", "float32"]) == 0
    before = (out / "index.json").read_bytes()
    capsys.readouterr()
    assert main(WAN, [*base, "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err.strip()
    assert "error:" in err and "dtype" in err and "float32" in err and len(err.splitlines()) == 1
    assert main(WAN, [*base[:-1], "low quality"]) == 2
    err = capsys.readouterr().err
    assert "--negative_prompt" in err and "low quality" in err
    assert (out / "index.json").read_bytes() == before  # nothing mixed into the cache
    # files are readable by others (0666 minus the umask), not safetensors' 0600
    umask = os.umask(0)
    os.umask(umask)
    for f in out.glob("*.safetensors"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask

    a_file = _write(tmp_path / "afile", ["x"])
    capsys.readouterr()
    assert main(WAN, ["--input_file", str(src), "--output_dir", str(a_file), "--model_path", str(wan[1])]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a file" in err and str(a_file) in err and "Traceback" not in err
    if os.geteuid() != 0:  # root writes anywhere: the read-only case cannot be made here
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            assert main(WAN, ["--input_file", str(src), "--output_dir", str(ro / "c"), "--model_path",
                              str(wan[1])]) == 2
            assert "cannot be created" in capsys.readouterr().err
        finally:
            ro.chmod(0o700)


def test_cache_reader_names_corrupt_and_nonfinite_files(wan, tmp_path):
    src = _write(tmp_path / "p.txt", ["a cat", "a dog runs"])
    out = tmp_path / "c"
    assert main(WAN, ["--input_file", str(src), "--output_dir", str(out), "--model_path", str(wan[1]),
                      "--max_length", "8", "--negative_prompt", "", "--num_validation", "0"]) == 0
    shard = out / "shard-00000.safetensors"
    good = shard.read_bytes()
    # same size, tensor bytes overwritten with 0xFF (NaN in float32): loads "fine" unless checked
    header = 8 + int.from_bytes(good[:8], "little")
    shard.write_bytes(good[:header] + b"\xff" * (len(good) - header))
    with pytest.raises(PromptCacheError, match="non-finite") as info:
        PromptEmbeddingCache(out)[0]
    assert str(shard) in str(info.value) and "process_prompts" in str(info.value)
    shard.write_bytes(good[: len(good) // 3])  # truncated
    with pytest.raises(PromptCacheError, match="corrupt or truncated") as info:
        PromptEmbeddingCache(out)[0]
    assert str(shard) in str(info.value)
    # the advice works: delete the shard and rerun, every prompt is back
    shard.unlink()
    assert main(WAN, ["--input_file", str(src), "--output_dir", str(out), "--model_path", str(wan[1]),
                      "--max_length", "8", "--negative_prompt", "", "--num_validation", "0"]) == 0
    cache = PromptEmbeddingCache(out)
    assert len(cache) == 2 and all(torch.isfinite(cache[i]).all() for i in range(2))
