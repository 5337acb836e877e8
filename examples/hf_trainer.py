"""Train a tiny GPT-2 (built from a config) with the Hugging Face Trainer and the attention monitor on.

    python examples/hf_trainer.py [--max-steps 300] [--output-dir runs/hf_trainer] [--entropy-weight 0.0]
                                  [--report-to tensorboard wandb mlflow]

It prints where its logs are before the first step (TensorBoard: ``tensorboard --logdir runs/hf_trainer``;
W&B and MLflow take the Trainer's own settings: ``WANDB_MODE=offline``, ``MLFLOW_TRACKING_URI``).

The integration is two names: ``AttentionMonitorCallback`` in ``callbacks`` and
``AttentionMonitorTrainer`` in place of ``Trainer`` (it binds the monitor and adds the regularizer's
penalty to the loss). Scalars go through the Trainer's own logging (``report_to``, ``log_history``);
figures go to each of its TensorBoard, W&B and MLflow callbacks; the console shows the Trainer's own
lines only.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from attnmonitor.demo import WordVocabulary, load_corpus_words
from attnmonitor.integrations.transformers import AttentionMonitorCallback, AttentionMonitorTrainer


def main(argv: Sequence[str] | None = None) -> AttentionMonitorTrainer:
    """Train for ``--max-steps``; returns the trainer (its ``state.log_history`` holds the monitor's scalars)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--output-dir", default="runs/hf_trainer")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--every-n-steps", type=int, default=20, help="capture interval (optimizer steps)")
    parser.add_argument("--entropy-weight", type=float, default=0.0, help="attention entropy regularizer weight")
    parser.add_argument("--report-to", nargs="+", default=["tensorboard"], help="the Trainer's report_to")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    words = load_corpus_words()  # the English prose that ships with Python: no download
    vocab = WordVocabulary(words)
    windows = vocab.encode(words)[: len(words) // args.seq_len * args.seq_len].view(-1, args.seq_len)
    data = [{"input_ids": w, "attention_mask": torch.ones_like(w), "labels": w} for w in windows]
    config = GPT2Config(vocab_size=len(vocab), n_positions=args.seq_len, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)  # from a config: nothing is downloaded

    every = args.every_n_steps
    monitor = AttentionMonitorCallback(
        regularizer={"entropy_weight": args.entropy_weight, "entropy_target": 0.5},
        schedule={"every_n_steps": every, "atlas_every_n_steps": 5 * every},
        dashboards={"heatmaps": {"every_n_steps": 5 * every, "max_tokens": 24}, "tokenizer": vocab},
    )
    training = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=3e-3,
        logging_steps=every,
        eval_strategy="steps",
        eval_steps=5 * every,
        report_to=args.report_to,
        save_strategy="no",
        log_level="warning",
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    trainer = AttentionMonitorTrainer(model=model, args=training, train_dataset=data[:-64], eval_dataset=data[-64:], callbacks=[monitor])
    print(f"Logs in {args.output_dir} ({', '.join(args.report_to)})", flush=True)
    if "tensorboard" in args.report_to:
        print(f"View them with:  tensorboard --logdir {args.output_dir}\n", flush=True)
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
