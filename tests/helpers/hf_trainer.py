"""Tiny Hugging Face models from configs, padded data, a recording callback and float64 references from
the models' own eager ``output_attentions``, for the Hugging Face ``Trainer`` tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn

from tests.helpers.reference import head_means
from tests.helpers.regularization import LAMBDA_H, LAMBDA_S, TARGET, reference_terms

VOCAB, SEQ = 64, 12
STATISTICS = ["entropy", "normalized_entropy", "max_weight", "distance", "prev_token_weight", "sink_mass"]
"""Statistics the Trainer tests compare (entropy, concentration, position and sink families)."""


def gpt2_config() -> transformers.GPT2Config:
    """2 layers, 4 heads, no dropout (the eager reference in eval mode sees the training attention)."""
    return transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=SEQ,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def bert_config() -> transformers.BertConfig:
    """2 layers, 4 heads, no dropout, 2 labels."""
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=SEQ,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
        pad_token_id=0,
    )


CAUSAL = {"gpt2": True, "bert": False}


def build(name: str, impl: str = "sdpa", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The ``name`` model (``"gpt2"``: causal LM, ``"bert"``: sequence classifier), seed 0."""
    torch.manual_seed(0)
    if name == "gpt2":  # GPT2LMHeadModel's loss type is not found from its class name: named, the Trainer counts shifted targets
        cls, config = transformers.GPT2LMHeadModel, gpt2_config()
    else:
        cls, config = transformers.BertForSequenceClassification, bert_config()
    model = cls._from_config(config, attn_implementation=impl).to(dtype)
    if name == "gpt2":
        model.loss_type = "ForCausalLM"
    return model


def samples(name: str, n: int, seed: int = 0) -> list[dict[str, Tensor]]:
    """``n`` right-padded samples of length ``SEQ`` (2 to ``SEQ`` real tokens); LM labels or class labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 2 + (i * 5) % (SEQ - 1)
        ids = torch.randint(1, VOCAB, (SEQ,), generator=g)
        mask = (torch.arange(SEQ) < length).long()
        ids = ids * mask
        labels = ids.masked_fill(mask == 0, -100) if name == "gpt2" else torch.tensor(i % 2)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def arguments(output: str | Path, **overrides: Any) -> transformers.TrainingArguments:
    """Quiet CPU TrainingArguments logging to TensorBoard; no checkpoints; any field can be overridden."""
    options: dict[str, Any] = dict(
        output_dir=str(output),
        report_to=["tensorboard"],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=3,
        per_device_eval_batch_size=3,
        logging_steps=1,
        max_grad_norm=0.0,
        seed=0,
        dataloader_num_workers=0,
        log_level="error",
    )
    return transformers.TrainingArguments(**{**options, **overrides})


class Recorder(transformers.TrainerCallback):
    """Records, from outside the monitor, what each step ran: its micro-batches, the weights it started
    from, the gradients before the optimizer step, and the first batch and weights of each evaluation."""

    def __init__(self) -> None:
        self.batches: dict[int, list[dict[str, Tensor]]] = {}  # Trainer step (1-based) -> micro-batches
        self.weights: dict[int, dict[str, Tensor]] = {}  # Trainer step (1-based) -> weights it started from
        self.grads: dict[int, dict[str, Tensor]] = {}
        self.eval_batches: dict[int, dict[str, Tensor]] = {}  # Trainer step -> first evaluation batch
        self.eval_weights: dict[int, dict[str, Tensor]] = {}
        self._step: int | None = None
        self._done = 0  # optimizer steps done
        self._handle = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._step = state.global_step + 1
        self.weights[self._step] = copy.deepcopy(model.state_dict())

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads[self._step] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    def on_step_end(self, args, state, control, **kwargs):
        self._step, self._done = None, state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        self._handle.remove()

    def _record(self, module, args, kwargs):
        batch = {k: v.detach().clone() for k, v in kwargs.items() if k in ("input_ids", "attention_mask", "labels")}
        if self._step is not None:
            self.batches.setdefault(self._step, []).append(batch)
        else:
            if self._done not in self.eval_batches:
                self.eval_batches[self._done] = batch
                self.eval_weights[self._done] = copy.deepcopy(module.state_dict())


def concat(batches: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The micro-batches of one step as one batch."""
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def masks(name: str, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``key_valid [B, 1, L, L]`` (padding, and causal for GPT-2) and ``query_valid [B, 1, L]`` of a padded batch."""
    seq = attention_mask.shape[1]
    key_valid = attention_mask.bool()[:, None, None, :].expand(-1, 1, seq, seq)
    if CAUSAL[name]:
        key_valid = key_valid & torch.ones(seq, seq, dtype=torch.bool).tril()
    return key_valid, attention_mask.bool()[:, None, :]


def eager_attentions(name: str, weights: dict[str, Tensor], batch: dict[str, Tensor], dtype=torch.float32, grad: bool = False):
    """``(model, outputs)``: the eager model with ``weights`` run on ``batch`` with ``output_attentions``."""
    model = build(name, "eager", dtype)
    model.load_state_dict(weights)
    model.train(grad)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.set_grad_enabled(grad):
        outputs = model(**inputs, output_attentions=True)
    return model, outputs


def reference_statistics(name: str, weights: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Float64 ``{statistic: [layers, heads]}`` of the eager attentions over the valid rows of ``batch``."""
    _, outputs = eager_attentions(name, weights, batch)
    key_valid, query_valid = masks(name, batch["attention_mask"])
    per_layer = [head_means(a.double(), key_valid, query_valid) for a in outputs.attentions]
    return {stat: torch.stack([d[stat] for d in per_layer]) for stat in per_layer[0]}


REGULARIZER = {"entropy_weight": LAMBDA_H, "entropy_target": TARGET, "sparsity_weight": LAMBDA_S}


def reference_gradients(name: str, weights: dict[str, Tensor], batches: list[dict[str, Tensor]], penalty: bool = True) -> dict[str, Tensor]:
    """Float64 gradients of ``task + λ R`` over one optimizer step's micro-batches, written out by hand.

    GPT-2: ``task = Σ_i Σ_tokens CE / N`` (shifted labels, ``N`` valid targets of the whole step); BERT:
    ``task = mean_i CE_i``. ``R = mean_i (λ_H R_H,i + λ_S R_S,i)``, each term a mean over the valid
    query rows of all layers of micro-batch ``i`` (left out without ``penalty``).
    """
    model = build(name, "eager", torch.float64)
    model.load_state_dict(weights)
    model.train()
    steps = len(batches)
    targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches) if name == "gpt2" else 0
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        outputs = model(**inputs, output_attentions=True)
        if name == "gpt2":
            logits, labels = outputs.logits[:, :-1], batch["labels"][:, 1:]
            task = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
            task = task / targets
        else:
            task = nn.functional.cross_entropy(outputs.logits, batch["labels"]) / steps
        key_valid, query_valid = masks(name, batch["attention_mask"])
        entropy, sparsity = reference_terms(list(outputs.attentions), key_valid, query_valid)
        (task + penalty * (LAMBDA_H * entropy + LAMBDA_S * sparsity) / steps).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def layer_names(name: str) -> list[str]:
    """The attention modules the monitor reports, in forward order."""
    return [f"transformer.h.{i}.attn" for i in range(2)] if name == "gpt2" else [f"bert.encoder.layer.{i}.attention.self" for i in range(2)]


def tensorboard_dir(trainer: transformers.Trainer) -> str:
    """The run directory of the Trainer's TensorBoardCallback."""
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, transformers.integrations.TensorBoardCallback))
    return callback.logging_dir
