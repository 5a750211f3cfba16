"""`lkspec demo`: the end-to-end run on the embedded target (for now: the smallest real slice of it)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    target: str = typer.Option("smollm2-135m-instruct", help="Target model: hub id, HF dir, .gguf or embedded name."),
) -> None:
    """Load the embedded target, run a random MLP-Speculator on one chat prompt and report its LK loss."""
    import torch

    from lkspec.alignment import head_masks, head_targets
    from lkspec.drafts import build_draft
    from lkspec.losses import draft_loss, simulated_tau
    from lkspec.targets import load_target

    t = load_target(target)
    ids = t.render_chat([{"role": "user", "content": "Explain speculative decoding in one sentence."}])
    x = torch.tensor([ids])
    hidden = t.hidden_states(x)
    draft = build_draft("mlp_speculator", hidden_size=t.hidden_size, vocab_size=t.vocab_size, inner_dim=256, seed=0)
    logits = draft(hidden, x)
    target_logits = t.logits_from_hidden(hidden)
    mask = torch.ones_like(x, dtype=torch.bool)
    total, stats = draft_loss("lk_hybrid", logits, [head_targets(target_logits, k) for k in range(1, 7)],
                              head_masks(mask, 6), eta=3.0)
    typer.echo(f"target {t.name}: hidden {t.hidden_size}, vocab {t.vocab_size}; "
               f"draft {draft.num_parameters():,} params")
    typer.echo(f"random draft: lk_hybrid loss {total.item():.3f}, alpha per head "
               f"{[round(s.alpha, 5) for s in stats]}, simulated tau {simulated_tau([s.alpha for s in stats]):.4f}")
