"""Train a small GPT in a plain PyTorch loop (no Trainer) with the attention monitor on.

    python examples/plain_loop.py [--max-steps 300] [--log-dir runs/plain_loop] [--entropy-weight 0.0]

Then: tensorboard --logdir runs/plain_loop

The loop is the whole integration: ``with monitor.step(step, batch):`` around each micro-batch's
forward, ``monitor.penalty()`` added to the loss, ``monitor.log(writer)`` after each optimizer step,
``monitor.eval_batch`` / ``monitor.log_eval`` for evaluation. Under Lightning Fabric the calls are
the same (create the monitor before ``fabric.setup(model)``; ``fabric.backward(loss)``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter

from attnmonitor.demo import TinyGPT, WordVocabulary, load_corpus_words
from attnmonitor.integrations.loop import AttentionMonitorLoop


def main(argv: Sequence[str] | None = None) -> str:
    """Train for ``--max-steps`` optimizer steps; returns the TensorBoard log directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--log-dir", default="runs/plain_loop")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--every-n-steps", type=int, default=20, help="capture interval (optimizer steps)")
    parser.add_argument("--entropy-weight", type=float, default=0.0, help="attention entropy regularizer weight")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    words = load_corpus_words()  # the English prose that ships with Python: no download
    vocab = WordVocabulary(words)
    windows = vocab.encode(words)[: len(words) // (args.seq_len + 1) * (args.seq_len + 1)].view(-1, args.seq_len + 1)
    train, val = windows[:-64], windows[-64:]  # [N, seq_len + 1] input ids and their next words
    model = TinyGPT(vocab_size=len(vocab), seq_len=args.seq_len, dim=64)  # any nn.Module
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    every = args.every_n_steps
    with (
        SummaryWriter(args.log_dir) as writer,
        AttentionMonitorLoop(
            model,
            regularizer={"entropy_weight": args.entropy_weight, "entropy_target": 0.5},
            schedule={"every_n_steps": every, "atlas_every_n_steps": 5 * every},
            dashboards={"heatmaps": {"every_n_steps": 5 * every, "max_tokens": 24}, "tokenizer": vocab},
        ) as monitor,
    ):
        for step in range(args.max_steps):
            for _ in range(args.accumulate):
                batch = train[torch.randint(len(train), (args.batch_size,))]
                ids, targets = batch[:, :-1], batch[:, 1:]  # [B, L]
                with monitor.step(step, ids):  # captures every `every` optimizer steps, all micro-batches
                    loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten()) + monitor.penalty()
                (loss / args.accumulate).backward()
            optimizer.step()
            optimizer.zero_grad()
            writer.add_scalar("train/loss", loss.item(), step)
            monitor.log(writer)  # writes the step's statistics when it was captured
            if (step + 1) % (5 * every) == 0 or step + 1 == args.max_steps:
                model.eval()
                with torch.no_grad():
                    for index, batch in enumerate(val.split(args.batch_size)):
                        with monitor.eval_batch(index, batch[:, :-1]):  # the first `val_batches` are captured
                            val_loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
                monitor.log_eval(writer, step=step)
                writer.add_scalar("val/loss", val_loss.item(), step)
                model.train()
    print(f"TensorBoard logs in {args.log_dir}\nView them with:  tensorboard --logdir {args.log_dir}")
    return args.log_dir


if __name__ == "__main__":
    main()
