"""ftl's training levers (ftl.finetune.packing, ftl.system): packed rows stay separate rows, the loss is
the model's own, bf16 falls back on a CPU that cannot run it, and the footprint helpers are the only ones."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ftl.finetune.packing import IGNORE, labelled_loss, pack, tokens_in
from tiny import build_tiny_gemma3

ROOT = Path(__file__).resolve().parents[1]


def _rows(vocab: int, lengths=(7, 11, 5), prompt=3, seed=1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(10, vocab, (n,), generator=g)
        labels = ids.clone()
        labels[:prompt] = IGNORE
        rows.append({"input_ids": ids, "labels": labels})
    return rows


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    """A tiny Llama (full attention) and a tiny Gemma 3 (sliding-window layers): two mask code paths."""
    from transformers import AutoModelForCausalLM

    gemma = build_tiny_gemma3(tmp_path_factory.mktemp("gemma") / "tiny-gemma3")
    return [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in (tiny_model, gemma)]


def test_pack_keeps_every_row_and_restarts_positions():
    rows = _rows(100)
    packed = pack(rows)
    assert packed["input_ids"].shape == (1, 23) and tokens_in(packed) == 23
    assert torch.equal(packed["input_ids"][0], torch.cat([r["input_ids"] for r in rows]))
    assert packed["position_ids"][0].tolist() == list(range(7)) + list(range(11)) + list(range(5))
    # every answer label is kept; a row's first token (never predicted within its row) is not a label
    assert int((packed["labels"] != IGNORE).sum()) == sum(int((r["labels"] != IGNORE).sum()) for r in rows)
    assert "attention_mask" not in packed  # the restarting positions are the row boundaries


def test_packed_rows_never_attend_across_the_row_boundary(models):
    """The row-boundary probe: each row's logits inside the pack equal its logits alone. A token that
    could see the previous row would change them."""
    for model in models:
        rows = _rows(model.config.vocab_size)
        packed = pack(rows)
        with torch.no_grad():
            together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                             use_cache=False).logits[0]
            at = 0
            for row in rows:
                alone = model(input_ids=row["input_ids"][None]).logits[0]
                assert torch.allclose(together[at:at + len(alone)], alone, atol=1e-5), type(model).__name__
                at += len(alone)
        # and the probe can fail: the same tokens as one causal sequence do see the previous row
        with torch.no_grad():
            joined = model(input_ids=packed["input_ids"], use_cache=False).logits[0]
        assert not torch.allclose(joined[7:18], together[7:18], atol=1e-3)


def test_the_packed_loss_is_the_models_own_loss_over_the_same_tokens(models):
    for model in models:
        rows = _rows(model.config.vocab_size)
        with torch.no_grad():
            packed_loss, _ = labelled_loss(model, pack(rows))
            # the model's own loss per row, weighted by its labelled tokens
            total = count = 0
            for row in rows:
                n = int((row["labels"][1:] != IGNORE).sum())
                total += float(model(input_ids=row["input_ids"][None], labels=row["labels"][None]).loss) * n
                count += n
            width = max(len(r["input_ids"]) for r in rows)
            padded = {"input_ids": torch.zeros((3, width), dtype=torch.long),
                      "attention_mask": torch.zeros((3, width), dtype=torch.long),
                      "labels": torch.full((3, width), IGNORE)}
            for i, r in enumerate(rows):
                n = len(r["input_ids"])
                padded["input_ids"][i, :n], padded["attention_mask"][i, :n], padded["labels"][i, :n] = \
                    r["input_ids"], 1, r["labels"]
            padded_loss, _ = labelled_loss(model, padded)
            hf_padded = float(model(**padded).loss)
        assert float(packed_loss) == pytest.approx(total / count, rel=1e-5)
        assert float(padded_loss) == pytest.approx(hf_padded, rel=1e-5)
        assert tokens_in(padded) == 23


def test_bf16_falls_back_to_fp32_on_a_cpu_without_support(tiny_model, qa_file, tmp_path, monkeypatch):
    from ftl import system
    from ftl.finetune import FinetuneConfig
    from ftl.finetune.stage import _precision_warnings, bf16_used, olive_workflow

    assert system.bf16_training({"avx2", "avx512f"}) == "this CPU has neither AVX512-BF16 nor AMX"
    assert system.bf16_training({"avx512f", "avx512_bf16"}) is None
    assert system.bf16_training({"amx_bf16"}) is None

    monkeypatch.setattr(system, "cpu_flags", lambda: {"avx2", "fma"})
    for method in ("lora", "qscale"):
        config = FinetuneConfig(model=str(tiny_model), data=qa_file, output=tmp_path / method, method=method,
                                precision="bf16")
        assert not bf16_used(config)
        assert _precision_warnings(config) == ["--precision bf16: this CPU has neither AVX512-BF16 nor AMX; "
                                               "training in fp32"]
        flow = olive_workflow(config, tmp_path / method, model_dir=tiny_model, max_seq_len=64, steps=2,
                              logging_steps=1)
        passed = flow["passes"]["lora"]["training_args"]["bf16"] if method == "lora" else \
            flow["passes"]["qscale"]["bf16"]
        assert passed is False
    monkeypatch.setattr(system, "cpu_flags", lambda: {"avx512_bf16"})
    config = FinetuneConfig(model=str(tiny_model), data=qa_file, output=tmp_path / "b", precision="bf16")
    assert bf16_used(config) and not _precision_warnings(config)


def test_one_footprint_helper_for_the_whole_project():
    """Sizes and peak memory come from ftl.system alone: no other file measures a folder or reads ru_maxrss."""
    offenders = []
    for path in list((ROOT / "src").rglob("*.py")) + list((ROOT / "bench").rglob("*.py")):
        if path.name == "system.py":
            continue
        text = path.read_text()
        if re.search(r"\.st_size|getsize\(|ru_maxrss|VmHWM", text):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_peak_rss_is_this_programs_own_not_its_parents(tiny_model):
    """A child of a big process once reported the parent's peak (getrusage keeps it across exec);
    the probe's figure is the child's own. The model's share of a tiny model is modules imported on load
    and working memory, far below SmolLM2's (tests/test_e2e_smollm2.py compares the two)."""
    from ftl.eval.stage import _peak_rss
    from ftl.system import peak_rss_mib

    ballast = bytearray(600 * 1024 * 1024)  # make this process's peak far above a tiny model's
    ballast[::4096] = b"x" * len(ballast[::4096])
    assert peak_rss_mib() > 600
    found = _peak_rss(f"torch:{tiny_model}")
    del ballast
    assert found["peak_rss_mib"] is not None and found["peak_rss_mib"] < peak_rss_mib()
    assert 0 <= found["model_rss_mib"] < 300
    assert found["rss_baseline_mib"] + found["model_rss_mib"] == pytest.approx(found["peak_rss_mib"], abs=0.2)


def test_progress_outside_a_terminal_is_one_line_per_step_with_rate_and_eta(monkeypatch):
    """Logs and CI get no bar: each step is one plain line with its count, rate and ETA."""
    import io
    import time

    from rich.console import Console

    from ftl import progress

    buffer = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=buffer, force_terminal=False, width=200))
    with progress.task_progress("finetune (test)") as (bar, task):
        for step in range(1, 4):
            time.sleep(0.01)
            bar.update(task, completed=step, total=3, info=f"loss {2.0 / step:.4f}")
        bar.update(task, completed=3, total=3, info="loss 0.6667")  # no new step: no new line
    with progress.task_progress("generate (test)", total=2) as (bar, task):
        bar.advance(task)
        bar.advance(task)
    lines = buffer.getvalue().splitlines()
    finetune, generate = lines[:4], lines[4:]
    assert finetune[0] == "→ finetune (test)"
    assert finetune[1].startswith("  finetune (test) 1/3 · ") and "loss 2.0000" in finetune[1]
    assert "/s · ETA " in finetune[1] and "ETA" not in finetune[3] and finetune[3].startswith("  finetune (test) 3/3 · ")
    assert generate[0] == "→ generate (test)" and len(generate) == 3  # advance() steps print too
    assert generate[1].startswith("  generate (test) 1/2 · ") and generate[2].startswith("  generate (test) 2/2 · ")
