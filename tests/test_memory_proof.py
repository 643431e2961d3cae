"""`make memory-proof` end to end at toy size: every stage runs and the table has every row."""

from __future__ import annotations

import json

import pytest

from moshi_ttt.memory_proof import main, recall_accuracy, recall_samples


@pytest.mark.slow
def test_memory_proof_runs_every_variant(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--demo-data", str(tmp_path / "no-demo"), "--base-steps", "4",
                 "--variant-steps", "6", "--train-samples", "16", "--test-samples", "4", "--batch-size", "2",
                 "--pretrain-delays", "8"]) == 0
    result = json.loads((tmp_path / "memory_proof.json").read_text())
    names = [r["model"] for r in result["rows"]]
    assert names[1:] == ["frozen base", "post_attention", "pre_attention", "cache_replacement", "hybrid"]
    assert all(0.0 <= r["recall_accuracy"] <= 1.0 for r in result["rows"])
    assert "| pre_attention |" in capsys.readouterr().out


def test_recall_accuracy_is_one_for_an_oracle(tmp_path):
    """A 'model' that predicts the target tokens exactly scores 1.0; a constant one scores low."""
    import torch
    from moshi.models.lm import LMOutput

    from moshi_ttt.data.recall import TokenRecallSpec, write_token_recall_shards

    write_token_recall_shards(tmp_path / "r", 6, TokenRecallSpec(delay_frames=40, card=64, text_card=64), seed=0)

    class Oracle(torch.nn.Module):
        card, text_card = 64, 64

        def __init__(self, perfect: bool):
            super().__init__()
            self.perfect = perfect

        def forward(self, codes):
            B, _, T = codes.shape
            audio = torch.nn.functional.one_hot(codes[:, 1:9].clamp_min(0), 64).float()
            text = torch.nn.functional.one_hot(codes[:, :1].clamp_min(0), 64).float()
            if not self.perfect:
                audio, text = torch.zeros_like(audio), torch.zeros_like(text)
                audio[..., 0] = text[..., 0] = 1.0
            valid = codes >= 0
            return LMOutput(audio, valid[:, 1:9], text, valid[:, :1])

    assert recall_accuracy(Oracle(True), str(tmp_path / "r"))["overall"] == 1.0
    assert recall_accuracy(Oracle(False), str(tmp_path / "r"))["overall"] < 0.2
    assert len(list(recall_samples(str(tmp_path / "r")))) == 6
