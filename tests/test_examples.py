"""The example and its analyses under left padding and cross-attention."""

from __future__ import annotations

import torch
from torch import nn

from attnmonitor import AttentionCapture
from attnmonitor.analysis import analyse_example
from tests.helpers.models import SdpaAttention, TinyTransformer, layer_inputs, qk64
from tests.helpers.reference import attention_probs


def test_the_example_of_a_left_padded_sequence_starts_at_its_first_real_token():
    torch.manual_seed(0)
    model = TinyTransformer(SdpaAttention, n_layers=1, dropout=0.0).eval()
    ids = torch.randint(50, (2, 7))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])  # batch element 0: three pads on the left
    (x,) = layer_inputs(model, [model.layers[0]], ids, mask)
    with AttentionCapture(model, example_tokens=64) as cap, torch.no_grad():
        model(ids, mask)
    example = cap.examples["layers.0"]
    probs = example.probs
    assert (example.start, example.key_start) == (3, 3)
    q, k = qk64(model.layers[0], x)
    expected = attention_probs(q, k, mask.bool()[:, None, None, :])[0, :, 3:, 3:]  # the 4 real tokens
    torch.testing.assert_close(probs.double(), expected, rtol=1e-5, atol=1e-6)


def test_cross_attention_analyses_label_decoder_queries_and_rollout_follows_the_encoder():
    torch.manual_seed(1)
    encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    decoder = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

    class Seq2Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.decoder = encoder, decoder

        def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
            return self.decoder(tgt, self.encoder(src))

    model = Seq2Seq()
    with AttentionCapture(model, example_tokens=8) as cap, torch.no_grad():
        model(torch.randn(1, 6, 16), torch.randn(1, 6, 16))
    assert cap.kinds == {"encoder.self_attn": "self", "decoder.self_attn": "self", "decoder.multihead_attn": "cross"}
    source = [f"s{i}" for i in range(6)]
    target = [f"t{i}" for i in range(6)]
    result = analyse_example(cap.layers, cap.examples, source, kinds=cap.kinds, query_tokens=target)
    cross = result.interpretation["decoder.multihead_attn"].splitlines()
    assert cross[0] == "| query | attends to (weight) | entropy |"  # no self column
    assert [line.split(" | ")[0] for line in cross[2:]] == [f"| t{i}" for i in range(6)]  # decoder tokens
    assert all(any(f"s{j} (" in line for j in range(6)) for line in cross[2:])  # encoder tokens as keys
    assert result.interpretation["encoder.self_attn"].splitlines()[0].endswith("| self |")
    assert not any(analysis.startswith("position/") and layer == "decoder.multihead_attn" for analysis, layer in result.scalars)
    # rollout: the encoder only (the decoder is another sequence): identity-mixed encoder attention
    encoder_attention = cap.examples["encoder.self_attn"].probs.mean(0)
    expected = (encoder_attention + torch.eye(6)) / (encoder_attention + torch.eye(6)).sum(-1, keepdim=True)
    torch.testing.assert_close(result.rollout, expected)
